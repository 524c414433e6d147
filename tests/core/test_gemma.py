"""Gemma3 text encoder: both file layouts, hidden_states[-2], tokenizer rules, loading errors."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import newbie_core.files as files_mod
from newbie_core.errors import ModelFileError
from newbie_core.text.gemma import gemma_config_from_shapes, load_gemma
from newbie_core.tiny import TINY_GEMMA_HIDDEN
from newbie_core.tiny.text import write_tiny_gemma, write_tiny_jina

PROMPTS = ["1girl, blue_hair, long hair, smile", "", "<character_1><n>x</n><gender>1girl</gender></character_1>"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gemma")
    p = write_tiny_gemma(root)
    p.update(write_tiny_jina(root))
    return p


@pytest.fixture(scope="module")
def hf(paths):
    return load_gemma(paths["gemma_hf"], dtype=torch.float32)


@pytest.fixture(scope="module")
def comfy(paths):
    return load_gemma(paths["gemma_comfyui"], dtype=torch.float32)


def test_both_layouts_load_and_give_identical_features(hf, comfy):
    assert hf.hidden_size == comfy.hidden_size == TINY_GEMMA_HIDDEN
    ids_a, mask_a = hf.tokenize(PROMPTS)
    ids_b, mask_b = comfy.tokenize(PROMPTS)  # tokenizer.json vs embedded SentencePiece
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    fa, ma = hf.encode(PROMPTS)
    fb, mb = comfy.encode(PROMPTS)
    assert fa.shape == (3, ids_a.shape[1], TINY_GEMMA_HIDDEN) and fa.dtype == torch.float32
    assert torch.equal(ma, mb) and ma.dtype == torch.int64
    torch.testing.assert_close(fa, fb, rtol=0, atol=1e-6)


def test_features_are_unnormed_output_of_second_to_last_layer(hf):
    captured = {}
    layers = hf.model.layers
    h1 = layers[-2].register_forward_hook(lambda m, i, o: captured.__setitem__("pen", o[0] if isinstance(o, tuple) else o))
    h2 = layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    try:
        feats, _ = hf.encode(["1girl, smile"])
    finally:
        h1.remove(), h2.remove()
    assert torch.equal(feats, captured["pen"])
    assert not torch.allclose(feats, hf.model.norm(captured["last"]))  # not the final normed state


def test_empty_prompt_is_exactly_bos(hf):
    ids, mask = hf.tokenize([""])
    assert ids.tolist() == [[2] + [0] * 7] and mask.tolist() == [[1] + [0] * 7]


def test_tokenizer_matches_transformers_with_demo_settings(paths, hf):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(paths["gemma_hf"]))
    tok.padding_side = "right"
    ref = tok(PROMPTS, padding=True, pad_to_multiple_of=8, max_length=512, truncation=True, return_tensors="pt")
    ids, mask = hf.tokenize(PROMPTS)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_long_prompt_is_cut_at_512_with_a_warning(hf, caplog):
    text = "1girl, " * 400 + "lastword"
    with caplog.at_level(logging.WARNING):
        ids, mask = hf.tokenize([text])
    assert ids.shape == (1, 512)
    assert "Gemma prompt is 1" in caplog.text and "tokens long" in caplog.text and "1girl" in caplog.text


def test_vision_tensors_are_never_read(paths, monkeypatch):
    asked = []
    real = files_mod.read_safetensors  # every model file is read through it

    def spy(path, keys=None):
        asked.extend(keys or ["<ALL>"])
        return real(path, keys)

    monkeypatch.setattr(files_mod, "read_safetensors", spy)
    load_gemma(paths["gemma_hf"], dtype=torch.float32)
    assert asked and "<ALL>" not in asked
    assert not [k for k in asked if "vision" in k or "multi_modal" in k]


def test_transformers5_key_layout_loads(paths, hf, tmp_path):
    src = paths["gemma_hf"]
    dst = tmp_path / "te5"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        sd = load_file(str(dst / shard))
        sd = {k.replace("language_model.model.", "model.language_model.").replace("vision_tower.", "model.vision_tower."): v
              for k, v in sd.items()}
        save_file(sd, str(dst / shard))
    index["weight_map"] = {k.replace("language_model.model.", "model.language_model."): v for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    f5, _ = load_gemma(dst, dtype=torch.float32).encode(PROMPTS)
    torch.testing.assert_close(f5, hf.encode(PROMPTS)[0], rtol=0, atol=0)


def test_bf16_load(paths):
    enc = load_gemma(paths["gemma_comfyui"])
    feats, _ = enc.encode(["1girl"])
    assert feats.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in enc.model.parameters())


def test_config_from_4b_shapes_uses_real_gemma3_4b_values():
    m = "meta"
    sd = {"embed_tokens.weight": torch.empty(262208, 2560, device=m),
          "layers.0.self_attn.q_norm.weight": torch.empty(256, device=m),
          "layers.0.self_attn.q_proj.weight": torch.empty(2048, 2560, device=m),
          "layers.0.self_attn.k_proj.weight": torch.empty(1024, 2560, device=m),
          "layers.0.mlp.gate_proj.weight": torch.empty(10240, 2560, device=m),
          "layers.33.input_layernorm.weight": torch.empty(2560, device=m)}
    c = gemma_config_from_shapes(sd)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (34, 8, 4, 256)
    assert c.sliding_window == 1024 and c.query_pre_attn_scalar == 256
    assert c.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert c.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert c.rope_parameters["full_attention"]["factor"] == 8.0
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 1e4


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelFileError, match="nope.safetensors"):
        load_gemma(tmp_path / "nope.safetensors")


def test_vae_file_given_as_gemma_says_what_it_is(tmp_path):
    f = tmp_path / "ae.safetensors"
    save_file({"decoder.up.0.block.0.conv1.weight": torch.zeros(2, 2, 3, 3),
               "encoder.down.0.block.0.conv1.weight": torch.zeros(2, 2, 3, 3)}, str(f))
    with pytest.raises(ModelFileError) as e:
        load_gemma(f)
    msg = str(e.value)
    assert "ae.safetensors" in msg and "a VAE" in msg and "Gemma" in msg


def test_jina_file_given_as_gemma_is_refused(paths):
    with pytest.raises(ModelFileError, match="Jina"):
        load_gemma(paths["jina_comfyui"])


def test_single_file_without_tokenizer_says_where_to_put_one(paths, tmp_path):
    sd = load_file(str(paths["gemma_comfyui"]))
    sd.pop("spiece_model")
    f = tmp_path / "gemma_no_tok.safetensors"
    save_file(sd, str(f))
    with pytest.raises(ModelFileError) as e:
        load_gemma(f)
    assert "gemma_no_tok.tokenizer.json" in str(e.value) and "spiece_model" in str(e.value)


def test_embedding_table_kept_on_the_cpu_gives_the_same_features(paths):
    """The staged pipeline keeps Gemma's 1.25 GiB embedding table on the CPU (cpu_only); features must not change."""
    from newbie_core.loading import CPU_ONLY
    from newbie_core.memory import StagedModel
    from newbie_core.precision import parse_precision

    enc = load_gemma(paths["gemma_hf"], dtype=torch.float32)
    prec = parse_precision("bf16", "text")
    ref_staged = StagedModel("gemma", enc.model)
    ref_staged.acquire("cpu", prec)
    ref, _ = enc.encode(["1girl, smile", "a cat"])
    ref_staged.release()
    staged = StagedModel("gemma", enc.model, cpu_only=CPU_ONLY["gemma"])
    staged.acquire("cpu", prec)
    assert enc.model.embed_tokens.weight.dtype == torch.float32 and enc.model.norm.weight.dtype == torch.bfloat16
    out, _ = enc.encode(["1girl, smile", "a cat"])
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)

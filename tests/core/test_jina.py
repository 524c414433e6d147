"""Jina CLIP v2 text tower: LoRA merge, both layouts, masked mean pooling, tokenizer, loading errors."""
import builtins

import pytest
import torch
from safetensors.torch import load_file, save_file

import newbie_core.files as files_mod
import newbie_core.text.jina as jina_mod
from newbie_core.errors import ModelFileError
from newbie_core.text.jina import load_jina, masked_mean
from newbie_core.text.prompts import TextTokenizer
from newbie_core.tiny import TINY_JINA_HIDDEN
from newbie_core.tiny.text import _train_spm, write_tiny_gemma, write_tiny_jina

PROMPTS = ["1girl, blue_hair, long hair, smile", "", "<character_1><n>x</n></character_1> cat"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_jina")
    p = write_tiny_jina(root)
    p.update(write_tiny_gemma(root))
    return p


@pytest.fixture(scope="module")
def hf(paths):
    return load_jina(paths["jina_hf"], dtype=torch.float32)


@pytest.fixture(scope="module")
def comfy(paths):
    return load_jina(paths["jina_comfyui"], dtype=torch.float32)


def test_hf_lora_merged_at_load_equals_premerged_single_file(hf, comfy):
    assert hf.hidden_size == comfy.hidden_size == TINY_JINA_HIDDEN
    assert torch.equal(hf.tokenize(PROMPTS)[0], comfy.tokenize(PROMPTS)[0])
    a, b = hf.encode(PROMPTS), comfy.encode(PROMPTS)
    assert a.shape == (3, TINY_JINA_HIDDEN) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_lora_merge_changes_the_output(paths, hf):
    plain = load_jina(paths["jina_hf"], dtype=torch.float32, merge=False)
    assert (plain.encode(PROMPTS) - hf.encode(PROMPTS)).abs().max() > 1e-2


def test_pooled_is_mean_over_all_real_tokens_without_projection(hf):
    ids, mask = hf.tokenize(["1girl, smile"])
    assert ids[0, 0] == 0 and ids[0, int(mask.sum()) - 1] == 2  # <s> … </s>
    with torch.no_grad():
        h = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hf.encode(["1girl, smile"]), h[0].mean(0, keepdim=True), rtol=1e-6, atol=1e-6)


def test_pads_do_not_change_the_pooled_vector(hf):
    alone = hf.encode(["cat"])
    batched = hf.encode(["cat", "1girl, blue_hair, long hair, smile, school uniform, standing, outdoors"])
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)
    h = torch.randn(2, 5, 3)
    m = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    h2 = h.clone()
    h2[0, 2:] = 1e6  # garbage in padded slots
    torch.testing.assert_close(masked_mean(h2, m), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_empty_prompt_is_s_and_end(hf):
    ids, mask = hf.tokenize([""])
    assert ids.tolist() == [[0, 2]] and mask.tolist() == [[1, 1]]


def test_tokenizer_matches_transformers(paths, hf):
    from transformers import XLMRobertaTokenizer
    tok = XLMRobertaTokenizer.from_pretrained(str(paths["jina_hf"]))
    ref = tok(PROMPTS, padding=True, max_length=512, truncation=True, return_tensors="pt")
    ids, mask = hf.tokenize(PROMPTS)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_original_xlmr_sentencepiece_gets_fairseq_offset():
    common = dict(vocab_size=300, model_type="unigram", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>")
    hf_layout = _train_spm(2, bos_id=0, pad_id=1, eos_id=2, unk_id=3, pad_piece="<pad>", **common)
    raw_layout = _train_spm(2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, **common)  # like sentencepiece.bpe.model
    direct = TextTokenizer.from_sentencepiece(hf_layout, "direct")
    shifted = TextTokenizer.from_sentencepiece(raw_layout, "raw", id_offset=1)
    texts = ["1girl, blue_hair smile", "unknown ☃ glyph"]
    assert direct.encode(texts) == shifted.encode(texts)
    assert shifted.token_to_id("<pad>") == 1 and shifted.token_to_id("</s>") == 2


def test_vision_tensors_are_never_read(paths, monkeypatch):
    asked = []
    real = files_mod.read_safetensors  # every model file is read through it
    monkeypatch.setattr(files_mod, "read_safetensors", lambda p, keys=None: asked.extend(keys or ["<ALL>"]) or real(p, keys))
    load_jina(paths["jina_hf"], dtype=torch.float32)
    assert asked and "<ALL>" not in asked and not [k for k in asked if "vision" in k or "logit" in k]


def test_gemma_file_given_as_jina_is_refused(paths):
    with pytest.raises(ModelFileError) as e:
        load_jina(paths["gemma_comfyui"])
    assert "gemma_3_4b_it_bf16.safetensors" in str(e.value) and "Gemma-3" in str(e.value) and "Jina" in str(e.value)


def test_single_file_without_tokenizer_says_where_to_put_one(paths, tmp_path):
    sd = load_file(str(paths["jina_comfyui"]))
    sd.pop("spiece_model")
    f = tmp_path / "jina_no_tok.safetensors"
    save_file(sd, str(f))
    with pytest.raises(ModelFileError) as e:
        load_jina(f)
    assert "jina_no_tok.tokenizer.json" in str(e.value) and "tokenizer.json" in str(e.value)
    (tmp_path / "jina_no_tok.tokenizer.json").write_bytes((paths["jina_hf"] / "tokenizer.json").read_bytes())
    assert load_jina(f, dtype=torch.float32).encode(["cat"]).shape == (1, TINY_JINA_HIDDEN)


def test_missing_transformers_class_gives_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def fake(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "transformers" and fromlist and "JinaEmbeddingsV3Model" in fromlist:
            raise ImportError("cannot import name 'JinaEmbeddingsV3Model'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ModelFileError, match="JinaEmbeddingsV3Model"):
        jina_mod._jina_model_class()

"""LoRA / LoKr loading for the DiT: every format against an independent fp32 reference W + strength·scale·ΔW.

PEFT files come from the real `peft` library on the official module names (its own LoRA forward is a second
reference); kohya / ComfyUI / LyCORIS LoKr / diffusers files come from `newbie_core.tiny.lora`, and the
reference ΔW here is recomputed from the file's tensors by the published formulas, not by the code under test.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from newbie_core import load_dit
from newbie_core.errors import ModelFileError
from newbie_core.lora import apply_loras, parse_lora_arg, read_lora, remove_loras
from newbie_core.tiny.dit import TINY_DIT_CONFIG, tiny_dit_state_dict
from newbie_core.tiny.lora import write_tiny_lora

PEFT_TARGETS = ["attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                "adaLN_modulation.1", "x_embedder", "cap_embedder.1", "time_text_embed.1",
                "clip_text_pooled_proj.1", "final_layer.linear", "final_layer.adaLN_modulation.1",
                "t_embedder.mlp.0", "t_embedder.mlp.2"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_DIT_CONFIG
    return (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.3]), torch.randn(1, 5, cfg.cap_feat_dim, generator=g),
            torch.tensor([[1, 1, 1, 1, 0]]), torch.randn(1, cfg.clip_text_dim, generator=g))


def _run(model):
    with torch.no_grad():
        return model(*_inputs()).double()


def _close(a, b, rtol=2e-5):
    err = (a - b).abs().max().item() / b.abs().max().item()
    assert err < rtol, f"relative error {err:.2e}"


# ------------------------------------------------------------------- independent reference (published formulas)
def _ref_delta(f, stem: str) -> torch.Tensor:
    keys = set(f.keys())

    def t(n):
        return f.get_tensor(f"{stem}.{n}").double()
    if f"{stem}.lokr_w1" in keys or f"{stem}.lokr_w1_a" in keys:
        w1 = t("lokr_w1") if f"{stem}.lokr_w1" in keys else t("lokr_w1_a") @ t("lokr_w1_b")
        w2 = t("lokr_w2") if f"{stem}.lokr_w2" in keys else t("lokr_w2_a") @ t("lokr_w2_b")
        r = f.get_tensor(f"{stem}.lokr_w2_b").shape[0] if f"{stem}.lokr_w2_b" in keys else None
        return torch.kron(w1, w2), r
    up = t("lora_B.weight") if f"{stem}.lora_B.weight" in keys else t("lora_up.weight")
    down = t("lora_A.weight") if f"{stem}.lora_A.weight" in keys else t("lora_down.weight")
    return up @ down, down.shape[0]


# diffusers (Lumina2Transformer2DModel) names → official names, written out by hand for the reference
_DIFFUSERS_BLOCK = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
                    "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
                    "norm1.linear": "adaLN_modulation.1"}
_DIFFUSERS_TOP = {"time_caption_embed.caption_embedder.1": "cap_embedder.1",
                  "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
                  "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
                  "time_caption_embed.clip_text_pooled_proj.1": "clip_text_pooled_proj.1",
                  "time_caption_embed.time_text_embed.1": "time_text_embed.1",
                  "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear"}


def _diffusers_to_official(name: str) -> str:
    if name in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[name]
    group, i, rest = name.split(".", 2)
    return f"{group}.{i}.{_DIFFUSERS_BLOCK[rest]}"


def _reference_sd(files_strengths, alpha_fallback=None):
    """fp64 official state dict with every LoRA added by hand (names mapped by hand, q/k/v rows from the config)."""
    sd = {k: v.double() for k, v in tiny_dit_state_dict().items()}
    cfg = TINY_DIT_CONFIG
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    rows = {"to_q": (0, q), "to_k": (q, kv), "to_v": (q + kv, kv)}
    underscored = {k[:-7].replace(".", "_"): k for k in sd if k.endswith(".weight")}
    for path, strength in files_strengths:
        f = safe_open(str(path), "pt")
        stems = sorted({k.rsplit(".", 2 if k.endswith("weight") else 1)[0] for k in f.keys() if not k.endswith("alpha")})
        for stem in stems:
            delta, r = _ref_delta(f, stem)
            alpha = f.get_tensor(stem + ".alpha").item() if stem + ".alpha" in f.keys() else alpha_fallback
            scale = alpha / r if (alpha is not None and r) else 1.0
            span = None
            for pre in ("base_model.model.", "diffusion_model.", "transformer."):
                if stem.startswith(pre):
                    name = stem[len(pre):]
                    if pre == "transformer." and any(name.endswith(x) for x in rows):
                        block, _, which = name.rpartition(".attn.")
                        key, span = f"{block}.attention.qkv.weight", rows[which]
                    elif pre == "transformer.":
                        key = _diffusers_to_official(name) + ".weight"
                    else:
                        key = name + ".weight"
                    break
            else:
                key = underscored[stem.split("_", 2)[-1] if stem.startswith("lora_unet_") else stem[len("lycoris_"):]]
            target = sd[key] if span is None else sd[key].narrow(0, *span)
            target += strength * scale * delta
    return sd


def _model_from(sd, dtype=torch.float32):
    return load_dit({k: v.to(torch.float32) for k, v in sd.items()}, dtype=dtype)


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    from newbie_core.tiny.dit import write_tiny_dit

    return write_tiny_dit(tmp_path_factory.mktemp("dit"))["dit_hf"]


# --------------------------------------------------------------------------------------------- PEFT (real)
def _peft_adapter(out, dit_file, **config):
    peft = pytest.importorskip("peft")
    model = load_dit(dit_file, dtype=torch.float32)
    cfg = peft.LoraConfig(target_modules=PEFT_TARGETS, init_lora_weights=False, **config)
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # make the deltas clearly visible
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    pm.save_pretrained(str(out))
    pm.eval()
    return out, _run(pm.base_model.model)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, dit_file):
    return _peft_adapter(tmp_path_factory.mktemp("peft") / "adapter", dit_file, r=4, lora_alpha=2)


def test_peft_alpha_pattern_and_rslora(dit_file, tmp_path):
    folder, peft_out = _peft_adapter(tmp_path / "adapter", dit_file, r=4, lora_alpha=2, use_rslora=True,
                                     alpha_pattern={"attention.qkv": 16, "x_embedder": 0.5})
    model = load_dit(dit_file, dtype=torch.float32, loras=[(folder, 1.0)])
    assert "alpha_pattern" in model.lora_reports[0].alpha_source
    _close(_run(model), peft_out)


def test_peft_folder_matches_peft_forward(peft_adapter, dit_file):
    folder, peft_out = peft_adapter
    base = _run(load_dit(dit_file, dtype=torch.float32))
    model = load_dit(dit_file, dtype=torch.float32, loras=[(folder, 1.0)])
    rep = model.lora_reports[0]
    assert "PEFT" in rep.format and "adapter_config.json" in rep.alpha_source and not rep.unmatched
    assert rep.matched == 31  # every Linear of the tiny DiT
    out = _run(model)
    assert (out - base).abs().max() > 1e-2  # the LoRA does something
    _close(out, peft_out)


def test_peft_alpha_sources(peft_adapter, dit_file, tmp_path):
    folder, peft_out = peft_adapter
    lone = tmp_path / "lone.safetensors"  # the file without its adapter_config.json: alpha unknown → scale 1
    shutil.copy(folder / "adapter_model.safetensors", lone)
    rep = read_lora(lone)
    assert rep.alpha is None
    model = load_dit(dit_file, dtype=torch.float32, loras=[(lone, 0.5)])  # scale 1 × 0.5 = alpha/r (2/4)
    assert "no alpha" in model.lora_reports[0].alpha_source
    _close(_run(model), peft_out)
    with_meta = tmp_path / "meta.safetensors"  # metadata alpha (official trainer style)
    f = safe_open(str(lone), "pt")
    save_file({k: f.get_tensor(k) for k in f.keys()}, str(with_meta), metadata={"lora_alpha": "2", "r": "4"})
    model = load_dit(dit_file, dtype=torch.float32, loras=[(with_meta, 1.0)])
    assert "metadata" in model.lora_reports[0].alpha_source
    _close(_run(model), peft_out)


# ------------------------------------------------------------------------------ formats by published formulas
@pytest.mark.parametrize("fmt", ["kohya", "comfy", "lokr", "diffusers", "peft"])
def test_format_matches_reference(fmt, dit_file, tmp_path):
    path = write_tiny_lora(tmp_path / f"{fmt}.safetensors", fmt, alpha=3.0)
    strength = 0.7
    model = load_dit(dit_file, dtype=torch.float32, loras=[(path, strength)])
    rep = model.lora_reports[0]
    assert rep.matched > 20 and not rep.unmatched, rep.summary()
    ref = _model_from(_reference_sd([(path, strength)], alpha_fallback=3.0 if fmt in ("peft", "lokr") else None))
    _close(_run(model), _run(ref))


def test_several_loras_add_and_bf16(dit_file, tmp_path):
    a = write_tiny_lora(tmp_path / "a.safetensors", "kohya", seed=1)
    b = write_tiny_lora(tmp_path / "b.safetensors", "lokr", seed=2)
    loras = [(a, 0.5), (b, -1.25)]
    ref_sd = _reference_sd(loras)
    _close(_run(load_dit(dit_file, dtype=torch.float32, loras=loras)), _run(_model_from(ref_sd)))
    bf16 = load_dit(dit_file, dtype=torch.bfloat16, loras=loras)  # merged in fp32, cast once
    for k, v in bf16.state_dict().items():
        ref = ref_sd[k].float().to(torch.bfloat16)
        mism = (v != ref).float().mean().item()
        assert mism < 1e-3, f"{k}: {mism:.2%} of elements differ from the rounded fp32 reference"


def test_partial_qkv_rows(dit_file, tmp_path):
    path = write_tiny_lora(tmp_path / "k_only.safetensors", "diffusers")
    f = safe_open(str(path), "pt")
    only_k = {k: f.get_tensor(k) for k in f.keys() if k.startswith("transformer.layers.0.attn.to_k.")}
    save_file(only_k, str(path))
    base = load_dit(dit_file, dtype=torch.float32)
    w0 = base.layers[0].attention.qkv.weight.clone()
    apply_loras(base, [(path, 1.0)])
    w1 = base.layers[0].attention.qkv.weight
    cfg = TINY_DIT_CONFIG
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    changed = (w1 != w0).any(dim=1).nonzero().flatten()
    assert changed.min().item() == q and changed.max().item() == q + kv - 1


# ------------------------------------------------------------------------------------------- apply / remove
def test_apply_remove_bitwise_and_strength_zero(dit_file, tmp_path):
    path = write_tiny_lora(tmp_path / "l.safetensors", "lokr")
    model = load_dit(dit_file, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    out0 = _run(model)
    apply_loras(model, [(path, 0.0)])
    assert all(p is params[n] for n, p in model.named_parameters())  # strength 0: the very same tensors
    apply_loras(model, [(path, 1.0)])
    assert not torch.equal(_run(model), out0)
    apply_loras(model, [(path, 1.0), (path, 0.5)])  # replaces, starting from the originals
    remove_loras(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(_run(model), out0)


def test_matches_across_strength_changes(dit_file, tmp_path):
    path = write_tiny_lora(tmp_path / "l.safetensors", "kohya")
    model = load_dit(dit_file, dtype=torch.float32)
    apply_loras(model, [(path, 2.0)])
    apply_loras(model, [(path, 0.3)])
    _close(_run(model), _run(load_dit(dit_file, dtype=torch.float32, loras=[(path, 0.3)])), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ reports
def test_unmatched_keys_reported(dit_file, tmp_path, caplog):
    path = write_tiny_lora(tmp_path / "l.safetensors", "kohya")
    f = safe_open(str(path), "pt")
    sd = {k: f.get_tensor(k) for k in f.keys()}
    sd["lora_unet_layers_7_attention_qkv.lora_down.weight"] = torch.zeros(4, 64)
    sd["lora_unet_layers_7_attention_qkv.lora_up.weight"] = torch.zeros(192, 4)
    save_file(sd, str(path))
    model = load_dit(dit_file, dtype=torch.float32, loras=[(path, 1.0)])
    rep = model.lora_reports[0]
    assert rep.unmatched == ["lora_unet_layers_7_attention_qkv"]
    assert "1 NOT matched: lora_unet_layers_7_attention_qkv" in rep.summary()
    assert "matched no DiT weight" in caplog.text


@pytest.mark.parametrize("keys, family", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"], "SDXL"),
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"], "FLUX"),
])
def test_wrong_family_is_refused(keys, family, dit_file, tmp_path):
    path = tmp_path / "other.safetensors"
    sd = {}
    for k in keys:
        sd.update({f"{k}.lora_down.weight": torch.zeros(4, 8), f"{k}.lora_up.weight": torch.zeros(8, 4),
                   f"{k}.alpha": torch.tensor(4.0)})
    save_file(sd, str(path))
    with pytest.raises(ModelFileError, match=family) as e:
        load_dit(dit_file, dtype=torch.float32, loras=[(path, 1.0)])
    assert "other.safetensors" in str(e.value)


def test_shape_mismatch_names_key_and_shapes(dit_file, tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"base_model.model.layers.0.attention.out.lora_A.weight": torch.zeros(4, 128),
               "base_model.model.layers.0.attention.out.lora_B.weight": torch.zeros(128, 4)}, str(path))
    with pytest.raises(ModelFileError, match=r"layers\.0\.attention\.out.*\(128, 128\).*\(64, 64\)"):
        load_dit(dit_file, dtype=torch.float32, loras=[(path, 1.0)])


def test_pickle_refused(tmp_path, dit_file):
    path = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(ModelFileError, match="pickle"):
        load_dit(dit_file, loras=[(path, 1.0)])


def test_parse_lora_arg():
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_arg(r"C:\loras\x.safetensors:-1") == (r"C:\loras\x.safetensors", -1.0)


# ------------------------------------------------------------------------------------- CLI host (pipeline)
def test_cli_host_fp8_is_quantised_from_patched_weights(tiny_models, tmp_path):
    from newbie_core.loading import load_role
    from newbie_core.memory import StagedModel
    from newbie_core.model_paths import ModelPaths
    from newbie_core.precision import parse_precision

    path = write_tiny_lora(tmp_path / "l.safetensors", "lokr", seed=3)
    paths = ModelPaths.from_dir(tiny_models["root"])
    strength = 30.0  # the tiny LoKr's ΔW is small next to fp8 rounding; scale it up to see it clearly
    ref = _run(_model_from(_reference_sd([(path, strength)])))
    plain = _run(_model_from(_reference_sd([])))
    fp8 = parse_precision("fp8_e4m3fn", "dit", "cpu")
    outs = {}
    for name, loras in (("patched", [(path, strength)]), ("plain", [])):
        loaded = load_role("dit", paths, loras=loras)
        staged = StagedModel("dit", loaded.module, loaded.source, loaded.cpu_only, loaded.stream)
        staged.acquire("cpu", fp8)
        outs[name] = _run(loaded.wrapper)
        staged.release()
    lora_effect = (ref - plain).abs().max()
    fp8_err = (outs["patched"] - ref).abs().max()
    plain_fp8_err = (outs["plain"] - plain).abs().max()  # fp8 rounding alone, without any LoRA
    assert fp8_err < 0.25 * lora_effect and fp8_err < 3 * plain_fp8_err, (fp8_err, plain_fp8_err, lora_effect)
    assert (outs["plain"] - ref).abs().max() > 0.5 * lora_effect


def test_cli_generate_with_lora_reports_and_changes_the_image(tiny_models, tmp_path, capsys):
    from newbie_core.cli import main

    path = write_tiny_lora(tmp_path / "style.safetensors", "peft", seed=4)
    common = ["generate", "--prompt", "1girl", "--model-dir", str(tiny_models["root"]), "--width", "64",
              "--height", "64", "--steps", "3", "--device", "cpu", "--precision", "dit=fp32,vae=fp32", "--json"]
    assert main(common + ["--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "b.png"), "--lora", f"{path}:0.8", "--lora", f"{path}:0"]) == 0
    cap = capsys.readouterr()
    assert "style.safetensors: PEFT" in cap.err and "strength 0.8" in cap.err and "31 modules matched" in cap.err
    loras = json.loads(cap.out)["loras"]
    assert [r["strength"] for r in loras] == [0.8, 0.0]
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_cli_host_streamed_blocks_carry_the_patched_weights(tiny_models, tmp_path):
    from newbie_core.loading import load_role
    from newbie_core.memory import StagedModel
    from newbie_core.model_paths import ModelPaths
    from newbie_core.precision import parse_precision

    path = write_tiny_lora(tmp_path / "l.safetensors", "comfy", seed=5)
    loaded = load_role("dit", ModelPaths.from_dir(tiny_models["root"]), loras=[(path, 1.5)])
    staged = StagedModel("dit", loaded.module, loaded.source, loaded.cpu_only, loaded.stream)
    staged.acquire("cpu", parse_precision("fp32", "dit"), streaming=True, budget=0)
    assert staged.streamer is not None
    _close(_run(loaded.wrapper), _run(_model_from(_reference_sd([(path, 1.5)]))))
    staged.release()


def test_compiled_dit_follows_patches_without_graph_breaks(dit_file, tmp_path):
    """fullgraph compile (no graph break); patching and unpatching need no recompile (weights are graph inputs)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    path = write_tiny_lora(tmp_path / "l.safetensors", "diffusers", seed=6)
    model = load_dit(dit_file, dtype=torch.float32)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    x, t, feats, mask, pooled = _inputs()
    layout = model.prepare(mask, *x.shape[-2:])  # as the pipeline does: no host sync inside the graph

    def call():
        return compiled(x, t, feats, mask, pooled, layout=layout).double()
    with torch.no_grad():
        base = call()
        assert torch.equal(base, _run(model)) and len(graphs) == 1
        apply_loras(model, [(path, 1.0)])
        patched = call()
        assert len(graphs) == 1  # weights are graph inputs: a new patch set needs no recompile
        _close(patched, _run(_model_from(_reference_sd([(path, 1.0)]))))
        remove_loras(model)
        assert torch.equal(call(), base)
        assert len(graphs) == 1


def test_loha_and_full_lokr_by_formula(dit_file, tmp_path):
    """LyCORIS LoHa ((w1a@w1b)⊙(w2a@w2b) · alpha/r) and LoKr with two whole factors (alpha unused: scale 1)."""
    g = torch.Generator().manual_seed(7)
    sd = tiny_dit_state_dict()
    w_out = sd["layers.1.attention.out.weight"]
    w_ff = sd["layers.0.feed_forward.w2.weight"]  # 64 x ffn
    r = 3
    loha = {k: torch.randn(*s, generator=g) * 0.3 for k, s in (("hada_w1_a", (64, r)), ("hada_w1_b", (r, 64)),
                                                            ("hada_w2_a", (64, r)), ("hada_w2_b", (r, 64)))}
    lokr = {"lokr_w1": torch.randn(4, 2, generator=g), "lokr_w2": torch.randn(16, w_ff.shape[1] // 2, generator=g) * 0.05}
    path = tmp_path / "lyco.safetensors"
    tensors = {f"lycoris_layers_1_attention_out.{k}": v for k, v in loha.items()}
    tensors["lycoris_layers_1_attention_out.alpha"] = torch.tensor(1.5)
    tensors.update({f"lycoris_layers_0_feed_forward_w2.{k}": v for k, v in lokr.items()})
    tensors["lycoris_layers_0_feed_forward_w2.alpha"] = torch.tensor(99.0)
    save_file(tensors, str(path))
    model = load_dit(dit_file, dtype=torch.float32, loras=[(path, 0.5)])
    assert "LoHa/LoKr" in model.lora_reports[0].format
    want_out = w_out + 0.5 * (1.5 / r) * (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    want_ff = w_ff + 0.5 * torch.kron(lokr["lokr_w1"], lokr["lokr_w2"])
    torch.testing.assert_close(model.layers[1].attention.out.weight, want_out)
    torch.testing.assert_close(model.layers[0].feed_forward.w2.weight, want_ff)


def test_cli_missing_lora_is_a_clear_error_before_any_stage(tiny_models, tmp_path, capsys):
    from newbie_core.cli import main

    rc = main(["generate", "--prompt", "x", "--out", str(tmp_path / "x.png"), "--model-dir", str(tiny_models["root"]),
               "--width", "64", "--height", "64", "--device", "cpu", "--lora", str(tmp_path / "nope.safetensors:0.5")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.safetensors does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_public_api_exposes_lora_functions():
    import newbie_core

    assert newbie_core.apply_loras is apply_loras and newbie_core.remove_loras is remove_loras

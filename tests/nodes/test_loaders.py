"""Loader nodes: DiT (MODEL), text encoders, VAE — value kinds, precisions, HF folders, missing files, memory manager."""
from __future__ import annotations

import pytest
import torch

FP8 = torch.float8_e4m3fn


def loaded_patchers(mm) -> list:
    return [lm.model for lm in mm.current_loaded_models]


def linear_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Linear)]


def float_params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.is_floating_point()]


# ------------------------------------------------------------------------------------------------ DiT
@pytest.mark.parametrize("precision, storage", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dit_loader_returns_model_patcher_in_precision(comfyui, pack, loaders, precision, storage):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.ops

    patcher = loaders.dit(precision=precision)
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
    assert isinstance(patcher.model, comfy.model_base.BaseModel)  # core KSampler / LoRA nodes accept it
    dm = patcher.model.diffusion_model
    assert isinstance(dm, pack.newbie_core.dit.NextDiT)
    assert {p.dtype for p in float_params(dm)} == {storage}
    assert dm.compute_dtype == storage
    # storage == compute: plain comfy.ops layers (no per-call casting), still streamable by the patcher
    assert isinstance(dm.x_embedder, comfy.ops.disable_weight_init.Linear)
    assert not isinstance(dm.x_embedder, comfy.ops.manual_cast.Linear)
    assert patcher.model_options["newbie_precision"] == precision
    assert patcher.model_options["newbie_compile"] is False
    assert patcher.load_device == comfyui.mm.get_torch_device()


def test_dit_loader_fp8_stores_float8_and_computes_bf16(comfyui, pack, loaders):
    import comfy.ops

    patcher = loaders.dit(precision="fp8_e4m3fn")
    dm = patcher.model.diffusion_model
    linears = [m for m in dm.modules() if isinstance(m, torch.nn.Linear)]
    # ComfyUI-castable (partial loading, patches) AND the engine's Fp8Linear (per-channel scales)
    assert linears and all(isinstance(m, comfy.ops.CastWeightBiasOp) and isinstance(m, pack.newbie_core.fp8.Fp8Linear)
                           for m in linears)
    assert {m.weight.dtype for m in linears} == {FP8}
    assert all(m.weight_scale is not None and m.weight_scale.shape == (m.out_features,) for m in linears)
    norms = [p for n, p in dm.named_parameters() if "norm" in n]
    assert norms and {p.dtype for p in norms} == {torch.bfloat16}, "only Linear weights are fp8; norms compute dtype"
    assert dm.compute_dtype == torch.bfloat16
    # ...and it runs: one velocity evaluation, computed in bf16 from fp8 storage, finite
    cfg = dm.config
    x = torch.randn(1, cfg.in_channels, 4, 4)
    feats, mask = torch.randn(1, 8, cfg.cap_feat_dim), torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        v = dm.velocity(x, torch.tensor([0.5]), feats, mask, torch.randn(1, cfg.clip_text_dim))
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()


# ------------------------------------------------------------------------------------- text encoders
def test_text_encoder_loader_returns_both_patchers(comfyui, pack, loaders):
    import comfy.model_patcher

    enc = loaders.text_encoders(precision="bf16")
    assert isinstance(enc, pack.nodes.types.TextEncoders)
    for patcher, wrapper in ((enc.gemma_patcher, enc.gemma), (enc.jina_patcher, enc.jina)):
        assert isinstance(patcher, comfy.model_patcher.ModelPatcher)
        assert patcher.model.inner is wrapper.model  # the patcher manages the very module that encodes
        assert {p.dtype for p in float_params(wrapper.model)} == {torch.bfloat16}
    assert enc.precision == "bf16"


def test_text_encoder_loader_fp8_gemma_float8_jina_bf16(comfyui, loaders):
    enc = loaders.text_encoders(precision="fp8_e4m3fn")
    gemma_linears = linear_weights(enc.gemma.model)
    assert gemma_linears and {w.dtype for w in gemma_linears} == {FP8}
    others = [p for n, p in enc.gemma.model.named_parameters() if not any(p is w for w in gemma_linears)]
    assert others and {p.dtype for p in others} == {torch.bfloat16}
    assert {p.dtype for p in float_params(enc.jina.model)} == {torch.bfloat16}
    feats, mask = enc.gemma.encode(["1girl, smile"])  # fp8 storage still encodes
    assert torch.isfinite(feats.float()).all() and int(mask.sum()) > 1


def test_text_encoder_loader_accepts_hf_folders(comfyui, pack, loaders, comfy_models):
    # the combo lists HF folders (a sub-folder with config.json) with a trailing "/"
    choices = pack.nodes._comfy.model_choices("text_encoders", want_folders=True)
    assert comfy_models["gemma_folder"] in choices and comfy_models["jina_folder"] in choices
    assert comfy_models["gemma"] in choices and comfy_models["jina"] in choices
    from_folders = loaders.text_encoders(precision="fp32", gemma=comfy_models["gemma_folder"],
                                         jina=comfy_models["jina_folder"])
    from_files = loaders.text_encoders(precision="fp32")
    assert from_folders.files[0].endswith("text_encoder") and from_folders.files[1].endswith("clip_model")
    g1, m1 = from_folders.gemma.encode(["1girl, blue hair"])
    g2, m2 = from_files.gemma.encode(["1girl, blue hair"])
    assert torch.equal(m1, m2)
    torch.testing.assert_close(g1, g2)  # same tiny weights in both layouts
    torch.testing.assert_close(from_folders.jina.encode(["1girl, blue hair"]),
                               from_files.jina.encode(["1girl, blue hair"]))


# ------------------------------------------------------------------------------------------------ VAE
def test_vae_loader_returns_patcher(comfyui, pack, loaders, comfy_models):
    import comfy.model_patcher

    vae = loaders.vae(precision="fp32")
    assert isinstance(vae, pack.nodes.types.LoadedVAE)
    assert isinstance(vae.patcher, comfy.model_patcher.ModelPatcher)
    assert vae.patcher.model.inner is vae.vae.model
    assert {p.dtype for p in float_params(vae.vae.model)} == {torch.float32}
    assert vae.precision == "fp32"
    assert comfy_models["vae_folder"] in pack.nodes._comfy.model_choices("vae", want_folders=True)
    folder_vae = loaders.vae(precision="fp32", name=comfy_models["vae_folder"])
    z = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(folder_vae.vae.decode(z), vae.vae.decode(z))


def test_vae_loader_precision(comfyui, loaders):
    assert {p.dtype for p in float_params(loaders.vae(precision="bf16").vae.model)} == {torch.bfloat16}
    # auto on CPU = fp32 (bf16 only where the device computes it natively)
    assert {p.dtype for p in float_params(loaders.vae(precision="auto").vae.model)} == {torch.float32}


# ---------------------------------------------------------------------------------------- missing files
@pytest.mark.parametrize("node, kwargs, folder", [
    ("NewBieDiTLoader", dict(precision="bf16", attention="sdpa", compile=False, device="default"), "diffusion_models"),
    ("NewBieTextEncoderLoader", dict(precision="bf16", device="default"), "text_encoders"),
    ("NewBieVAELoader", dict(precision="fp32", device="default"), "vae"),
])
def test_missing_file_names_folder_and_file(comfyui, pack, comfy_models, node, kwargs, folder):
    cls = getattr(pack.nodes.loaders, node)
    missing = "nope_missing.safetensors"
    if node == "NewBieDiTLoader":
        kwargs = dict(kwargs, dit_name=missing)
    elif node == "NewBieVAELoader":
        kwargs = dict(kwargs, vae_name=missing)
    else:
        kwargs = dict(kwargs, gemma_name=comfy_models["gemma"], jina_name=missing)
    with pytest.raises(pack.newbie_core.errors.ModelFileError) as exc:
        cls.execute(**kwargs)
    msg = str(exc.value)
    assert missing in msg
    assert f"'{folder}'" in msg
    for path in comfyui.folder_paths.get_folder_paths(folder):  # where it looked
        assert path in msg


def test_missing_hf_folder_is_a_model_file_error(comfyui, pack, loaders):
    with pytest.raises(pack.newbie_core.errors.ModelFileError, match="no_such_folder/"):
        loaders.text_encoders(gemma="no_such_folder/")


# --------------------------------------------------------------------------------------- memory manager
def test_every_model_is_managed_by_comfyui(comfyui, loaders):
    mm = comfyui.mm
    enc = loaders.text_encoders(precision="bf16")
    patchers = {"dit": loaders.dit(precision="bf16"), "gemma": enc.gemma_patcher, "jina": enc.jina_patcher,
                "vae": loaders.vae(precision="fp32").patcher}
    for name, patcher in patchers.items():
        mm.load_models_gpu([patcher])
        assert any(p is patcher for p in loaded_patchers(mm)), f"{name} is not in current_loaded_models"
        assert patcher.model_size() > 0, name
        mm.unload_all_models()
        assert not any(p is patcher for p in loaded_patchers(mm)), f"{name} survived unload_all_models()"

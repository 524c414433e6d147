"""LoRA nodes and core LoraLoaderModelOnly on the NewBie MODEL, in-process ComfyUI (CPU), tiny models.

The reference is the core path (`load_dit(..., loras=...)`, checked against hand formulas in tests/core):
ComfyUI's patched weights must equal it; unpatching (another MODEL loaded) must restore the originals bit
for bit.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

FORMATS = ["peft", "kohya", "comfy", "lokr", "diffusers"]


@pytest.fixture(scope="module")
def lora_files(comfyui, comfy_models, tmp_path_factory):
    """Tiny LoRA files in every format, registered as ComfyUI's only `loras` folder; {format: file name}."""
    from newbie_core.tiny.lora import write_tiny_lora

    folder = tmp_path_factory.mktemp("loras")
    names = {fmt: write_tiny_lora(folder / f"tiny_{fmt}.safetensors", fmt, seed=i, alpha=3.0).name
             for i, fmt in enumerate(FORMATS)}
    fp = comfyui.folder_paths
    saved = fp.folder_names_and_paths["loras"]
    fp.folder_names_and_paths["loras"] = ([str(folder)], saved[1])
    fp.filename_list_cache.pop("loras", None)
    yield {**names, "dir": folder}
    fp.folder_names_and_paths["loras"] = saved
    fp.filename_list_cache.pop("loras", None)


def _weights(comfyui, patcher) -> dict[str, torch.Tensor]:
    comfyui.mm.load_models_gpu([patcher])
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _reference(comfy_models, loras, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from newbie_core import load_dit

    dit_file = Path(comfy_models["root"]) / "comfyui" / "diffusion_models" / comfy_models["dit"]
    return load_dit(dit_file, dtype=dtype, loras=loras).state_dict()


def _assert_close(got, want, atol=1e-6):
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v.float(), atol=atol, rtol=1e-5, msg=lambda m: f"{k}: {m}")


def test_lora_node_patches_like_the_core_and_unpatches_bitwise(comfyui, pack, dit, lora_files, comfy_models):
    node = pack.nodes.lora.NewBieLoraLoader
    original = _weights(comfyui, dit)
    out = node.execute(model=dit, lora_name=lora_files["lokr"], strength=0.8)
    patched = out.args[0]
    assert patched is not dit and not dit.patches  # the input MODEL is untouched
    text = "\n".join(out.ui["text"]) if isinstance(out.ui, dict) else str(out.ui.as_dict())
    assert "LyCORIS LoKr" in text and "31 modules matched" in text
    got = _weights(comfyui, patched)
    _assert_close(got, _reference(comfy_models, [(lora_files["dir"] / lora_files["lokr"], 0.8)]))
    assert any(not torch.equal(got[k], original[k]) for k in original)
    back = _weights(comfyui, dit)  # loading the unpatched MODEL restores ComfyUI's backups
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chain_and_multi_equal_core(comfyui, pack, dit, lora_files, comfy_models, fmt):
    other = "kohya" if fmt != "kohya" else "comfy"
    chain = pack.nodes.lora.NewBieLoraLoader.execute(model=dit, lora_name=lora_files[fmt], strength=0.6).args[0]
    chain = pack.nodes.lora.NewBieLoraLoader.execute(model=chain, lora_name=lora_files[other], strength=-0.4).args[0]
    slots = {f"lora_{i}": "None" for i in range(1, 6)} | {f"strength_{i}": 1.0 for i in range(1, 6)}
    slots.update(lora_1=lora_files[fmt], strength_1=0.6, lora_3=lora_files[other], strength_3=-0.4)
    multi = pack.nodes.lora.NewBieLoraLoaderMulti.execute(model=dit, **slots).args[0]
    d = lora_files["dir"]
    ref = _reference(comfy_models, [(d / lora_files[fmt], 0.6), (d / lora_files[other], -0.4)])
    _assert_close(_weights(comfyui, chain), ref)
    _assert_close(_weights(comfyui, multi), ref)


def test_strength_zero_is_identity(comfyui, pack, dit, lora_files):
    original = _weights(comfyui, dit)
    patched = pack.nodes.lora.NewBieLoraLoader.execute(model=dit, lora_name=lora_files["peft"], strength=0.0).args[0]
    got = _weights(comfyui, patched)
    assert all(torch.equal(got[k], original[k]) for k in original)


@pytest.mark.parametrize("fmt", FORMATS)
def test_core_lora_loader_maps_every_format(comfyui, pack, dit, lora_files, comfy_models, fmt, caplog):
    import nodes as comfy_nodes

    with caplog.at_level(logging.WARNING):
        (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(dit, lora_files[fmt], 0.7)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    if fmt == "peft":  # alpha only in the safetensors metadata: core ComfyUI reads `.alpha` tensors only → alpha = r
        from newbie_core.lora import read_lora

        assert read_lora(lora_files["dir"] / lora_files[fmt]).alpha == 3.0
        strength = 0.7 * 4 / 3.0  # what core applies, in our terms (scale 1 instead of alpha/r = 3/4)
    else:
        strength = 0.7
    _assert_close(_weights(comfyui, patched), _reference(comfy_models, [(lora_files["dir"] / lora_files[fmt], strength)]),
                  atol=2e-6)


def test_lora_node_refuses_wrong_family_and_other_models(comfyui, pack, dit, lora_files):
    from safetensors.torch import save_file

    NewBieError = pack.newbie_core.errors.NewBieError  # noqa: N806 - the pack's own copy of the class
    bad = lora_files["dir"] / "sdxl_style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(bad))
    comfyui.folder_paths.filename_list_cache.pop("loras", None)
    with pytest.raises(NewBieError, match="SD1.5/SDXL"):
        pack.nodes.lora.NewBieLoraLoader.execute(model=dit, lora_name=bad.name, strength=1.0)
    bad.unlink()
    comfyui.folder_paths.filename_list_cache.pop("loras", None)
    with pytest.raises(NewBieError, match="NewBie DiT Loader"):
        pack.nodes.lora.NewBieLoraLoader.execute(model=object(), lora_name=lora_files["peft"], strength=1.0)


def test_fp8_model_with_lora(comfyui, pack, loaders, lora_files, comfy_models):
    """fp8 storage: ComfyUI dequantises, adds the patch in fp32 and re-quantises; the forward follows the LoRA."""
    fp8 = loaders.dit(precision="fp8_e4m3fn")
    patched = pack.nodes.lora.NewBieLoraLoader.execute(model=fp8, lora_name=lora_files["kohya"], strength=3.0).args[0]
    g = torch.Generator().manual_seed(0)
    dm = patched.model.diffusion_model
    cfg = dm.config
    args = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4]), torch.randn(1, 5, cfg.cap_feat_dim, generator=g),
            torch.ones(1, 5), torch.randn(1, cfg.clip_text_dim, generator=g))
    from newbie_core import load_dit

    dit_file = Path(comfy_models["root"]) / "comfyui" / "diffusion_models" / comfy_models["dit"]
    with torch.no_grad():
        ref = load_dit(dit_file, dtype=torch.float32, loras=[(lora_files["dir"] / lora_files["kohya"], 3.0)])(*args)
        plain_ref = load_dit(dit_file, dtype=torch.float32)(*args)
        comfyui.mm.load_models_gpu([patched])
        got = dm.velocity(*args).float()
        comfyui.mm.load_models_gpu([fp8])
        plain = fp8.model.diffusion_model.velocity(*args).float()
    effect = (ref - plain_ref).abs().max()
    err, plain_err = (got - ref).abs().max(), (plain - plain_ref).abs().max()
    assert err < 0.25 * effect and err < 3 * plain_err, (err, effect, plain_err)


def test_fp8_lora_unpatch_restores_weights_and_scales_bitwise(comfyui, pack, loaders, lora_files):
    """A patch re-quantises an fp8 weight with fresh scales; unpatching restores weight AND scales bit for bit."""
    fp8 = loaders.dit(precision="fp8_e4m3fn")
    dm = fp8.model.diffusion_model
    before = {n: t.clone() for n, t in list(dm.named_parameters()) + list(dm.named_buffers()) if t is not None}
    patched = pack.nodes.lora.NewBieLoraLoader.execute(model=fp8, lora_name=lora_files["kohya"], strength=3.0).args[0]
    comfyui.mm.load_models_gpu([patched])
    changed = [n for n, t in list(dm.named_parameters()) + list(dm.named_buffers())
               if n in before and not torch.equal(t, before[n])]
    assert any(n.endswith("weight_scale") for n in changed), "the patch recomputed some scales"
    comfyui.mm.load_models_gpu([fp8])  # ComfyUI unpatches the clone to load the plain model
    after = {n: t for n, t in list(dm.named_parameters()) + list(dm.named_buffers()) if t is not None}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_partially_loaded_model_applies_the_lora_per_layer(comfyui, pack, dit, lora_files):
    """ComfyUI's low-VRAM partial loading: weights left off the device get the patch at cast time (LowVramPatch)."""
    patched = pack.nodes.lora.NewBieLoraLoader.execute(model=dit, lora_name=lora_files["diffusers"], strength=1.3).args[0]
    dm = patched.model.diffusion_model
    cfg = dm.config
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]), torch.randn(1, 5, cfg.cap_feat_dim, generator=g),
            torch.ones(1, 5), torch.randn(1, cfg.clip_text_dim, generator=g))
    with torch.no_grad():
        comfyui.mm.load_models_gpu([patched])
        full = dm.velocity(*args)
        comfyui.mm.unload_all_models()
        plain = dit.model.diffusion_model.velocity(*args)
        patched.patch_model(device_to=patched.load_device, lowvram_model_memory=1)  # ~nothing resident
        try:
            lowvram = sum(bool(getattr(m, "weight_function", None)) for m in dm.modules())
            partial = dm.velocity(*args)
        finally:
            patched.unpatch_model(patched.offload_device)
    assert lowvram >= 20  # the patched Linears really went the per-layer way
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=1e-5)
    assert (full - plain).abs().max() > 1e-2

"""Tests for newbie_core.vae and the tiny VAE writer: layouts, scale/shift, tiled decode, OOM fallback, errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from newbie_core import vae as vae_mod
from newbie_core.errors import ModelFileError
from newbie_core.tiny.vae import TINY_VAE_CONFIG, build_tiny_vae, write_tiny_vae
from newbie_core.vae import LATENT_SCALE, LATENT_SHIFT, FluxVAE, load_vae, scale_latents, unscale_latents


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vae")
    return root, write_tiny_vae(root, seed=3)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))


def test_writer_layouts(tiny):
    root, paths = tiny
    assert paths["vae_hf"] == root / "hf" / "vae" and paths["vae_comfyui"] == root / "comfyui" / "vae" / "ae.safetensors"
    cfg = json.loads((paths["vae_hf"] / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["latent_channels"] == 16
    assert cfg["block_out_channels"] == [8, 16, 16, 16] and cfg["norm_num_groups"] == 4
    assert not cfg["use_quant_conv"] and not cfg["use_post_quant_conv"]
    assert (paths["vae_hf"] / "diffusion_pytorch_model.safetensors").is_file()
    bfl = load_file(str(paths["vae_comfyui"]))
    assert "encoder.down.0.block.0.norm1.weight" in bfl and "decoder.up.3.block.0.conv1.weight" in bfl
    assert "encoder.conv_in.weight" in bfl and not any("quant_conv" in k for k in bfl)
    assert bfl["decoder.mid.attn_1.q.weight"].ndim == 4 and bfl["decoder.mid.attn_1.q.weight"].dtype == torch.float32
    # deterministic in the seed
    a, b = build_tiny_vae(3).state_dict(), build_tiny_vae(3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_folder_root_and_single_file_decode_identically(tiny, latents, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("load_vae tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    root, paths = tiny
    ref = load_vae(paths["vae_hf"]).decode(latents)
    assert ref.shape == (1, 3, 64, 64) and ref.dtype == torch.float32
    assert 0.0 <= float(ref.min()) and float(ref.max()) <= 1.0 and float(ref.std()) > 0.05
    for source in (root / "hf", paths["vae_comfyui"], paths["vae_comfyui"].parent):
        assert torch.equal(load_vae(source).decode(latents), ref), source


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
def test_prefixed_all_in_one_file(tiny, latents, tmp_path, prefix):
    _, paths = tiny
    bfl = load_file(str(paths["vae_comfyui"]))
    sd = {prefix + k: v for k, v in bfl.items()}
    sd["model.diffusion_model.x_embedder.weight"] = torch.zeros(4, 4)  # other models in the same file
    f = tmp_path / "all_in_one.safetensors"
    save_file(sd, str(f), metadata={"norm_num_groups": "4"})
    ref = load_vae(paths["vae_hf"]).decode(latents)
    assert torch.equal(load_vae(f).decode(latents), ref)


def test_diffusers_keys_single_file(tiny, latents, tmp_path):
    _, paths = tiny
    sd = load_file(str(paths["vae_hf"] / "diffusion_pytorch_model.safetensors"))
    f = tmp_path / "vae_diffusers_keys.safetensors"
    save_file(sd, str(f), metadata={"norm_num_groups": "4"})
    assert torch.equal(load_vae(f).decode(latents), load_vae(paths["vae_hf"]).decode(latents))


def test_dtype_device_and_config(tiny, latents):
    _, paths = tiny
    v = load_vae(paths["vae_comfyui"], dtype=torch.bfloat16)
    assert isinstance(v, FluxVAE) and v.dtype == torch.bfloat16 and v.device.type == "cpu"
    assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in v.model.parameters())
    assert list(v.model.config.block_out_channels) == TINY_VAE_CONFIG["block_out_channels"]
    for key in ("layers_per_block", "latent_channels", "norm_num_groups", "use_quant_conv", "use_post_quant_conv"):
        assert v.model.config[key] == TINY_VAE_CONFIG[key], key
    out = v.decode(latents)
    assert out.dtype == torch.float32
    ref = load_vae(paths["vae_comfyui"]).decode(latents)
    assert (out - ref).abs().mean() < 0.05  # bf16 decode close to fp32


def test_scale_shift_round_trip_and_encode(tiny):
    z = torch.randn(2, 16, 4, 4)
    assert torch.allclose(unscale_latents(scale_latents(z)), z, atol=1e-6)
    assert torch.allclose(scale_latents(torch.full((1,), LATENT_SHIFT)), torch.zeros(1))
    assert LATENT_SCALE == 0.3611 and LATENT_SHIFT == 0.1159
    v = load_vae(tiny[1]["vae_hf"])
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    lat = v.encode(img)
    assert lat.shape == (1, 16, 8, 8) and lat.dtype == torch.float32
    raw = v.model.encode(img * 2 - 1).latent_dist.mean
    assert torch.allclose(lat, (raw - LATENT_SHIFT) * LATENT_SCALE, atol=1e-6)
    dec = v.decode(lat)
    expected = ((v.model.decode(raw).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(dec, expected, atol=1e-5)


def test_tiled_decode_close_to_full(tiny):
    v = load_vae(tiny[1]["vae_hf"], tile_size=24, tile_overlap=8)
    assert load_vae(tiny[1]["vae_hf"]).tile_size == 64  # realistic default (512 px), not the tiny sample_size
    z = torch.randn(1, 16, 40, 28, generator=torch.Generator().manual_seed(2))  # 2×2 tiles
    full, tiled = v.decode(z), v.decode(z, tiled=True)
    assert tiled.shape == full.shape == (1, 3, 320, 224)
    assert 0.0 <= float(tiled.min()) and float(tiled.max()) <= 1.0
    other = v.decode(torch.randn(1, 16, 40, 28, generator=torch.Generator().manual_seed(3)))
    err, unrelated = (tiled - full).abs().mean(), (other - full).abs().mean()
    assert err < 0.03 and err < 0.2 * unrelated
    # a latent that fits one tile decodes exactly like the full path
    small = z[:, :, :16, :16]
    assert torch.allclose(v.decode(small, tiled=True), v.decode(small), atol=1e-5)


def test_oom_fallback(tiny, latents, monkeypatch, caplog):
    v = load_vae(tiny[1]["vae_hf"], tile_size=4, tile_overlap=1)
    ref = v.decode(latents)
    state = {"calls": 0, "freed": 0}
    real_decode = v.model.decode

    def failing_decode(*a, **k):
        state["calls"] += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(v.model, "decode", failing_decode)
    monkeypatch.setattr(vae_mod, "empty_device_cache", lambda *a, **k: state.__setitem__("freed", state["freed"] + 1))
    with caplog.at_level("WARNING", logger="newbie_core.vae"):
        images, used_tiled = v.decode_with_fallback(latents)
    assert used_tiled is True and state["calls"] == 1 and state["freed"] >= 1
    assert images.shape == ref.shape and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert (images - ref).abs().mean() < 0.1
    assert "out of memory" in caplog.text
    monkeypatch.setattr(v.model, "decode", real_decode)
    images, used_tiled = v.decode_with_fallback(latents)
    assert used_tiled is False and torch.equal(images, ref)


def test_non_oom_errors_propagate(tiny, latents, monkeypatch):
    v = load_vae(tiny[1]["vae_hf"])

    def broken(*a, **k):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(v.model, "decode", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        v.decode_with_fallback(latents)


def test_wrong_family_and_missing_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_vae(tmp_path / "missing.safetensors")
    gemma = tmp_path / "gemma.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
               "model.layers.0.pre_feedforward_layernorm.weight": torch.zeros(2)}, str(gemma))
    with pytest.raises(ModelFileError) as e:
        load_vae(gemma)
    msg = str(e.value)
    assert str(gemma) in msg and "Gemma" in msg and "ae.safetensors" in msg and "NewBie-image-Exp0.1" in msg
    dit = tmp_path / "dit.safetensors"
    save_file({"cap_embedder.1.weight": torch.zeros(2, 2), "clip_text_pooled_proj.1.weight": torch.zeros(2, 2)}, str(dit))
    with pytest.raises(ModelFileError, match="NewBie-image DiT"):
        load_vae(dit)
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "Lumina2Transformer2DModel"}))
    with pytest.raises(ModelFileError, match="Lumina2Transformer2DModel"):
        load_vae(folder)
    with pytest.raises(ModelFileError, match="without a VAE"):
        load_vae(tmp_path)


def test_sd_style_vae_is_refused(tmp_path):
    from diffusers import AutoencoderKL

    from newbie_core.vae import diffusers_to_bfl_vae

    cfg = dict(TINY_VAE_CONFIG, latent_channels=4)
    sd = diffusers_to_bfl_vae(AutoencoderKL.from_config(cfg).state_dict())
    f = tmp_path / "sdxl_vae.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f), metadata={"norm_num_groups": "4"})
    with pytest.raises(ModelFileError, match="4 latent channels"):
        load_vae(f)


def test_tiled_oom_halves_the_tile_then_gives_up(tiny, latents, monkeypatch):
    v = load_vae(tiny[1]["vae_hf"], tile_size=32, tile_overlap=8)
    oom = torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(v.model, "decode", lambda *a, **k: (_ for _ in ()).throw(oom))
    real, tiles = v._decode_tiled, []

    def tiled(z, tile=None):
        tiles.append(tile)
        if tile > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(z, tile)

    monkeypatch.setattr(v, "_decode_tiled", tiled)
    images, used_tiled = v.decode_with_fallback(latents)
    assert used_tiled and tiles == [32, 16] and images.shape == (1, 3, 64, 64)
    monkeypatch.setattr(v, "_decode_tiled", lambda z, tile=None: (_ for _ in ()).throw(oom))
    with pytest.raises(torch.OutOfMemoryError):
        v.decode_with_fallback(latents)


def test_decode_rejects_wrong_latents(tiny):
    from newbie_core.errors import InputError

    v = load_vae(tiny[1]["vae_hf"])
    with pytest.raises(InputError, match=r"\[B,16,h,w\]"):
        v.decode(torch.zeros(1, 4, 8, 8))


def test_tiled_encode_close_to_full_and_input_checks(tiny):
    from newbie_core.errors import InputError

    v = load_vae(tiny[1]["vae_hf"], tile_size=4, tile_overlap=2)  # 32 px tiles over a 48×64 picture
    img = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    full, tiled = v.encode(img), v.encode(img, tiled=True)
    assert tiled.shape == full.shape == (2, 16, 6, 8)
    assert torch.allclose(v.encode(img, tiled=True, tile=8), full, atol=1e-5)  # one tile covering it all = full
    other = v.encode(torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(tiled, full)  # blended tiles: near the full encode, far from another picture's
    assert (tiled - full).abs().mean() < 0.5 * (other - full).abs().mean()
    assert torch.equal(v.encode_with_fallback(img)[0], full)
    with pytest.raises(InputError, match="multiples of 8"):
        v.encode(torch.rand(1, 3, 50, 64))


def test_encode_falls_back_to_tiles_after_out_of_memory(tiny, monkeypatch):
    v = load_vae(tiny[1]["vae_hf"], tile_size=4, tile_overlap=2)
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    real = v._encode_mean

    def fake(x):
        if x.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(v, "_encode_mean", fake)
    z, used_tiled = v.encode_with_fallback(img)
    assert used_tiled and z.shape == (1, 16, 8, 8)

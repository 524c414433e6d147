"""NewBie VAE Decode: IMAGE format, tiled decode, OOM fallback to tiles, precision."""
from __future__ import annotations

import pytest
import torch


def latent(b=2, h=4, w=4, seed=0) -> dict:
    """A LATENT as NewBie DiT Sampler outputs it: unscaled FLUX latents."""
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(b, 16, h, w, generator=g) * 1.5 + 0.1}


def decode(pack, vae, samples, precision="auto", tiled=False):
    out = pack.nodes.vae_decode.NewBieVAEDecode.execute(vae=vae, samples=samples, precision=precision, tiled=tiled)
    return out.args[0], out.ui.as_dict()["text"][0]


@pytest.fixture
def fresh_vae(loaders):
    """A VAE of its own (these tests change its precision, tiling and decode method)."""
    return loaders.vae(precision="fp32")


def test_image_output_format(pack, vae):
    image, note = decode(pack, vae, latent(b=2, h=4, w=6))
    assert image.shape == (2, 32, 48, 3)  # [B,H,W,C], 8 px per latent pixel
    assert image.dtype == torch.float32 and image.device.type == "cpu"
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.std()) > 0.0
    assert "(32, 48)" in note and "fp32" in note and "tiled" not in note


def test_image_matches_the_core_decode_of_scaled_latents(pack, vae):
    """The node scales the (unscaled) LATENT, so it equals FluxVAE.decode(scale_latents(z)) -> permuted."""
    samples = latent(b=1)
    image, _ = decode(pack, vae, samples)
    ref = vae.vae.decode(pack.newbie_core.vae.scale_latents(samples["samples"]))
    torch.testing.assert_close(image, ref.permute(0, 2, 3, 1))


def test_tiled_on_request_is_close_to_full(pack, fresh_vae):
    fresh_vae.vae.tile_size, fresh_vae.vae.tile_overlap = 12, 4  # 96 px tiles, so a 128 px image really is tiled
    calls = []
    decoder = fresh_vae.vae.model.decoder
    handle = decoder.register_forward_pre_hook(lambda mod, args: calls.append(tuple(args[0].shape[-2:])))
    try:
        samples = latent(b=1, h=16, w=16)
        full, _ = decode(pack, fresh_vae, samples)
        n_full = len(calls)
        tiled, note = decode(pack, fresh_vae, samples, tiled=True)
        unrelated, _ = decode(pack, fresh_vae, latent(b=1, h=16, w=16, seed=5))
    finally:
        handle.remove()
    assert n_full == 1 and calls[0] == (16, 16)
    tiles = calls[n_full:n_full + 4]
    assert len(tiles) == 4 and all(t == (12, 12) for t in tiles)  # 2×2 overlapping tiles
    assert tiled.shape == full.shape
    assert "tiled" in note and "out of memory" not in note
    diff = (tiled - full).abs().mean()
    assert 0 < diff < 0.05  # seams of a random-weight decoder; real images are far closer
    assert diff < 0.2 * (unrelated - full).abs().mean()


def test_oom_in_full_decode_falls_back_to_tiles(pack, fresh_vae, monkeypatch):
    samples = latent(b=1, h=8, w=8)
    expected, _ = decode(pack, fresh_vae, samples, tiled=True)
    full_decode = fresh_vae.vae.model.decode
    raised = []

    def oom_once(*args, **kwargs):
        if not raised:
            raised.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return full_decode(*args, **kwargs)

    monkeypatch.setattr(fresh_vae.vae.model, "decode", oom_once)
    image, note = decode(pack, fresh_vae, samples)
    assert raised == [True]
    assert "out of memory" in note and "tiles" in note
    torch.testing.assert_close(image, expected)


def test_other_errors_in_full_decode_are_not_swallowed(pack, fresh_vae, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(fresh_vae.vae.model, "decode", broken)
    with pytest.raises(RuntimeError, match="something else"):
        decode(pack, fresh_vae, latent(b=1))


def test_precision_changes_the_vae_weights_dtype(pack, fresh_vae):
    samples = latent(b=1)
    img32, note32 = decode(pack, fresh_vae, samples, precision="fp32")
    assert {p.dtype for p in fresh_vae.vae.model.parameters()} == {torch.float32}
    img16, note16 = decode(pack, fresh_vae, samples, precision="bf16")
    assert {p.dtype for p in fresh_vae.vae.model.parameters()} == {torch.bfloat16}
    assert "bf16" in note16 and "fp32" in note32
    assert img16.dtype == torch.float32  # IMAGE is always float32
    assert (img16 - img32).abs().max() < 0.1 and not torch.equal(img16, img32)
    # auto = the loader's precision (fp32 here)
    decode(pack, fresh_vae, samples, precision="auto")
    assert {p.dtype for p in fresh_vae.vae.model.parameters()} == {torch.float32}


def test_memory_estimate_follows_the_vae_precision(comfyui, pack, loaders):
    vae = loaders.vae(precision="bf16")  # the tiny file is fp32
    assert vae.patcher.model_size() == comfyui.mm.module_size(vae.patcher.model)
    decode(pack, vae, latent(b=1), precision="fp32")
    assert vae.patcher.model_size() == comfyui.mm.module_size(vae.patcher.model)

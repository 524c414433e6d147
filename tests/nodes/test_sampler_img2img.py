"""img2img / inpainting / interop in-process: NewBie VAE Encode, the sampler's denoise + LATENT content, core latent
and conditioning nodes on our types (ComfyUI's own node classes, called as the server would)."""
from __future__ import annotations

import pytest
import torch

from test_sampler import SIZE, conds, sampler  # noqa: F401  (the sampler tests' fixtures)


def image(b=1, h=SIZE, w=SIZE, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def encode(pack, vae, pixels, tiled=False, precision="fp32"):
    out = pack.nodes.vae_encode.NewBieVAEEncode.execute(vae=vae, pixels=pixels, precision=precision, tiled=tiled)
    return out.args[0], out.ui.as_dict()["text"][0]


# ------------------------------------------------------------------------------------------ VAE Encode
def test_vae_encode_gives_unscaled_latents_of_the_cropped_image(pack, vae):
    pixels = image(2, 40, 50)  # → centre crop 32×48
    latent, note = encode(pack, vae, pixels)
    z = latent["samples"]
    assert z.shape == (2, 16, 4, 6) and z.device.type == "cpu" and "fp32" in note
    core = pack.newbie_core
    ref = core.vae.unscale_latents(vae.vae.encode(pixels[:, 4:36, 1:49].movedim(-1, 1)))
    torch.testing.assert_close(z, ref)
    tiled, note = encode(pack, vae, pixels, tiled=True)
    assert tiled["samples"].shape == z.shape and "tiled" in note


def test_vae_encode_drops_alpha_and_decodes_back(pack, vae):
    rgba = torch.cat([image(), torch.ones(1, SIZE, SIZE, 1)], dim=-1)
    z, _ = encode(pack, vae, rgba)
    assert torch.equal(z["samples"], encode(pack, vae, rgba[..., :3])[0]["samples"])


# ------------------------------------------------------------------------------------- sampler + LATENT
def test_denoise_one_on_an_empty_latent_is_todays_output(sampler):
    today = sampler()["samples"]
    for channels in (4, 16):  # core EmptyLatentImage (4 ch) / EmptySD3LatentImage (16 ch)
        empty = {"samples": torch.zeros(1, channels, SIZE // 8, SIZE // 8)}
        assert torch.equal(sampler(latent=empty, denoise=1.0)["samples"], today)


def test_core_empty_latent_nodes_feed_the_sampler(sampler):
    import nodes

    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    (sd3,) = EmptySD3LatentImage.execute(SIZE, SIZE, 2).args
    (sd,) = nodes.EmptyLatentImage().generate(SIZE, SIZE, 2)
    a, b = sampler(latent=sd3)["samples"], sampler(latent=sd)["samples"]
    assert a.shape == b.shape == (2, 16, 4, 4) and torch.equal(a, b)


def test_denoise_zero_returns_the_input_and_partial_denoise_stays_close(pack, vae, sampler):
    latent, _ = encode(pack, vae, image())
    z = latent["samples"]
    torch.testing.assert_close(sampler(latent=latent, denoise=0.0)["samples"], z)
    half = sampler(latent=latent, denoise=0.5)["samples"]
    full = sampler(latent=latent, denoise=1.0)["samples"]
    assert (half - z).abs().mean() < (full - z).abs().mean()


def test_set_latent_noise_mask_keeps_the_unmasked_latents(pack, vae, sampler):
    import nodes

    latent, _ = encode(pack, vae, image())
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, :, SIZE // 2:] = 1.0  # repaint the right half
    (masked,) = nodes.SetLatentNoiseMask().set_mask(latent, mask)
    outs = [sampler(latent=masked, denoise=1.0, seed=s)["samples"] for s in (1, 2)]
    for out in outs:
        torch.testing.assert_close(out[..., :2], latent["samples"][..., :2])
    assert not torch.allclose(outs[0][..., 2:], outs[1][..., 2:])


def test_upscale_latent_and_batch_index(pack, vae, sampler):
    import nodes

    latent, _ = encode(pack, vae, image(2))
    (up,) = nodes.LatentUpscaleBy().upscale(latent, "nearest-exact", 1.5)
    assert sampler(latent=up, denoise=0.5)["samples"].shape == (2, 16, 6, 6)
    (second,) = nodes.LatentFromBatch().frombatch(latent, 1, 1)  # batch_index [1]: the noise it had in the batch
    both = sampler(latent=latent, denoise=0.5, seed=3)["samples"]
    alone = sampler(latent=second, denoise=0.5, seed=3)["samples"]
    torch.testing.assert_close(alone, both[1:], atol=1e-4, rtol=1e-4)


def test_content_latent_of_another_family_is_refused(sampler):
    from comfy_api.latest import io  # noqa: F401 - ComfyUI is loaded

    with pytest.raises(Exception, match="4 channels"):
        sampler(latent={"samples": torch.randn(1, 4, 4, 4)}, denoise=0.5)
    with pytest.raises(Exception, match="empty"):
        sampler(latent={"samples": torch.zeros(1, 16, 4, 4)}, denoise=0.5)


# ------------------------------------------------------------------------------ conditioning interop
def test_conditioning_zero_out_is_accepted(pack, conds, sampler):
    import nodes

    (zero,) = nodes.ConditioningZeroOut().zero_out(conds[1])
    assert float(zero[0][0].abs().sum()) == 0.0 and float(zero[0][1]["pooled_output"].abs().sum()) == 0.0
    a = sampler(negative=zero, cfg_trunc=1.0)["samples"]
    assert torch.isfinite(a).all() and not torch.equal(a, sampler(cfg_trunc=1.0)["samples"])


def test_conditioning_concat_appends_real_tokens(pack, conds, sampler, dit):
    import nodes

    (cat,) = nodes.ConditioningConcat().concat(conds[0], conds[1])
    emb = pack.nodes.text_encode.from_conditioning(cat, "positive")
    assert emb.cap_feats.shape[1] == 16 and emb.cap_mask.tolist() == [[1] * 14 + [0] * 2]  # 6 + 8 real, pads last
    (a, _), (b, _) = conds[0][0], conds[1][0]
    assert torch.equal(emb.cap_feats[:, :14], torch.cat([a[:, :6], b], dim=1))
    assert torch.equal(emb.pooled, conds[0][0][1]["pooled_output"])
    assert torch.isfinite(sampler(positive=cat)["samples"]).all()


def test_combine_and_timestep_range_are_refused_with_the_alternative(pack, conds, sampler):
    import nodes

    (combined,) = nodes.ConditioningCombine().combine(conds[0], conds[1])
    with pytest.raises(Exception, match="2 entries.*core KSampler"):
        sampler(positive=combined)
    (ranged,) = nodes.ConditioningSetTimestepRange().set_range(conds[0], 0.0, 0.5)
    with pytest.raises(Exception, match="Timestep Range.*core KSampler"):
        sampler(positive=ranged)
    (area,) = nodes.ConditioningSetArea().append(conds[0], 16, 16, 0, 0, 1.0)
    with pytest.raises(Exception, match="Set Area"):
        sampler(positive=area)


def test_native_and_fork_conditioning_layouts_give_the_same_result(conds, sampler):
    """Upstream ComfyUI's NewBie encoder: features + attention_mask + pooled_output (our layout);
    ComfyUI-NewBie 0.4.0: cap_mask / clip_text_pooled (and cap_feats)."""
    (feats, extra), (ufeats, uextra) = conds[0][0], conds[1][0]
    fork = [[feats, {"cap_feats": feats, "cap_mask": extra["attention_mask"].bool(),
                     "clip_text_pooled": extra["pooled_output"]}]]
    ufork = [[ufeats, {"cap_mask": uextra["attention_mask"], "clip_text_pooled": uextra["pooled_output"]}]]
    assert torch.equal(sampler(positive=fork, negative=ufork)["samples"], sampler()["samples"])

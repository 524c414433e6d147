"""img2img / inpainting math: sampling.sample(init=, denoise=, noise_mask=), sampling.schedule, newbie_core.img2img."""
from __future__ import annotations

import pytest
import torch

from newbie_core import img2img
from newbie_core.errors import InputError
from newbie_core.sampling import SOLVERS, dpm_sigmas, make_noise, sample, schedule, time_grid
from newbie_core.vae import scale_latents


def _toy_v(x, t):
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return -x * (0.5 + t) + 0.3 * torch.sin(3.0 * x) + t


def _pair(seed=0, shape=(2, 16, 6, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _reference_fixed_grid(noise, steps, shift, midpoint):
    """Text-to-image as the code did before img2img (torchdiffeq fixed grid on time_grid), written out."""
    grid, x = time_grid(steps, shift), noise.float()
    for i in range(steps - 1):
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        f0 = _toy_v(x, torch.full((x.shape[0],), float(t0)))
        if midpoint:
            t_mid = t0 + 0.5 * dt
            f0 = _toy_v(x + f0 * (0.5 * dt).item(), torch.full((x.shape[0],), float(t_mid)))
        x = x + dt.item() * f0
    return x


@pytest.mark.parametrize("solver", SOLVERS)
def test_denoise_one_is_text_to_image_bitwise(solver):
    noise, init = _pair()
    plain = sample(_toy_v, noise, 6, solver, 6.0)
    for kwargs in ({"denoise": 1.0}, {"init": init, "denoise": 1.0}, {"init": init}):
        assert torch.equal(sample(_toy_v, noise, 6, solver, 6.0, **kwargs), plain), kwargs
    if solver != "dpmpp_2m":
        assert torch.equal(plain, _reference_fixed_grid(noise, 6, 6.0, solver == "midpoint"))


@pytest.mark.parametrize("solver", SOLVERS)
def test_denoise_zero_returns_the_input(solver):
    noise, init = _pair()
    calls = []
    out = sample(lambda x, t: calls.append(1) or _toy_v(x, t), noise, 6, solver, 6.0, init=init, denoise=0.0)
    assert torch.equal(out, init) and not calls


def test_schedule_is_the_tail_of_the_longer_one():
    # euler/midpoint: steps = grid points; 6 points = 5 intervals; denoise 0.5 → the last 5 of 10 intervals.
    assert torch.equal(schedule(6, "euler", 6.0, 0.5), time_grid(11, 6.0)[-6:])
    assert torch.equal(schedule(6, "midpoint", 6.0), time_grid(6, 6.0))
    # dpmpp_2m: steps = intervals; denoise 0.4 → the last 5 of int(5 / 0.4) = 12 intervals.
    assert torch.equal(schedule(5, "dpmpp_2m", 6.0, 0.4), 1.0 - dpm_sigmas(12, 6.0)[-6:])
    assert float(schedule(18, "euler", 6.0, 0.3)[-1]) == 1.0
    with pytest.raises(InputError, match="denoise"):
        schedule(6, "euler", 6.0, 1.5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_partial_denoise_starts_from_the_renoised_input(solver):
    noise, init = _pair()
    seen = []

    def v(x, t):
        seen.append((x.clone(), float(t[0])))
        return _toy_v(x, t)

    out = sample(v, noise, 6, solver, 6.0, init=init, denoise=0.5)
    t0 = float(schedule(6, solver, 6.0, 0.5)[0])
    assert 0.0 < t0 < 1.0 and seen[0][1] == pytest.approx(t0)
    assert torch.allclose(seen[0][0], t0 * init + (1 - t0) * noise, atol=1e-6)
    n_evals = {"euler": 5, "midpoint": 10, "dpmpp_2m": 6}[solver]
    assert len(seen) == n_evals  # same model evaluations as at denoise 1 (evaluations())
    # closer to the input than text-to-image from the same noise
    t2i = sample(_toy_v, noise, 6, solver, 6.0)
    assert (out - init).abs().mean() < (t2i - init).abs().mean()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_kept_region_is_the_renoised_input_at_every_step(solver, denoise):
    noise, init = _pair(1, (1, 16, 8, 8))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1.0  # regenerate the centre
    keep = (mask == 0).expand_as(init)
    model_inputs, states = [], []

    def v(x, t):
        model_inputs.append((x.clone(), float(t[0])))
        return _toy_v(x, t)

    out = sample(v, noise, 6, solver, 6.0, init=init, denoise=denoise, noise_mask=mask,
                 callback=lambda info: states.append((info.x.clone(), info.t)))
    for x, t in model_inputs + states:
        expected = t * init + (1 - t) * noise
        assert torch.allclose(x[keep], expected[keep], atol=1e-6), t
    assert torch.equal(out[keep], init[keep])  # exactly the input at the end
    assert not torch.allclose(out[~keep], init[~keep], atol=1e-2)  # the masked centre was regenerated
    unmasked = sample(_toy_v, noise, 6, solver, 6.0, init=init, denoise=denoise)
    assert not torch.equal(out, unmasked)


def test_sample_refuses_what_it_cannot_do():
    noise, init = _pair()
    with pytest.raises(InputError, match="input latent"):
        sample(_toy_v, noise, 6, "euler", 6.0, denoise=0.5)
    with pytest.raises(InputError, match="input latent"):
        sample(_toy_v, noise, 6, "euler", 6.0, noise_mask=torch.ones(1, 1, 6, 8))
    with pytest.raises(InputError, match="shape"):
        sample(_toy_v, noise, 6, "euler", 6.0, init=init[:1], denoise=0.5)
    with pytest.raises(InputError, match="mask"):
        sample(_toy_v, noise, 6, "euler", 6.0, init=init, noise_mask=torch.ones(3, 1, 6, 8))
    with pytest.raises(InputError, match="denoise"):
        sample(_toy_v, noise, 6, "euler", 6.0, init=init, denoise=-0.1)


# ----------------------------------------------------------------------------------- LATENT → sampler start
def test_empty_latent_is_text_to_image_with_todays_noise():
    for channels in (4, 16):  # EmptyLatentImage (4 ch) and EmptySD3LatentImage (16 ch)
        start = img2img.sampler_start({"samples": torch.zeros(2, channels, 8, 6)}, seed=7, denoise=1.0)
        assert start.init is None and start.noise_mask is None
        assert torch.equal(start.noise, make_noise(7, 2, 8, 6, 16))
    with pytest.raises(InputError, match="empty"):
        img2img.sampler_start({"samples": torch.zeros(1, 16, 8, 8)}, seed=0, denoise=0.5)


def test_content_latent_is_scaled_and_checked():
    z = torch.randn(1, 16, 8, 8)
    start = img2img.sampler_start({"samples": z}, seed=0, denoise=0.5)
    assert torch.equal(start.init, scale_latents(z))
    with pytest.raises(InputError, match="4 channels"):
        img2img.sampler_start({"samples": torch.randn(1, 4, 8, 8)}, seed=0, denoise=0.5)


def test_batch_index_noise_matches_comfyui_prepare_noise():
    shape = (2, 16, 4, 4)
    gen = torch.manual_seed(3)  # ComfyUI's prepare_noise, written out: one draw per index up to the largest
    draws = [torch.randn((1, 16, 4, 4), generator=gen) for _ in range(6)]
    noise = img2img.prepare_noise(3, shape, [5, 2])
    assert torch.equal(noise, torch.cat([draws[5], draws[2]]))
    assert torch.equal(img2img.prepare_noise(3, shape, None), make_noise(3, 2, 4, 4, 16))
    with pytest.raises(InputError, match="batch_index"):
        img2img.prepare_noise(3, shape, [1])


def test_mask_is_resized_like_comfyui():
    pixel_mask = torch.zeros(1, 64, 48)
    pixel_mask[:, :32] = 1.0
    m = img2img.prepare_mask(pixel_mask, (3, 16, 8, 6))
    assert m.shape == (3, 16, 8, 6)
    assert torch.equal(m[:, :, :4], torch.ones(3, 16, 4, 6)) and torch.equal(m[:, :, 4:], torch.zeros(3, 16, 4, 6))
    start = img2img.sampler_start({"samples": torch.randn(3, 16, 8, 6), "noise_mask": pixel_mask}, 0, 1.0)
    assert torch.equal(start.noise_mask, m)


def test_crop_to_multiple_of_16():
    img = torch.rand(1, 3, 70, 100)
    out = img2img.crop_to_multiple(img)
    assert out.shape == (1, 3, 64, 96) and torch.equal(out, img[..., 3:67, 2:98])
    with pytest.raises(InputError, match="at least"):
        img2img.crop_to_multiple(torch.rand(1, 3, 8, 100))

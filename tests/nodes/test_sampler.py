"""NewBie DiT Sampler: LATENT shape and convention (unscaled), determinism, size errors, latent input, progress, cancel."""
from __future__ import annotations

import pytest
import torch

SIZE = 32  # pixels: latent 4×4, 2×2 patches of the tiny DiT


def conditioning(dm, n_tokens: int, seed: int, padded_len: int = 8) -> list:
    """A core CONDITIONING as NewBie Text Encode makes it: right-padded caption mask, pooled Jina vector."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, padded_len, dm.config.cap_feat_dim, generator=g)
    mask = (torch.arange(padded_len) < n_tokens).long()[None]
    return [[feats, {"attention_mask": mask, "pooled_output": torch.randn(1, dm.config.clip_text_dim, generator=g)}]]


@pytest.fixture(scope="module")
def conds(dit):
    dm = dit.model.diffusion_model
    return conditioning(dm, 6, seed=1), conditioning(dm, 1, seed=2)


@pytest.fixture
def sampler(pack, dit, conds):
    """Call NewBieDiTSampler.execute; keyword arguments override the small defaults."""
    def run(**overrides):
        kw = dict(model=dit, positive=conds[0], negative=conds[1], seed=7, steps=4, cfg=3.0, shift=6.0,
                  solver="euler", cfg_trunc=0.5, renorm=0.0, width=SIZE, height=SIZE, batch_size=1)
        kw.update(overrides)
        return pack.nodes.sampler.NewBieDiTSampler.execute(**kw).args[0]
    return run


def reference_sample(pack, dm, conds, seed, b, h, w, steps, cfg, cfg_trunc, solver, shift):
    """The core math, one prompt at a time (no batching/padding): guided velocity → newbie_core.sampling.sample."""
    core = pack.newbie_core
    (cf, cx), (uf, ux) = conds[0][0], conds[1][0]

    def one(x, t, feats, extra):
        n = int(extra["attention_mask"].sum())  # unpadded caption
        return dm.velocity(x, t, feats[:, :n].expand(x.shape[0], -1, -1), extra["attention_mask"][:, :n].expand(x.shape[0], -1),
                           extra["pooled_output"].expand(x.shape[0], -1)).float()

    def velocity(x, t):
        c = one(x, t, cf, cx)
        if float(t[0]) >= cfg_trunc:
            return c
        u = one(x, t, uf, ux)
        return u + cfg * (c - u)

    noise = core.sampling.make_noise(seed, b, h, w, 16)
    return core.sampling.sample(velocity, noise, steps, solver, shift)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_output_is_unscaled_latent_matching_the_core_sampler(pack, dit, conds, sampler, solver):
    out = sampler(solver=solver, batch_size=2)
    assert set(out) == {"samples"}
    samples = out["samples"]
    assert samples.shape == (2, 16, SIZE // 8, SIZE // 8)
    assert samples.dtype == torch.float32 and samples.device.type == "cpu"
    ref = reference_sample(pack, dit.model.diffusion_model, conds, seed=7, b=2, h=SIZE // 8, w=SIZE // 8, steps=4,
                           cfg=3.0, cfg_trunc=0.5, solver=solver, shift=6.0)
    # LATENT holds unscaled VAE latents (as core nodes expect): scaling them gives the sampler's state back
    torch.testing.assert_close(pack.newbie_core.vae.scale_latents(samples), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(samples, ref, atol=1e-2)


def test_same_seed_is_identical_other_seed_differs(sampler):
    a, b, c = sampler(seed=123)["samples"], sampler(seed=123)["samples"], sampler(seed=124)["samples"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("width, height, nearest", [(44, 32, "48×32"), (32, 100, "32×96"), (1010, 1020, "1008×1024")])
def test_size_not_multiple_of_16_names_nearest_valid_size(pack, sampler, width, height, nearest):
    with pytest.raises(pack.newbie_core.errors.InputError, match="multiples of 16") as exc:
        sampler(width=width, height=height)
    assert nearest in str(exc.value)


def test_latent_input_sets_size_and_batch(sampler):
    latent = {"samples": torch.zeros(3, 16, 6, 4)}  # 32 px wide, 48 px high
    out = sampler(latent=latent, width=1024, height=1024, batch_size=1)["samples"]
    assert out.shape == (3, 16, 6, 4)
    # the same as asking for that size and batch directly
    torch.testing.assert_close(out, sampler(width=32, height=48, batch_size=3)["samples"])


@pytest.mark.parametrize("solver, steps, ticks", [("euler", 4, 3), ("midpoint", 3, 2), ("dpmpp_2m", 3, 3)])
def test_progress_ticks_once_per_interval(monkeypatch, sampler, solver, steps, ticks):
    import comfy.utils

    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        seen.append((value, total)))
    sampler(solver=solver, steps=steps)
    assert seen == [(i + 1, ticks) for i in range(ticks)]


def test_interrupt_from_progress_hook_stops_sampling(monkeypatch, comfyui, pack, sampler):
    """The server's hook (main.py hijack_progress) checks the interrupt flag first: Cancel stops at the next tick."""
    import comfy.utils

    mm = comfyui.mm
    calls = {"hook": 0}

    def hook(value, total, preview, node_id=None):
        calls["hook"] += 1
        mm.throw_exception_if_processing_interrupted()
        if value == 1:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 1

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    steps_done = []
    real_progress = pack.nodes._comfy.sampler_progress

    def recording_progress(patcher, total):
        on_step = real_progress(patcher, total)

        def wrapped(info):
            steps_done.append(info.step)
            on_step(info)
        return wrapped

    monkeypatch.setattr(pack.nodes._comfy, "sampler_progress", recording_progress)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sampler(steps=6)
        # tick 1 set the flag. ComfyUI 0.3.64 raises at tick 2; newer ComfyUI (comfy.ops.run_every_op) already
        # raises in the first comfy.ops layer of the next model call, before its tick.
        import comfy.ops

        per_op = hasattr(comfy.ops, "run_every_op")
        assert calls["hook"] == (1 if per_op else 2)
        assert steps_done == ([0] if per_op else [0, 1])  # the remaining intervals never ran
    finally:
        mm.interrupt_current_processing(False)
    assert not mm.processing_interrupted()
    sampler(steps=2)  # and the next run works again


def test_progress_sends_latent_previews(monkeypatch, sampler):
    """With --preview-method latent2rgb, every tick carries a preview image of x0 (Flux latent format)."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    previews = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        previews.append(preview))
    sampler(steps=3)
    assert len(previews) == 2
    for kind, image, _max_size in previews:
        assert kind == "JPEG" and image.size == (SIZE // 8, SIZE // 8)


def test_a_model_from_another_loader_gets_a_clear_error(pack, conds, sampler):
    import comfy.model_patcher

    class OtherModel(torch.nn.Module):  # what core "Load Diffusion Model" gives for e.g. Lumina 2
        def __init__(self):
            super().__init__()
            self.diffusion_model = torch.nn.Linear(2, 2)

    other = comfy.model_patcher.ModelPatcher(OtherModel(), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(pack.newbie_core.errors.InputError, match="NewBie DiT Loader"):
        sampler(model=other)

"""Tests for newbie_core.sampling: grid + shift, official CFG / cfg_trunc / renorm, solvers, noise, sizes."""
from __future__ import annotations

import math

import pytest
import torch

from newbie_core import sampling
from newbie_core.errors import InputError, InterruptedByUser
from newbie_core.sampling import GuidedVelocity, StepInfo, evaluations, make_noise, sample, time_grid
from newbie_core.sizes import validate_size

# --------------------------------------------------------------------------------------------------------------
# Reference numbers from the OFFICIAL code (NewBieAI-Lab/NewBie-image-Exp0.1 `transport/`, torchdiffeq 0.2.5),
# made once by a throwaway script (not part of the repo): the official `Sampler.sample_dpm(model)(noise, steps=N,
# order=2, skip_type="time_uniform_flow", method="multistep", flow_shift=s)` run in float64, and the official
# `Sampler.sample_ode(sampling_method=..., num_steps=6, time_shifting_factor=6)` (fp32, torchdiffeq fixed grid),
# both on the toy velocity `_toy_v` below from `_toy_noise()`. Final states, flattened, rounded to 1e-8.
# --------------------------------------------------------------------------------------------------------------
OFFICIAL_DPM = {  # (steps, shift): final x; the official made `steps` model calls
    (5, 6.0): [0.65210302, 0.72164, -0.21856463, -0.25067413, 0.7307495, 0.72923884, -0.25073488, -0.14229198],
    (8, 3.0): [0.67753196, 0.83780747, -0.11317197, -0.21443882, 0.80453825, 0.774092, -0.24891131, -0.00162844],
    (2, 6.0): [0.57746893, 0.54045911, -0.41320525, -0.3426855, 0.60486688, 0.65019441, -0.30382458, -0.37727],
}
OFFICIAL_DPM_TIMES_5_6 = [0.00016677379608154297, 0.040192246437072754, 0.10022515058517456,
                          0.20026683807373047, 0.40030014514923096]  # model t of the 5 calls (steps 5, shift 6)
OFFICIAL_ODE_6_6 = {  # 6 grid points, shift 6 (5 intervals): euler 5 calls, midpoint 10 calls
    "euler": [0.64847523, 0.72253323, -0.22419137, -0.25109929, 0.73097324, 0.72866505, -0.25036728, -0.15445796],
    "midpoint": [0.68785506, 0.92167526, -0.06444138, -0.19381785, 0.85584641, 0.80364692, -0.2467972, 0.05402827],
}


def _toy_v(x, t):
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return -x * (0.5 + t) + 0.3 * torch.sin(3.0 * x) + t


def _toy_noise():
    return (torch.sin(torch.arange(8, dtype=torch.float64).reshape(1, 2, 2, 2) * 1.7 + 0.3) * 1.5).float()


class Recorder:
    """A velocity_fn that records its calls."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t):
        assert t.dtype == torch.float32 and t.shape == (x.shape[0],)
        self.times.append(float(t[0]))
        return self.fn(x, t)


# ---------------------------------------------------------------- grid
def test_time_grid_hand_values():
    g = time_grid(5, 6.0)
    assert g.dtype == torch.float32 and g.shape == (5,)
    expected = [0.0, 0.25 / 4.75, 0.5 / 3.5, 0.75 / 2.25, 1.0]  # t / (6 − 5t)
    assert g.tolist() == pytest.approx(expected, abs=1e-7)
    assert time_grid(3, 1.0).tolist() == [0.0, 0.5, 1.0]
    # σ form (ComfyUI time_snr_shift): σ' = sσ / (1 + (s−1)σ)
    sig = 1 - torch.linspace(0, 1, 18)
    assert torch.allclose(1 - time_grid(18, 6.0), 6 * sig / (1 + 5 * sig), atol=1e-6)


def test_grid_and_step_errors():
    with pytest.raises(InputError):
        time_grid(1, 6.0)
    with pytest.raises(InputError):
        time_grid(5, 0.0)
    with pytest.raises(InputError, match="solver"):
        sample(_toy_v, _toy_noise(), 5, "rk45")


# ---------------------------------------------------------------- evaluation counts
def test_evaluation_counts():
    assert evaluations(18, "midpoint") == 34  # 18 steps = 17 intervals = 34 evaluations
    assert evaluations(18, "euler") == 17
    assert evaluations(18, "dpmpp_2m") == 18 and evaluations(18, "dpm") == 18
    for solver in ("euler", "midpoint", "dpmpp_2m"):
        rec = Recorder(lambda x, t: -x)
        infos = []
        sample(rec, torch.ones(1, 2, 2, 2), 18, solver, 6.0, callback=infos.append)
        assert len(rec.times) == evaluations(18, solver)
        assert len(infos) == (18 if solver == "dpmpp_2m" else 17)


# ---------------------------------------------------------------- solvers: hand-computed linear ODE
@pytest.mark.parametrize("shift", [1.0, 6.0])
def test_euler_and_midpoint_linear_ode(shift):
    a = -0.7  # dx/dt = a·x
    x0 = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    grid = [float(v) for v in time_grid(6, shift)]
    dts = [t1 - t0 for t0, t1 in zip(grid[:-1], grid[1:])]
    euler = math.prod(1 + a * dt for dt in dts)
    mid = math.prod(1 + a * dt + (a * dt) ** 2 / 2 for dt in dts)
    out_e = sample(lambda x, t: a * x, x0, 6, "euler", shift)
    out_m = sample(lambda x, t: a * x, x0, 6, "midpoint", shift)
    assert torch.allclose(out_e, x0 * euler, atol=1e-6)
    assert torch.allclose(out_m, x0 * mid, atol=1e-6)
    assert out_e.dtype == torch.float32


def test_midpoint_evaluates_at_interval_midpoints():
    rec = Recorder(lambda x, t: torch.zeros_like(x))
    sample(rec, torch.zeros(1, 1, 1, 1), 3, "midpoint", 1.0)
    assert rec.times == pytest.approx([0.0, 0.25, 0.5, 0.75])


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_fixed_grid_matches_official_torchdiffeq(solver):
    out = sample(_toy_v, _toy_noise(), 6, solver, 6.0)
    assert torch.allclose(out.flatten(), torch.tensor(OFFICIAL_ODE_6_6[solver]), atol=2e-7)


@pytest.mark.parametrize("steps,shift", sorted(OFFICIAL_DPM))
def test_dpmpp_2m_matches_official(steps, shift):
    rec = Recorder(_toy_v)
    out = sample(rec, _toy_noise(), steps, "dpmpp_2m", shift)
    assert len(rec.times) == steps
    assert torch.allclose(out.flatten(), torch.tensor(OFFICIAL_DPM[(steps, shift)]), atol=1e-6)
    if (steps, shift) == (5, 6.0):
        assert rec.times == pytest.approx(OFFICIAL_DPM_TIMES_5_6, abs=1e-7)


def test_ode_state_is_fp32_and_callback_contents():
    infos: list[StepInfo] = []
    noise = torch.ones(1, 1, 1, 1, dtype=torch.bfloat16)
    v = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731  (x0 prediction = x + (1 − t)·2)
    out = sample(v, noise, 4, "euler", 6.0, callback=infos.append)
    assert out.dtype == torch.float32
    grid = time_grid(4, 6.0)
    assert [i.step for i in infos] == [0, 1, 2] and all(i.total == 3 for i in infos)
    assert [i.t for i in infos] == pytest.approx(grid[1:].tolist())
    # euler: denoised from the evaluation at the interval start = x_n + (1 − t_n)·v = 1 + 2 = 3 for every n
    assert all(torch.allclose(i.denoised, torch.tensor(3.0)) for i in infos)
    assert torch.allclose(infos[-1].x, out)


def test_callback_can_cancel():
    calls = []

    def cb(info):
        calls.append(info.step)
        if info.step == 1:
            raise InterruptedByUser("cancelled")

    with pytest.raises(InterruptedByUser):
        sample(lambda x, t: -x, torch.ones(1, 1, 1, 1), 10, "midpoint", 6.0, callback=cb)
    assert calls == [0, 1]


# ---------------------------------------------------------------- CFG
class FakeModel:
    """model_call returning fixed cond / uncond velocities; records (batch, guided) per call."""

    def __init__(self, cond, uncond):
        self.cond, self.uncond, self.calls = cond, uncond, []

    def __call__(self, xb, tb, guided):
        self.calls.append((xb.shape[0], guided, float(tb[0])))
        assert tb.shape == (xb.shape[0],)
        if guided:
            b = xb.shape[0] // 2
            assert torch.equal(xb[:b], xb[b:])
            return torch.cat([self.cond, self.uncond])
        return self.cond.clone()


def test_cfg_formula_and_trunc():
    c = torch.tensor([1.0, 2.0]).reshape(1, 2, 1, 1)
    u = torch.tensor([0.5, -1.0]).reshape(1, 2, 1, 1)
    m = FakeModel(c, u)
    g = GuidedVelocity(m, cfg=4.0, cfg_trunc=0.25, renorm=0.0)
    x = torch.zeros(1, 2, 1, 1)
    out = g(x, torch.tensor([0.1]))
    assert torch.allclose(out, torch.tensor([0.5 + 4 * 0.5, -1.0 + 4 * 3.0]).reshape(1, 2, 1, 1))
    assert m.calls[-1][:2] == (2, True)
    out = g(x, torch.tensor([0.25]))  # t ≥ cfg_trunc → cond only, single batch
    assert torch.equal(out, c) and m.calls[-1][:2] == (1, False)


def test_cfg_trunc_during_sampling_requests_only_cond_rows():
    m = FakeModel(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))
    sample(GuidedVelocity(m, cfg=5.0, cfg_trunc=0.25), torch.zeros(2, 1, 1, 1), 18, "midpoint", 6.0)
    assert len(m.calls) == 34
    for batch, guided, t in m.calls:
        assert guided == (t < 0.25) and batch == (4 if guided else 2)
    n_guided = sum(g for _, g, _ in m.calls)
    assert 0 < n_guided < 34


def test_cfg_one_runs_cond_only():
    c = torch.full((1, 2, 1, 1), 3.0)
    m = FakeModel(c, torch.zeros_like(c))
    assert torch.equal(GuidedVelocity(m, cfg=1.0)(torch.zeros_like(c), torch.tensor([0.0])), c)
    assert m.calls == [(1, False, 0.0)]
    # renorm < 1 still applies with cfg 1 (official: ‖c‖ ≥ r‖c‖ → rescale to r‖c‖)
    assert torch.allclose(GuidedVelocity(m, cfg=1.0, renorm=0.5)(torch.zeros_like(c), torch.tensor([0.0])), c * 0.5)


def test_renorm_per_sample():
    c = torch.ones(2, 4, 2, 2)
    u = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2)])  # sample 0: guided = 3c; sample 1: guided = c
    m = FakeModel(c, u)
    out = GuidedVelocity(m, cfg=3.0, renorm=2.0)(torch.zeros_like(c), torch.zeros(2))
    # sample 0: ‖3c‖ ≥ 2‖c‖ → rescaled to norm 2‖c‖ = 2c; sample 1: ‖c‖ < 2‖c‖ → unchanged
    assert torch.allclose(out[0], 2 * c[0]) and torch.allclose(out[1], c[1])
    out = GuidedVelocity(m, cfg=3.0, renorm=0.0)(torch.zeros_like(c), torch.zeros(2))
    assert torch.allclose(out[0], 3 * c[0])
    # norm over C,H,W of the velocity: a non-uniform case
    c1 = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)  # ‖c‖ = 5
    m1 = FakeModel(c1, torch.zeros_like(c1))
    out = GuidedVelocity(m1, cfg=2.0, renorm=1.2)(torch.zeros_like(c1), torch.zeros(1))  # guided 2c, ‖·‖=10 ≥ 6
    assert torch.allclose(out, c1 * 1.2)
    # zero velocities do not produce NaN
    z = torch.zeros(1, 2, 1, 1)
    assert torch.equal(GuidedVelocity(FakeModel(z, z), cfg=3.0, renorm=1.0)(z, torch.zeros(1)), z)


# ---------------------------------------------------------------- noise and sizes
def test_make_noise_is_seeded():
    a = make_noise(42, 2, 16, 8)  # latent sizes: a 128×64 image
    assert a.shape == (2, 16, 16, 8) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, make_noise(42, 2, 16, 8))
    assert not torch.equal(a, make_noise(43, 2, 16, 8))
    ref = torch.randn((2, 16, 16, 8), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(a, ref)
    assert torch.equal(make_noise(0, 1, 8, 8), make_noise(0, 1, 8, 8))  # seed 0 is a seed, not "random"
    assert make_noise(7, 1, 4, 6, channels=4).shape == (1, 4, 4, 6)
    with pytest.raises(InputError):
        make_noise(1, 0, 8, 8)
    with pytest.raises(InputError):
        make_noise(1, 1, 0, 8)


def test_validate_size_messages():
    assert validate_size(1024, 768) == (1024, 768)
    with pytest.raises(InputError, match=r"1024×1024"):
        validate_size(1020, 1030)
    with pytest.raises(InputError, match=r"multiples of 16.*16×512"):
        validate_size(0, 512)
    with pytest.raises(InputError, match="width -8"):
        validate_size(-8, 512)


def test_module_has_no_comfy_import():
    import inspect

    src = inspect.getsource(sampling)
    assert "import comfy" not in src and "from comfy" not in src

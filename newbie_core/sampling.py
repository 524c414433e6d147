"""Sampling: the shifted time grid, official CFG (cfg_trunc, renorm), the ODE solvers and seeded noise (spec §4).

Pure functions with no model knowledge. Conventions (docs/ARCHITECTURE.md): t = 0 is noise, t = 1 is data,
the model predicts the velocity v = data − noise, and the ODE state is fp32.

Solvers, matching the official `transport/` code:

| solver     | `steps` means                        | intervals | model evaluations |
|------------|--------------------------------------|-----------|-------------------|
| `euler`    | grid points (torchdiffeq fixed grid) | steps − 1 | steps − 1         |
| `midpoint` | grid points (torchdiffeq fixed grid) | steps − 1 | 2·(steps − 1)     |
| `dpmpp_2m` | intervals (official `sample_dpm`)    | steps     | steps             |

So the demo default "18 steps, midpoint" is 17 intervals and 34 evaluations (each a CFG pair while guiding).

img2img / inpainting (`sample(..., init=, denoise=, noise_mask=)`, ComfyUI KSampler's meaning): with `denoise`
d < 1 the schedule is built for `int(n / d)` intervals (n = the intervals `steps` gives above) and only its last
n intervals run, so `steps` keeps its meaning (same intervals, same model evaluations as at d = 1) and d is the
fraction of the schedule that runs. The state starts at that schedule point's t from the input latent mixed with
the seeded noise, `x_t = t·x0 + (1 − t)·noise`. d = 1 starts from pure noise exactly as text-to-image (the input
content is then used only through `noise_mask`); d = 0 returns the input latent. `noise_mask` (1 = regenerate,
0 = keep, soft values blend) replaces the kept region with the input re-noised to the current t before every
model evaluation and after every interval, so it ends as the input latent exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import InputError

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Solver:
    """One entry of the solver registry: what `steps` means for it and how many model evaluations it makes."""

    name: str
    steps_are_intervals: bool  # dpmpp_2m: `steps` intervals; the fixed-grid solvers: `steps` grid points
    evaluations_per_interval: int
    description: str


# The one solver registry: the CLI's choices, the sampler node's options and tooltips, and every step count.
SOLVERS: dict[str, Solver] = {
    "midpoint": Solver("midpoint", False, 2, "official demo: torchdiffeq midpoint, 2 evaluations per interval"),
    "euler": Solver("euler", False, 1, "torchdiffeq euler, 1 evaluation per interval"),
    "dpmpp_2m": Solver("dpmpp_2m", True, 1, "DPM-Solver++ 2M as the official 'dpm', 1 evaluation per interval"),
}
_ALIASES = {"dpm": "dpmpp_2m", "dpm++2m": "dpmpp_2m", "dpmpp2m": "dpmpp_2m"}
# Official `sample_dpm`: NoiseScheduleFlow T = 1, t_end = 1 / total_N = 0.001 (in the solver's σ-like time).
_DPM_T_START = 1.0
_DPM_T_END = 0.001

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ModelCall = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]


@dataclass
class StepInfo:
    """What a sampler callback receives after each interval.

    `step` is the 0-based index of the interval just finished (of `total`), `x` the fp32 state after it,
    `t` its time (0 noise → 1 data), and `denoised` the data prediction `x' + (1 − t')·v` of the latest
    model evaluation (for previews; the final state itself after the last dpm++ interval).
    """

    step: int
    total: int
    x: torch.Tensor
    t: float
    denoised: torch.Tensor


def _normalise_solver(solver: str) -> str:
    name = str(solver).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in SOLVERS:
        raise InputError(f"Unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}.")
    return name


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise InputError(f"steps must be an integer ≥ 2 (got {steps!r}).")
    return int(steps)


def time_grid(steps: int, shift: float) -> torch.Tensor:
    """The official shifted grid: `steps` fp32 points from 0 to 1 (= steps − 1 intervals).

    `t = linspace(0, 1, steps)` then `t ← t / (t + s − s·t)` (= t / (s − (s−1)·t)); in σ = 1 − t this is
    ComfyUI's `σ' = s·σ / (1 + (s−1)·σ)`. Computed exactly as `transport/integrators.py` does, in fp32.
    """
    steps = _check_steps(steps)
    if not (shift > 0 and math.isfinite(shift)):
        raise InputError(f"shift must be a finite number > 0 (got {shift!r}).")
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float32)
    return t / (t + shift - shift * t)


def intervals(steps: int, solver: str) -> int:
    """Sampler intervals (progress ticks, callbacks) for `steps`: steps − 1 grid intervals, or steps for dpm++."""
    steps, spec = _check_steps(steps), SOLVERS[_normalise_solver(solver)]
    return steps if spec.steps_are_intervals else steps - 1


def evaluations(steps: int, solver: str) -> int:
    """Model evaluations (velocity_fn calls, each a CFG pair while guiding) that `sample` makes.

    (dpmpp_2m: one per interval; its last interval needs none, its first one extra.)"""
    return intervals(steps, solver) * SOLVERS[_normalise_solver(solver)].evaluations_per_interval


class GuidedVelocity:
    """Official classifier-free guidance (`NextDiT_CLIP.forward_with_cfg`) around a batched model call.

    `model_call(x_batch, t_batch, guided)`: when `guided`, `x_batch = cat([x, x])` and the caller feeds the
    [cond; uncond] embeddings (2B rows); otherwise only the B cond rows are passed. It returns velocities.

    While `t < cfg_trunc` (checked on the first sample's time, as the official `t[0] < cfg_trunc`) the
    result is `u + cfg·(c − u)` on all channels, then optionally renormalised: with `renorm > 0`, samples
    whose guided norm (over C,H,W) is ≥ `renorm·‖c‖` are rescaled to `renorm·‖c‖`. From `cfg_trunc` on, only
    the cond rows run (the uncond pass is skipped). With `cfg == 1` only the cond rows run at all
    (`u + 1·(c − u) = c`); renorm is still applied there exactly as the official code would.
    """

    def __init__(self, model_call: ModelCall, cfg: float = 1.0, cfg_trunc: float = 100.0, renorm: float = 0.0):
        """Wrap `model_call` with guidance scale `cfg`, truncation time `cfg_trunc` and renorm factor `renorm`."""
        from .validate import check_number

        check_number(cfg, "cfg")
        check_number(cfg_trunc, "cfg_trunc")  # NaN would silently never guide
        if check_number(renorm, "renorm") < 0:
            raise InputError(f"renorm must be ≥ 0 (0 = off; got {renorm!r}).")
        self.model_call = model_call
        self.cfg = float(cfg)
        self.cfg_trunc = float(cfg_trunc)
        self.renorm = float(renorm)

    def guiding(self, t: float) -> bool:
        """Whether guidance is active at time `t` (official: `t[0] < cfg_trunc`)."""
        return float(t) < self.cfg_trunc

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided velocity (fp32) for state `x` [B,C,H,W] at times `t` [B]."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        active = self.guiding(t[0])  # host value decides which passes run (one sync per evaluation)
        if not active:
            return self.model_call(x, t, False).float()
        if self.cfg == 1.0:
            cond = self.model_call(x, t, False).float()
            return self._renorm(cond, cond)
        out = self.model_call(torch.cat([x, x]), torch.cat([t, t]), True).float()
        cond, uncond = out.chunk(2, dim=0)
        guided = uncond + self.cfg * (cond - uncond)
        return self._renorm(guided, cond)

    def _renorm(self, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.renorm <= 0.0:
            return guided
        dims = tuple(range(1, guided.ndim))
        max_norm = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * self.renorm
        new_norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        scale = max_norm / new_norm.clamp_min(torch.finfo(new_norm.dtype).tiny)
        return torch.where(new_norm >= max_norm, guided * scale, guided)


def _time_vector(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


def _velocity(velocity_fn: VelocityFn, x: torch.Tensor, t) -> torch.Tensor:
    v = velocity_fn(x, _time_vector(t, x))
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for a state of shape {tuple(x.shape)}.")
    return v.float()


def _sample_fixed_grid(velocity_fn, x, grid, midpoint, callback, keep=None):
    # torchdiffeq FixedGridODESolver semantics: dt = t1 − t0 (fp32), y1 = y0 + dt·f(t0, y0) for euler;
    # midpoint: y_mid = y0 + f0·dt/2, y1 = y0 + dt·f(t0 + dt/2, y_mid). `keep(x, t)`: the inpainting projection.
    total = len(grid) - 1
    for i in range(total):
        t0, t1 = grid[i], grid[i + 1]
        dt = t1 - t0
        f0 = _velocity(velocity_fn, x, t0)
        if midpoint:
            half_dt = 0.5 * dt
            t_mid = t0 + half_dt
            x_mid = x + f0 * half_dt.item()
            f_mid = _velocity(velocity_fn, x_mid, t_mid)
            denoised = x_mid + (1.0 - t_mid.item()) * f_mid
            x = x + dt.item() * f_mid
        else:
            denoised = x + (1.0 - t0.item()) * f0
            x = x + dt.item() * f0
        if keep is not None:
            x = keep(x, t1)
        if callback is not None:
            callback(StepInfo(step=i, total=total, x=x, t=float(t1), denoised=denoised))
    return x


def dpm_sigmas(steps: int, shift: float) -> torch.Tensor:
    """Official `time_uniform_flow` grid of `sample_dpm` (steps + 1 values, fp32): σ from ≈1 (noise) down to 0.

    `u = 1 − linspace(1, 0.001, steps + 1)`, `σ = s·u / (1 + (s−1)·u)`, flipped; the model runs at t = 1 − σ.
    """
    steps = _check_steps(steps)
    betas = torch.linspace(_DPM_T_START, _DPM_T_END, steps + 1, dtype=torch.float32)
    u = 1.0 - betas
    return (shift * u / (1 + (shift - 1) * u)).flip(dims=[0])


def _lam(sigma: float) -> float:
    """Half log-SNR of the flow schedule, log(α/σ) with α = 1 − σ (inf at σ = 0)."""
    return math.inf if sigma <= 0.0 else math.log(1.0 - sigma) - math.log(sigma)


def _sample_dpmpp_2m(velocity_fn, x, sig_t, callback, keep=None):
    # DPM-Solver++ (data prediction), multistep order 2, "dpmsolver" type, lower_order_final=True, exactly as
    # the official DPM_Solver.sample(method="multistep", order=2, skip_type="time_uniform_flow").
    # The official data prediction (x − σ·noise)/α with noise = x − α·v simplifies to x + σ·v, which we use
    # (same value, without the fp32 cancellation near σ = 1). Scalar coefficients are computed in float64.
    steps = len(sig_t) - 1
    sig = [float(s) for s in sig_t]
    model_t = 1.0 - sig_t  # fp32, as the official `1 - t_continuous`

    def data_pred(x_, k):
        return x_ + sig[k] * _velocity(velocity_fn, x_, model_t[k])

    m_prev = [data_pred(x, 0)]  # model values at the last (up to) two grid points
    k_prev = [0]
    for k in range(1, steps + 1):
        order = 1 if k == 1 else min(2, steps + 1 - k)
        s0, st = sig[k_prev[-1]], sig[k]
        h = _lam(st) - _lam(s0)
        phi_1 = math.expm1(-h)
        alpha_t = 1.0 - st
        ratio = st / s0
        if order == 1:
            x = ratio * x - (alpha_t * phi_1) * m_prev[-1]
        else:
            h_0 = _lam(s0) - _lam(sig[k_prev[-2]])
            r0 = h_0 / h
            d1 = (1.0 / r0) * (m_prev[-1] - m_prev[-2])
            x = ratio * x - (alpha_t * phi_1) * m_prev[-1] - 0.5 * (alpha_t * phi_1) * d1
        if keep is not None:
            x = keep(x, model_t[k])
        k_prev = (k_prev + [k])[-2:]
        if k < steps:
            m_prev = (m_prev + [data_pred(x, k)])[-2:]
            denoised = m_prev[-1]
        else:
            denoised = x
        if callback is not None:
            callback(StepInfo(step=k - 1, total=steps, x=x, t=float(model_t[k]), denoised=denoised))
    return x


def _check_denoise(denoise) -> float:
    if isinstance(denoise, bool) or not isinstance(denoise, (int, float)) or not 0.0 <= float(denoise) <= 1.0:
        raise InputError(f"denoise must be a number from 0 to 1 (1 = from pure noise; got {denoise!r}).")
    return float(denoise)


def schedule(steps: int, solver: str, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The times the state passes through (fp32): `time_grid` points (euler/midpoint) or 1 − `dpm_sigmas`
    (dpmpp_2m). With `denoise` d < 1 (ComfyUI's meaning): the schedule of `int(n / d)` intervals, of which only
    the last n (the intervals `steps` gives at d = 1) are kept; d = 1 is exactly the text-to-image schedule."""
    solver = _normalise_solver(solver)
    points = _kept_points(steps, solver, shift, denoise)
    return 1.0 - points if solver == "dpmpp_2m" else points


def _kept_points(steps: int, solver: str, shift: float, denoise: float) -> torch.Tensor:
    """`schedule` in the solver's own variable: grid times (fixed grid) or σ (dpmpp_2m), sliced from the full one."""
    steps, denoise = _check_steps(steps), _check_denoise(denoise)
    if denoise <= 0.0:
        raise InputError("denoise 0 runs no step: there is no schedule (sample() returns the input latent).")
    n = steps if solver == "dpmpp_2m" else steps - 1
    full = n if denoise >= 1.0 else max(n, int(n / denoise))
    if solver == "dpmpp_2m":
        return dpm_sigmas(full, shift)[-(n + 1):]
    return time_grid(full + 1, shift)[-(n + 1):]


def inpaint_projection(init: torch.Tensor, noise: torch.Tensor, noise_mask: torch.Tensor):
    """`keep(x, t)`: `m·x + (1 − m)·(t·init + (1 − t)·noise)`, the kept region (mask 0) set to the input re-noised
    to time t (t = 1: the input itself). `noise_mask` [B|1, C|1, H, W], 1 = regenerate, 0 = keep."""
    m = noise_mask.to(device=noise.device, dtype=torch.float32)
    x0, n = init.to(device=noise.device, dtype=torch.float32), noise.float()
    try:
        inv = (1.0 - m).expand_as(x0)
    except RuntimeError as e:
        raise InputError(f"The noise mask of shape {tuple(noise_mask.shape)} does not fit latents of shape "
                         f"{tuple(x0.shape)}.") from e

    def keep(x: torch.Tensor, t) -> torch.Tensor:
        t = float(t)
        return x * m + (t * x0 + (1.0 - t) * n) * inv

    return keep


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    steps: int,
    solver: str = "euler",
    shift: float = 6.0,
    callback: Optional[Callable[[StepInfo], None]] = None,
    *,
    init: Optional[torch.Tensor] = None,
    denoise: float = 1.0,
    noise_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Integrate dx/dt = velocity_fn(x, t) from noise (t = 0) to data (t = 1); returns the fp32 final state.

    `velocity_fn(x, t)` gets the fp32 state [B,C,H,W] and a fp32 time vector [B] (e.g. a `GuidedVelocity`).
    `solver`: "euler" / "midpoint" (torchdiffeq fixed-grid semantics on `time_grid(steps, shift)`, `steps`
    grid points) or "dpmpp_2m" (official `sample_dpm`, `steps` intervals, flow_shift = `shift`); see the
    module docstring for step counts and `evaluations()`. `callback(StepInfo)` runs after every interval;
    an exception raised there (e.g. `InterruptedByUser`) propagates and cancels sampling.

    img2img / inpainting (module docstring): `init` is the input latent in model space (scaled, shape of
    `noise`), `denoise` the fraction of the schedule to run (`schedule()`; 0 returns `init`), `noise_mask`
    (broadcastable to the latents; 1 = regenerate, 0 = keep) keeps the input wherever it is 0.
    With the defaults this is bit-for-bit text-to-image.
    """
    solver = _normalise_solver(solver)
    steps = _check_steps(steps)
    denoise = _check_denoise(denoise)
    if not (shift > 0 and math.isfinite(shift)):
        raise InputError(f"shift must be a finite number > 0 (got {shift!r}).")
    if init is None and (denoise < 1.0 or noise_mask is not None):
        raise InputError("denoise < 1 and a noise mask need an input latent (img2img): connect an encoded image.")
    if init is not None and tuple(init.shape) != tuple(noise.shape):
        raise InputError(f"The input latent has shape {tuple(init.shape)} but the noise {tuple(noise.shape)}.")
    if denoise <= 0.0:
        return init.float().clone()
    x = noise.float()
    keep = None if noise_mask is None else inpaint_projection(init, noise, noise_mask)
    if keep is not None:
        inner = velocity_fn
        velocity_fn = lambda x_, t_: inner(keep(x_, t_.reshape(-1)[0]), t_)  # noqa: E731 - model sees the kept input
    if denoise < 1.0:  # start at the first kept schedule point: x_t = t·x0 + (1 − t)·noise
        t0 = float(schedule(steps, solver, float(shift), denoise)[0])
        x = t0 * init.to(x.device, torch.float32) + (1.0 - t0) * x
        if keep is not None:
            x = keep(x, t0)
    points = _kept_points(steps, solver, float(shift), denoise)  # at denoise 1: time_grid / dpm_sigmas, unchanged
    if solver == "dpmpp_2m":
        return _sample_dpmpp_2m(velocity_fn, x, points, callback, keep)
    return _sample_fixed_grid(velocity_fn, x, points, solver == "midpoint", callback, keep)


def make_noise(seed: int, batch: int, height: int, width: int, channels: int = 16) -> torch.Tensor:
    """Seeded starting noise [batch, channels, height, width] (fp32, CPU); height/width are LATENT sizes (pixels / 8).

    Drawn from `torch.Generator("cpu").manual_seed(seed)` in one call for the whole batch (as ComfyUI's
    `prepare_noise`), so it does not depend on the device and every seed (0 included) is reproducible.
    Move it to the sampling device afterwards. Validate the pixel size with `validate_size` first.
    """
    for name, v in (("batch size", batch), ("latent height", height), ("latent width", width), ("channels", channels)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise InputError(f"{name} must be an integer ≥ 1 (got {v!r}).")
    if isinstance(seed, bool) or int(seed) != seed:
        raise InputError(f"seed must be an integer (got {seed!r}).")
    gen = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
    shape = (int(batch), int(channels), int(height), int(width))
    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu")

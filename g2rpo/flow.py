"""Pure sampler math for rectified-flow models (docs/algorithm.md §1-3). No I/O, no global RNG, no model.

Conventions: ``x_σ = (1-σ)·x0 + σ·ε``, the model predicts ``v ≈ ε - x0``, so ``x̂0 = x - σ·v``.
The step functions work on latents of any shape ``[B, ...]`` (FLUX's packed tokens ``[B, L, 64]``, SD3's
``[B, 16, H/8, W/8]``: g2rpo.models).

| function | spec |
|---|---|
| `shift_time`, `sigma_schedule` | §1 grid: ``σ_i = shift(1 - i/T)``, ``shift(t) = k·t / (1 + (k-1)·t)``; or the diffusers scheduler's |
| `quantize_timestep` | §1: ``t = floor(σ·1000)/1000`` as given to the transformer |
| `sde_step` | §2: the flow-GRPO transition, its mean/std, sample and per-element-mean log-prob |
| `noise_level` | the noise level ``s_i`` of a transition: Flow-GRPO's ``η·sqrt(σ/(1−σ))`` or DanceGRPO's constant ``η`` |
| `granular_schedule`, `granular_indices` | §3.4: sub-grid ``σ_0..σ_{k+1}, σ_{k+2}, σ_{k+2+g}, …`` |
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------
# §1 time grid
# --------------------------------------------------------------------------------------------


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift(t) = k·t / (1 + (k-1)·t)``: maps [0, 1] onto itself, spending more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


GRIDS = ("uniform", "scheduler")


def sigma_schedule(num_steps: int, shift: float, grid: str = "uniform") -> torch.Tensor:
    """Noise levels ``σ_0 = 1 > σ_1 > … > σ_T = 0``, float32, shape ``[num_steps + 1]``.

    * ``uniform`` -- ``σ_i = shift(1 − i/T)`` (G²RPO's and DanceGRPO's FLUX grid; FluxPipeline's at a fixed shift);
    * ``scheduler`` -- diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(T)`` at a static shift, what
      ``StableDiffusion3Pipeline`` and Flow-GRPO's SD3 trainer sample on: T points evenly spaced from 1 to the
      scheduler's ``σ_min = shift(1/1000)``, shifted (again), then 0. At T = 10, shift 3: 1, 0.9601, …, 0.2780,
      0.0089, 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one sampling step")
    if shift <= 0:
        raise ValueError(f"shift={shift}: must be > 0")
    if grid == "uniform":
        t = 1 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        return shift_time(t, shift).to(torch.float32)
    if grid != "scheduler":
        raise ValueError(f"grid={grid!r}: expected one of {', '.join(GRIDS)}")
    import numpy as np  # the scheduler's own arithmetic: float64 numpy, float32 at the end

    sigma_min = shift * 0.001 / (1 + (shift - 1) * 0.001)
    sigmas = np.linspace(1000.0, sigma_min * 1000, num_steps) / 1000
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


def quantize_timestep(sigma: torch.Tensor | float) -> torch.Tensor:
    """The transformer's timestep input, ``floor(σ·1000)/1000`` (the reference's quantisation)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return torch.floor(sigma * 1000) / 1000


# --------------------------------------------------------------------------------------------
# §2 one transition
# --------------------------------------------------------------------------------------------


NOISE_SCHEDULES = ("flow_grpo", "dance")


def per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d ``value`` as it is; a ``[B]`` one shaped ``[B, 1, ...]`` to broadcast over ``like``'s elements."""
    return value if value.dim() == 0 else value.reshape(-1, *([1] * (like.dim() - 1)))


def noise_level(sigmas: torch.Tensor, index, eta: float, schedule: str = "flow_grpo") -> torch.Tensor:
    """``s_i``, the noise level of the transition ``i -> i+1`` (``index``: an int or ``[B]`` indices), float32.

    * ``flow_grpo`` -- ``s = η·sqrt(σ/(1−σ̃))`` with ``σ̃ = σ_1`` where ``σ = 1`` (Flow-GRPO, G²RPO, MixGRPO);
    * ``dance`` -- ``s = η``, a constant diffusion coefficient (DanceGRPO's FLUX step).
    """
    sigmas = sigmas.float()
    sigma = sigmas[index]
    if schedule == "dance":
        return torch.full_like(sigma, eta)
    if schedule != "flow_grpo":
        raise ValueError(f"noise schedule {schedule!r}: expected one of {', '.join(NOISE_SCHEDULES)}")
    # σ̃ = σ_1 at σ = 1 keeps σ / (1 - σ̃) finite at the very first step.
    sigma_tilde = torch.where(sigma == 1, sigmas[1], sigma)
    return eta * torch.sqrt(sigma / (1 - sigma_tilde))


def _check_index(index, sigmas: torch.Tensor) -> None:
    """An int index is checked; ``[B]`` indices come from our own samplers and are not (a check would be a
    host sync)."""
    last = len(sigmas) - 2
    if not isinstance(index, torch.Tensor) and not 0 <= index <= last:
        raise ValueError(f"index={index}: a step needs sigmas[index + 1]; valid indices are 0..{last}")


def sde_step_stats(latents: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index, eta: float,
                   level: torch.Tensor | float | None = None):
    """Mean and standard deviation of ``p(x_{i+1} | x_i)`` and the ``x̂0`` prediction, in float32.

    ``index`` is an int (one step for the whole batch) or ``[B]`` indices (each sample at its own step).
    ``level`` overrides the noise level ``s`` (0-d or ``[B]``: DanceGRPO's constant η, DenseGRPO's ψ(t));
    by default ``s = η·sqrt(σ/(1−σ̃))`` (`noise_level`). Returns ``(mean, std, pred_x0)``; ``std`` is
    0-d (one step) or broadcastable ``[B, 1, ...]``.
    """
    _check_index(index, sigmas)
    x = latents.float()
    v = velocity.float()
    sigmas = sigmas.float()
    sigma, sigma_next = per_sample(sigmas[index], x), per_sample(sigmas[index + 1], x)
    dt = sigma_next - sigma  # < 0
    if level is None:
        s = per_sample(noise_level(sigmas, index, eta), x)
    else:
        s = per_sample(torch.as_tensor(level, dtype=torch.float32, device=x.device), x)
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    pred_x0 = x - sigma * v
    return mean, std, pred_x0


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(sample; mean, std²)`` averaged (not summed) over every non-batch element -> ``[B]``."""
    elementwise = -((sample.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return elementwise.flatten(1).mean(dim=1)


def sde_step(velocity: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor, index, eta: float,
             prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None, level: torch.Tensor | float | None = None):
    """One flow-GRPO transition from ``σ_index`` to ``σ_{index+1}`` (§2), computed in float32.

    ``index`` and ``level`` as in `sde_step_stats`. Returns ``(prev_sample, pred_x0, log_prob)``:
    * ``prev_sample`` -- the given ``prev_sample`` (then it is only scored), else ``mean + std·ξ``
      with ``ξ = noise`` if given, else drawn from ``generator``;
    * ``pred_x0 = x - σ·v``;
    * ``log_prob`` -- ``[B]``, the per-element mean Gaussian log-density of ``prev_sample``; ``None``
      when ``eta == 0`` (and no ``level``), where the step is the deterministic Euler ODE step ``x + v·dt``.
    """
    if velocity.shape != latents.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and latents {tuple(latents.shape)} must have the same shape")
    if eta < 0:
        raise ValueError(f"eta={eta}: must be >= 0")
    mean, std, pred_x0 = sde_step_stats(latents, velocity, sigmas, index, eta, level)
    if eta == 0 and level is None:
        return (mean if prev_sample is None else prev_sample.float()), pred_x0, None
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the latents' shape {tuple(mean.shape)}")
        prev_sample = mean + std * noise.float()
    return prev_sample.float(), pred_x0, gaussian_log_prob(prev_sample, mean, std)


def ode_step(velocity: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor, index: int,
             next_index: int | None = None):
    """Euler step from ``σ_index`` to ``σ_next_index`` (default ``index + 1``); returns ``(x_next, pred_x0)``.

    With ``next_index = index + 1`` this equals ``sde_step(..., eta=0)``; a larger ``next_index``
    is the coarse step of a granular completion. ``index``/``next_index`` may be ``[B]`` tensors (a step
    per sample).
    """
    next_index = index + 1 if next_index is None else next_index
    x, v = latents.float(), velocity.float()
    sigma = per_sample(sigmas[index].float(), x)
    return x + (per_sample(sigmas[next_index].float(), x) - sigma) * v, x - sigma * v


def dpm_solver_step(latents: torch.Tensor, pred_x0: torch.Tensor, sigma: float, sigma_next: float,
                    prev_x0: torch.Tensor | None = None, sigma_prev: float | None = None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (midpoint) of the flow ODE from ``σ`` to ``σ_next`` (MixGRPO-Flash's solver).

    Data prediction ``x̂0 = x − σ·v``; ``α = 1 − σ``, ``λ = log(α/σ)``, ``h = λ_next − λ``:

    * first order (no ``prev_x0``, a previous ``σ_prev = 1`` where λ is −∞, or ``σ_next = 0``):
      ``x_next = (σ_next/σ)·x − α_next·(e^{−h} − 1)·x̂0`` -- exactly the Euler step ``x + (σ_next − σ)·v``
      (``x̂0`` itself at ``σ_next = 0``);
    * second order, with the previous step's ``x̂0'`` at ``σ_prev``: ``r = (λ − λ_prev)/h``, ``D1 = (x̂0 − x̂0')/r``,
      ``x_next = first order − ½·α_next·(e^{−h} − 1)·D1``.

    ``σ`` values are Python floats (the coefficients are computed in float64 on the host); latents float32.
    """
    x, x0 = latents.float(), pred_x0.float()
    if sigma_next == 0:
        return x0
    lam = lambda s: math.log(1 - s) - math.log(s)  # noqa: E731
    h = lam(sigma_next) - lam(sigma)
    decay = math.expm1(-h) * (1 - sigma_next)  # α_next·(e^{−h} − 1)
    out = (sigma_next / sigma) * x - decay * x0
    if prev_x0 is None or sigma_prev is None or sigma_prev >= 1:
        return out
    r = (lam(sigma) - lam(sigma_prev)) / h
    return out - 0.5 * decay * (x0 - prev_x0.float()) / r


# --------------------------------------------------------------------------------------------
# §3.4 granular completion grids
# --------------------------------------------------------------------------------------------


def granular_indices(num_steps: int, branch_step: int, granularity: int) -> list[int]:
    """Grid indices of the sub-grid: ``0..k+1`` then ``k+2, k+2+g, k+2+2g, …`` while ``<= T``.

    The tail may stop short of ``T`` (σ = 0) when ``g > 1``; that is the reference behaviour.
    """
    if granularity < 1:
        raise ValueError(f"granularity={granularity}: must be >= 1")
    if not 0 <= branch_step <= num_steps - 2:
        raise ValueError(f"branch_step={branch_step}: must be in 0..{num_steps - 2} for T={num_steps} "
                         f"(the branch step k->k+1 must leave at least one completion step)")
    return list(range(branch_step + 2)) + list(range(branch_step + 2, num_steps + 1, granularity))


def granular_schedule(sigmas: torch.Tensor, branch_step: int, granularity: int) -> torch.Tensor:
    """The σ values of `granular_indices` (§3.4)."""
    return sigmas[granular_indices(len(sigmas) - 1, branch_step, granularity)]

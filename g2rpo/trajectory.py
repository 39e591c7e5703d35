"""Full-trajectory sampling: DanceGRPO / Flow-GRPO, MixGRPO and DenseGRPO (docs/algorithm.md, "The method family").

For one prompt group of N generations:

1. a start noise per generation -- one shared by the group (``same_start_noise``, DanceGRPO's
   ``init_same_noise``) or N of them;
2. T transitions ``x_i -> x_{i+1}`` per generation, each stochastic with noise level ``s_i > 0``
   (`g2rpo.flow.sde_step`, its old log-prob recorded) or a deterministic Euler step where ``s_i = 0``
   (MixGRPO outside its window, DanceGRPO's last step); the N generations of a transition are one batch;
3. DenseGRPO only: the ODE completion ``x̂_{i,0}`` of every ``x_i`` with the same policy (all remaining
   steps), whose rewards give the dense gains (`g2rpo.advantages.dense_gains`).

Two evaluation orders of the completions give the same numbers (up to float rounding, tested):

* ``"shared"`` (default): the first completion step of ``x_i`` reuses the sampling velocity at
  ``(x_i, σ_i)``; the completions of every start run together, one transformer call per remaining step
  (each sample at its own timestep); a start shared by the whole group (``x_0`` under
  ``same_start_noise``) is completed once. T = 10, N = 24: 36 sample-forwards per generation (+ 9 per
  group), in 9 calls;
* ``"reference"``: each completion on its own, batch 1, every step evaluated (55 per generation at T = 10,
  as DenseGRPO's paper counts them).

All noise is drawn up front from the caller's ``torch.Generator``: the start noise, then ``ξ [T, N, ...]``
for every transition (drawn even for deterministic ones, so a generation's noise does not depend on
which transitions are stochastic). Latents are float32 between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g2rpo.config import SamplingConfig
from g2rpo.flow import dpm_solver_step, ode_step, sde_step, sde_step_stats, shift_time, sigma_schedule
from g2rpo.models.base import Conditioning
from g2rpo.rollout import VelocityField, start_noise


@dataclass
class TrajectoryResult:
    """One group's trajectories: what the reward step and the policy update need."""

    sigmas: torch.Tensor  # [T+1]
    levels: torch.Tensor  # [T]: the noise level s_i of each transition (0: a deterministic step)
    latents: torch.Tensor  # [N, T+1, *latent]: x_0 (start noise) .. x_T (the image's latent)
    old_log_probs: torch.Tensor  # [N, T]: log-prob of each stochastic transition under the sampling policy (NaN: ODE)
    completions: torch.Tensor | None  # [N, T+1, *latent]: ODE completion of every x_i (i = T: x_T); DenseGRPO only
    num_calls: int
    num_sample_forwards: int
    old_means: torch.Tensor | None = None  # [N, T, *latent]: each stochastic transition's mean (keep_means; 0: ODE)

    @property
    def final(self) -> torch.Tensor:
        """``[N, *latent]``: the latents decoded for the terminal reward."""
        return self.latents[:, -1]

    @property
    def stochastic(self) -> list[int]:
        """Grid indices i of the stochastic transitions ``x_i -> x_{i+1}`` (the trainable ones)."""
        return [i for i, s in enumerate(self.levels.tolist()) if s > 0]


def _start_latents(embedding: Conditioning, policy, generator: torch.Generator, cfg: SamplingConfig,
                   same: bool) -> torch.Tensor:
    if same:
        first = start_noise(embedding, policy, generator, cfg.height, cfg.width)
        return first.expand(cfg.group_size, *first.shape[1:]).clone()
    return torch.cat([start_noise(embedding, policy, generator, cfg.height, cfg.width) for _ in range(cfg.group_size)])


def compressed_grid(num_steps: int, shift: float, last: int, ratio: float) -> torch.Tensor:  # on the uniform grid
    """MixGRPO-Flash's grid: ``σ_0 .. σ_{last+1}`` of the T-step grid (through the window's last transition
    ``last``), then its remaining ``T − last − 1`` steps compressed to ``n − 1`` with
    ``n = max(⌊(T − last)·ratio⌋, 2)`` points evenly spaced in unshifted time from ``t_{last+1}`` to 0 (the
    official floor is 1, which leaves a one-point tail that never reaches σ = 0). ``ratio = 1``: the T-step grid."""
    points = max(int((num_steps - last) * ratio), 2)
    t_start = 1 - (last + 1) / num_steps
    tail = shift_time(torch.linspace(t_start, 0, points, dtype=torch.float64), shift).to(torch.float32)
    return torch.cat([sigma_schedule(num_steps, shift)[:last + 1], tail])


@torch.no_grad()
def sde_trajectories(policy, embedding: Conditioning, cfg: SamplingConfig, levels: torch.Tensor,
                     generator: torch.Generator, same_start_noise: bool = True, dense: bool = False,
                     order: str = "shared", compute_dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None, sigmas: torch.Tensor | None = None,
                     dpm_from: int | None = None, keep_means: bool = False) -> TrajectoryResult:
    """Roll out ``cfg.group_size`` trajectories with noise levels ``levels [T]``, on the T-step grid of ``cfg``
    or on ``sigmas [T+1]`` (MixGRPO-Flash's `compressed_grid`). ``dpm_from``: the deterministic transitions
    from that grid index on take DPM-Solver++(2M) steps (`g2rpo.flow.dpm_solver_step`; its history holds the
    ``x̂0`` of every earlier step, the window's SDE steps included) instead of Euler steps. ``keep_means``: also
    return each stochastic transition's Gaussian mean (``ppo.guard``)."""
    device = torch.device(device) if device is not None else embedding.device
    embedding.validate(policy)
    grid = sigma_schedule(cfg.num_steps, cfg.shift, cfg.grid) if sigmas is None else sigmas.float().cpu()
    n, t = cfg.group_size, len(grid) - 1
    levels = torch.as_tensor(levels, dtype=torch.float32)
    if levels.shape != (t,) or (levels < 0).any():
        raise ValueError(f"levels {tuple(levels.shape)}: need {t} noise levels (one per step of the grid), each >= 0")
    if order not in ("shared", "reference"):
        raise ValueError(f"order={order!r}: expected 'shared' or 'reference'")
    if dpm_from is not None and dense:
        raise ValueError("dpm_from: the DPM-Solver++ steps are MixGRPO-Flash's; dense completions use Euler steps")
    sigmas = grid.to(device)
    host_sigmas = grid.tolist()  # the solver's coefficients, without a device sync per step
    start = _start_latents(embedding, policy, generator, cfg, same_start_noise)
    noise = torch.randn((t, *start.shape), generator=generator, dtype=torch.float32).to(device)
    start = start.to(device)
    velocity = VelocityField.for_sampling(policy, embedding, cfg, device, cfg.micro_batch, compute_dtype)

    keep_velocities = dense and order == "shared"  # the completions' first steps reuse them
    latents, velocities = [start], []
    old_log_probs = torch.full((n, t), float("nan"), device=device)
    old_means = torch.zeros((n, t, *start.shape[1:]), device=device) if keep_means else None
    prev_x0 = None
    for i in range(t):
        x = latents[-1]
        v = velocity(x, sigmas[i])
        if keep_velocities:
            velocities.append(v)
        x0 = x - host_sigmas[i] * v.float() if dpm_from is not None else None
        if levels[i] > 0:
            x_next, _, log_prob = sde_step(v, x, sigmas, i, 0.0, noise=noise[i], level=levels[i].to(device))
            old_log_probs[:, i] = log_prob
            if keep_means:
                old_means[:, i] = sde_step_stats(x, v, sigmas, i, 0.0, level=levels[i].to(device))[0]
        elif dpm_from is not None and i >= dpm_from:
            x_next = dpm_solver_step(x, x0, host_sigmas[i], host_sigmas[i + 1], prev_x0, host_sigmas[i - 1] if i else None)
        else:
            x_next = ode_step(v, x, sigmas, i)[0]
        prev_x0 = x0
        latents.append(x_next)
    latents = torch.stack(latents, dim=1)

    completions = None
    if keep_velocities:
        completions = _complete_batched(velocity, latents, torch.stack(velocities, dim=1), sigmas, same_start_noise)
    elif dense:
        completions = _complete_each(velocity, latents, sigmas)
    return TrajectoryResult(sigmas=sigmas, levels=levels, latents=latents, old_log_probs=old_log_probs,
                            completions=completions, num_calls=velocity.calls,
                            num_sample_forwards=velocity.sample_forwards, old_means=old_means)


def _complete_each(velocity: VelocityField, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Reference order: every ``x_i`` of every generation completed on its own, batch 1, every step evaluated."""
    n, steps = latents.shape[0], len(sigmas) - 1
    completions = latents.clone()
    for j in range(n):
        for i in range(steps):
            y = latents[j:j + 1, i]
            for k in range(i, steps):
                y = ode_step(velocity(y, sigmas[k]), y, sigmas, k)[0]
            completions[j, i] = y[0]
    return completions


def _complete_batched(velocity: VelocityField, latents: torch.Tensor, velocities: torch.Tensor,
                      sigmas: torch.Tensor, shared_start: bool) -> torch.Tensor:
    """Shared order: the first step of each completion reuses the sampling velocity; then every live
    completion advances by one step per call, each at its own timestep. ``shared_start``: ``x_0`` is the same
    for every generation and is completed once."""
    n, steps = latents.shape[0], len(sigmas) - 1
    completions = latents.clone()
    # rows: (generation, start index); generation 0 alone stands for the group's shared x_0
    rows = [(j, i) for i in range(steps) for j in range(n) if not (shared_start and i == 0 and j > 0)]
    gen = torch.tensor([j for j, _ in rows], device=latents.device)
    start_index = torch.tensor([i for _, i in rows], device=latents.device)
    y = ode_step(velocities[gen, start_index], latents[gen, start_index], sigmas, start_index)[0]
    index = start_index + 1
    live = index < steps
    while live.any():
        y_live, at = y[live], index[live]
        y[live] = ode_step(velocity(y_live, sigmas[at]), y_live, sigmas, at)[0]
        index = torch.where(live, index + 1, index)
        live = index < steps
    completions[gen, start_index] = y
    if shared_start:
        completions[:, 0] = completions[0, 0]
    return completions


def expected_trajectory_cost(cfg: SamplingConfig, dense: bool, same_start_noise: bool = True,
                             order: str = "shared", steps: int | None = None) -> dict[str, int]:
    """Closed-form transformer calls and sample-forwards of one group's `sde_trajectories` (``steps``: the
    grid's, where it is not the T of ``cfg`` -- MixGRPO-Flash's compressed grid)."""
    t, n = steps or cfg.num_steps, cfg.group_size
    chunks = -(-n // (cfg.micro_batch or n))
    calls, forwards = t * chunks, t * n
    if dense:
        if order == "reference":
            extra = n * t * (t + 1) // 2  # Σ_{i<T} (T − i) per generation, nothing shared
            calls, forwards = calls + extra, forwards + extra
        else:
            starts_0 = 1 if same_start_noise else n
            # after the reused first step, a completion from x_i takes T − i − 1 more forwards
            forwards += starts_0 * (t - 1) + n * sum(t - i - 1 for i in range(1, t))
            rows_per_round = [starts_0 * (r < t) + n * sum(1 for i in range(1, t) if i + r < t)
                              for r in range(1, t)]
            size = cfg.micro_batch or max(rows_per_round + [1])
            calls += sum(-(-rows // size) for rows in rows_per_round if rows)
    return {"calls": calls, "sample_forwards": forwards}

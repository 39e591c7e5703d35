"""Singular stochastic sampling with multi-granularity completions (docs/algorithm.md §3).

For one prompt group of N generations:

1. one start noise ``z`` for the whole group;
2. the deterministic anchor ``a_0 = z, …, a_T`` (Euler ODE steps, the policy's own velocities);
3. for every branching step k and generation n, one SDE step ``a_k -> x^{(n)}_{k+1}`` with its own
   noise, recording ``old_log_prob[n, k]``;
4. for every granularity g, an ODE completion from ``x^{(n)}_{k+1}`` along the sub-grid
   ``k+1, k+2, k+2+g, …`` whose result is the ``x̂0`` of the last step taken.

Two evaluation orders give the same numbers (up to float rounding, tested to 1e-5):

* ``"shared"`` (default): the branch uses the anchor's own velocity at ``(a_k, σ_k)``; the first two
  completion evaluations (at ``σ_{k+1}`` and ``σ_{k+2}``) serve every granularity; the N
  completions of a branch step run as one batch (split into ``micro_batch`` chunks if asked).
  Reference config: 1,504 sample-forwards in 140 calls.
* ``"reference"``: the reference recipe's order -- per generation, batch 1, the branch velocity
  re-evaluated and each granularity completed on its own. Reference config: 1,792 in 1,792.

All noise is drawn up front from the caller's ``torch.Generator`` (start noise, then branch noise
``[K, N, ...]``), so both orders see the same noise. Latents are kept in float32 between steps;
the reference keeps the anchor in bf16 -- a deliberate, more precise deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from g2rpo.config import SamplingConfig
from g2rpo.flow import gaussian_log_prob, granular_indices, ode_step, quantize_timestep, sde_step, sde_step_stats, \
    sigma_schedule
from g2rpo.models.base import Conditioning


class VelocityField:
    """Evaluates a policy (a transformer of the conditioning's model family) on latents at one σ, counting the cost.

    The family (``embedding.family``: g2rpo.models.base) makes the forward: text conditioning broadcast to the
    batch, classifier-free guidance where it has it. Batches larger than ``micro_batch`` are split. ``size``: the
    image's ``(height, width)`` in pixels. The velocity comes back in float32.
    """

    def __init__(self, policy, embedding: Conditioning, size: tuple[int, int], guidance: float,
                 micro_batch: int = 0, compute_dtype: torch.dtype | None = None, quantize: bool = True):
        self.quantize = quantize  # the timestep input floor(σ·1000)/1000 (the reference) or σ itself (Flow-GRPO)
        self.policy = policy
        self.embedding = embedding
        self.family = embedding.family
        self.size = tuple(size)
        self.guidance = guidance
        self.micro_batch = micro_batch
        self.compute_dtype = compute_dtype
        self.calls = 0
        self.sample_forwards = 0
        self._inputs: dict = {}

    @classmethod
    def for_sampling(cls, policy, embedding: Conditioning, cfg: SamplingConfig, device=None, micro_batch: int = 0,
                     compute_dtype: torch.dtype | None = None) -> "VelocityField":
        """The field at ``cfg``'s resolution, guidance and timestep input."""
        return cls(policy, embedding, (cfg.height, cfg.width), cfg.guidance, micro_batch, compute_dtype,
                   quantize=cfg.timestep == "quantized")

    def _forward(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        dtype = self.compute_dtype or latents.dtype
        key = str(latents.device)
        if key not in self._inputs:  # made once per device (FLUX: the image position ids)
            self._inputs[key] = self.family.sampling_inputs(*self.size, latents.device)
        timestep = quantize_timestep(sigma) if self.quantize else sigma.float()
        out = self.family.velocity(self.policy, self.embedding, latents, timestep, self.guidance, dtype,
                                   self._inputs[key])
        self.calls += 1
        self.sample_forwards += b
        return out.float()

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``sigma``: 0-d (every sample at one noise level) or ``[B]`` (each at its own)."""
        size = self.micro_batch or latents.shape[0]
        if sigma.dim() == 0:
            return torch.cat([self._forward(chunk, sigma) for chunk in latents.split(size)])
        return torch.cat([self._forward(chunk, s) for chunk, s in zip(latents.split(size), sigma.split(size))])


@dataclass
class RolloutResult:
    """Everything the policy update and the reward step need from one group's rollout."""

    sigmas: torch.Tensor  # [T+1]
    branch_steps: list[int]  # K
    granularities: list[int]  # G
    anchor_latents: torch.Tensor  # [T+1, *latent]: a_0 (the shared start noise) .. a_T (FLUX: latent = [L, C])
    next_latents: torch.Tensor  # [N, K, *latent]: the sampled x^{(n)}_{k+1}
    old_log_probs: torch.Tensor  # [N, K]
    completions: torch.Tensor  # [N, K, G, *latent]: x̂0 of each (generation, branch step, granularity)
    num_calls: int
    num_sample_forwards: int
    old_means: torch.Tensor | None = None  # [K, *latent]: the branch step's Gaussian mean, shared by the group

    @property
    def branch_latents(self) -> torch.Tensor:
        """``[K, *latent]``: the latent ``a_k`` every generation branches from at step k."""
        return self.anchor_latents[self.branch_steps]

    @property
    def anchor_final(self) -> torch.Tensor:
        """``[*latent]``: the anchor's final latent (its image is the step's "eval reward")."""
        return self.anchor_latents[-1]


def complete_granular(velocity: VelocityField, x: torch.Tensor, sigmas: torch.Tensor, branch_step: int,
                      granularities: list[int]) -> torch.Tensor:
    """ODE completions of ``x`` (at grid index ``k+1``) for every granularity -> ``[B, G, ...]`` of x̂0.

    Granularities whose sub-grids still coincide share their evaluations: the state is evaluated
    once per distinct (path so far), so for any G the evaluations at σ_{k+1} and σ_{k+2} are shared.
    """
    num_steps = len(sigmas) - 1
    grids = {g: granular_indices(num_steps, branch_step, g)[branch_step + 1:] for g in granularities}
    results: dict[int, torch.Tensor] = {}
    frontier = [(x, branch_step + 1, list(granularities))]
    while frontier:
        next_frontier = []
        for state, index, group in frontier:
            v = velocity(state, sigmas[index])
            by_next: dict[int, list[int]] = {}
            for g in group:
                grid = grids[g]
                by_next.setdefault(grid[grid.index(index) + 1], []).append(g)
            for next_index, members in by_next.items():
                next_state, pred_x0 = ode_step(v, state, sigmas, index, next_index)
                live = []
                for g in members:
                    if next_index == grids[g][-1]:
                        results[g] = pred_x0  # x̂0 of the last step taken (§3.4)
                    else:
                        live.append(g)
                if live:
                    next_frontier.append((next_state, next_index, live))
        frontier = next_frontier
    return torch.stack([results[g] for g in granularities], dim=1)


def _complete_one(velocity: VelocityField, x: torch.Tensor, sigmas: torch.Tensor, branch_step: int,
                  granularity: int) -> torch.Tensor:
    """Reference order: one granularity on its own, every step evaluated."""
    grid = granular_indices(len(sigmas) - 1, branch_step, granularity)[branch_step + 1:]
    for index, next_index in zip(grid[:-1], grid[1:]):
        x, pred_x0 = ode_step(velocity(x, sigmas[index]), x, sigmas, index, next_index)
    return pred_x0


def anchor_trajectory(velocity: VelocityField, start: torch.Tensor, sigmas: torch.Tensor, keep=()):
    """Deterministic Euler ODE trajectory ``[a_0 = start, ..., a_T]`` of one latent ``[*latent]``.

    Returns the list of latents and ``{i: v_i}`` for the indices in ``keep`` (the branching steps).
    """
    anchors, velocities = [start], {}
    for i in range(len(sigmas) - 1):
        v = velocity(anchors[-1][None], sigmas[i])
        if i in keep:
            velocities[i] = v[0]
        anchors.append(ode_step(v, anchors[-1][None], sigmas, i)[0][0])
    return anchors, velocities


def policy_config(policy) -> dict:
    """The policy's transformer config (a plain dict; empty for a policy without one)."""
    config = getattr(policy, "config", None)
    return dict(config) if config is not None else {}


def start_noise(embedding: Conditioning, policy, generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """One start latent ``[1, *latent]``, drawn as the conditioning family's own pipeline draws it."""
    return embedding.family.start_noise(generator, policy_config(policy), height, width)


@torch.no_grad()
def ode_sample(policy, embedding: Conditioning, cfg: SamplingConfig, generator: torch.Generator,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The anchor's final latent ``[*latent]`` alone: deterministic sampling, for evaluation."""
    device = torch.device(device) if device is not None else embedding.device
    velocity = VelocityField.for_sampling(policy, embedding, cfg, device)
    start = start_noise(embedding, policy, generator, cfg.height, cfg.width).to(device)
    return anchor_trajectory(velocity, start[0], sigma_schedule(cfg.num_steps, cfg.shift, cfg.grid).to(device))[0][-1]


@torch.no_grad()
def singular_sde_rollout(policy, embedding: Conditioning, cfg: SamplingConfig, generator: torch.Generator,
                         compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None
                         ) -> RolloutResult:
    """Roll out one prompt group (``cfg.group_size`` generations) as §3 describes."""
    device = torch.device(device) if device is not None else embedding.device
    embedding.validate(policy)
    n, ks, gs = cfg.group_size, list(cfg.branch_steps), list(cfg.granularities)
    sigmas = sigma_schedule(cfg.num_steps, cfg.shift, cfg.grid).to(device)

    # All randomness up front, in a fixed order: the shared start noise, then one ξ per (k, n).
    start = start_noise(embedding, policy, generator, cfg.height, cfg.width).to(device)
    shape = tuple(start.shape[1:])
    branch_noise = torch.randn((len(ks), n, *shape), generator=generator, dtype=torch.float32)
    branch_noise = branch_noise.to(device)

    velocity = VelocityField.for_sampling(policy, embedding, cfg, device, cfg.micro_batch, compute_dtype)

    anchors, anchor_velocity = anchor_trajectory(velocity, start[0], sigmas, keep=ks)

    next_latents = torch.empty((n, len(ks), *shape), device=device)
    old_log_probs = torch.empty((n, len(ks)), device=device)
    completions = torch.empty((n, len(ks), len(gs), *shape), device=device)
    old_means = torch.empty((len(ks), *shape), device=device)
    for ki, k in enumerate(ks):
        a_k = anchors[k]
        old_means[ki] = sde_step_stats(a_k[None], anchor_velocity[k][None], sigmas, k, cfg.eta)[0][0]
        if cfg.order == "shared":
            x, _, log_prob = sde_step(anchor_velocity[k].expand(n, *shape), a_k.expand(n, *shape), sigmas, k,
                                      cfg.eta, noise=branch_noise[ki])
            next_latents[:, ki], old_log_probs[:, ki] = x, log_prob
            completions[:, ki] = complete_granular(velocity, x, sigmas, k, gs)
        else:
            for j in range(n):
                v = velocity(a_k[None], sigmas[k])  # re-evaluated per generation, as the reference does
                x, _, log_prob = sde_step(v, a_k[None], sigmas, k, cfg.eta, noise=branch_noise[ki, j:j + 1])
                next_latents[j, ki], old_log_probs[j, ki] = x[0], log_prob[0]
                for gi, g in enumerate(gs):
                    completions[j, ki, gi] = _complete_one(velocity, x, sigmas, k, g)[0]

    return RolloutResult(
        sigmas=sigmas, branch_steps=ks, granularities=gs, anchor_latents=torch.stack(anchors),
        next_latents=next_latents, old_log_probs=old_log_probs, completions=completions,
        num_calls=velocity.calls, num_sample_forwards=velocity.sample_forwards, old_means=old_means,
    )


class Transition(NamedTuple):
    """A training forward's transitions under one policy: ``log_probs [m]`` of the stored next latents, the
    Gaussian ``mean`` (``[m, ...]``, or ``[1, ...]`` shared by the m) and ``std`` they were scored under, and the
    step ``dt = σ_{i+1} − σ_i`` of each (0-d or ``[m]``; the Flow-GRPO form of the KL term reads it)."""

    log_probs: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    dt: torch.Tensor | None = None


def policy_transition(policy, embedding: Conditioning, rollout: RolloutResult, branch_index: int,
                      cfg: SamplingConfig, compute_dtype: torch.dtype | None = None) -> Transition:
    """The branch step ``k = branch_steps[branch_index]`` under ``policy`` (§5), with gradients: the new
    log-probs ``[N]`` of the stored ``x^{(n)}_{k+1}``, and the step's mean ``[1, ...]`` and std.

    One forward at ``(a_k, σ_k)`` serves the whole group, since every generation branched from the
    same anchor latent.
    """
    k = rollout.branch_steps[branch_index]
    a_k = rollout.anchor_latents[k][None]
    velocity = VelocityField.for_sampling(policy, embedding, cfg, a_k.device, compute_dtype=compute_dtype)
    v = velocity(a_k, rollout.sigmas[k])
    mean, std, _ = sde_step_stats(a_k, v, rollout.sigmas, k, cfg.eta)
    return Transition(gaussian_log_prob(rollout.next_latents[:, branch_index], mean, std), mean, std,
                      rollout.sigmas[k + 1] - rollout.sigmas[k])


def policy_log_probs(policy, embedding: Conditioning, rollout: RolloutResult, branch_index: int,
                     cfg: SamplingConfig, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``new_log_prob [N]`` of `policy_transition`."""
    return policy_transition(policy, embedding, rollout, branch_index, cfg, compute_dtype).log_probs


def expected_cost(cfg: SamplingConfig) -> dict[str, int]:
    """Closed-form transformer calls and sample-forwards of one group's rollout (§3 "Cost")."""
    t, n = cfg.num_steps, cfg.group_size
    per_branch = {k: {g: len(granular_indices(t, k, g)) - k - 2 for g in cfg.granularities} for k in cfg.branch_steps}
    if cfg.order == "reference":
        calls = t + n * sum(1 + sum(evals.values()) for evals in per_branch.values())
        return {"calls": calls, "sample_forwards": calls}
    # shared: the first two evaluations serve every granularity (one only when a grid has just one step)
    completion = 0
    for evals in per_branch.values():
        shared = min(2, min(evals.values()))
        completion += shared + sum(e - shared for e in evals.values())
    chunks = -(-n // (cfg.micro_batch or n))
    return {"calls": t + completion * chunks, "sample_forwards": t + completion * n}

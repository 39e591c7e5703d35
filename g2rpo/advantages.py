"""Multi-Granularity Advantage Integration (docs/algorithm.md §4) and the other methods' advantages, vectorised.

For every reward model r, granularity g and branching step k, rewards are normalised inside each
prompt group, ``A = (R - mean_n R) / (std R + eps)``; the normalised advantages are summed over
granularities and rewards, then clipped to ±adv_clip_max. With one reward and one granularity this is
the plain per-step GRPO advantage. How the statistics are taken is a `Normalization`: the reference's
(unbiased std of the group + 1e-8, float32) by default, Flow-GRPO's (population std + 1e-4 over every
generation of the step, float64, of the weighted sum of the rewards) as an option. A group whose rewards
are all equal gets advantage exactly 0 under every normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-8


@dataclass(frozen=True)
class Normalization:
    """How rewards become group-normalised advantages (config section ``advantage``; docs/algorithm.md)."""

    ddof: int = 1
    """1: the unbiased std (G²RPO, DanceGRPO, MixGRPO); 0: the population std (Flow-GRPO's numpy std)."""
    eps: float = STD_EPS
    """added to the std (1e-8; Flow-GRPO: 1e-4)."""
    dtype: torch.dtype = torch.float32
    """of the statistics (Flow-GRPO: float64); the advantages are returned in float32."""
    weighted_sum: bool = False
    """several rewards: False normalises each and sums the weighted results (MGAI); True normalises the
    weighted sum of the raw rewards once (Flow-GRPO's combined reward)."""
    pooled_std: bool = False
    """the std over every generation of the step on every rank (``pooled`` below; Flow-GRPO's global_std)
    instead of over each group; the mean stays each group's."""

    @classmethod
    def from_config(cls, cfg) -> "Normalization":
        """From the config's ``advantage`` section (g2rpo.config.AdvantageConfig)."""
        return cls(ddof=1 if cfg.std == "unbiased" else 0, eps=cfg.eps,
                   dtype=torch.float64 if cfg.precision == "float64" else torch.float32,
                   weighted_sum=cfg.combine == "weighted_sum", pooled_std=cfg.std_over == "global")


def group_normalize(rewards: torch.Tensor, group_size: int, dim: int, norm: Normalization = Normalization(),
                    pooled: torch.Tensor | None = None) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` over groups of ``group_size`` consecutive entries along ``dim`` -> float32.

    The std is each group's, or -- with ``norm.pooled_std`` -- that of ``pooled`` along ``dim`` (the same
    layout as ``rewards`` otherwise: every generation of the step, on every rank). A group whose rewards
    are all equal gets advantage exactly 0: ``r - mean`` of equal values can be one ulp off zero (a float
    mean of twelve 0.3s is), which the division by a tiny std would blow up.
    """
    size = rewards.shape[dim]
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: need >= 2 generations per group for a standard deviation")
    if size % group_size:
        raise ValueError(f"{size} generations along dim {dim} are not a whole number of groups of {group_size}")
    moved = rewards.to(norm.dtype).movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], size // group_size, group_size)
    mean = grouped.mean(dim=-1, keepdim=True)
    if norm.pooled_std:
        if pooled is None:
            raise ValueError("Normalization(pooled_std=True) needs the pooled rewards of the step")
        std = pooled.to(norm.dtype).movedim(dim, -1).std(dim=-1, correction=norm.ddof, keepdim=True)[..., None]
    else:
        std = grouped.std(dim=-1, correction=norm.ddof, keepdim=True)
    tied = (grouped == grouped[..., :1]).all(dim=-1, keepdim=True)
    advantages = torch.where(tied, torch.zeros_like(grouped), (grouped - mean) / (std + norm.eps))
    return advantages.reshape(moved.shape).movedim(-1, dim).float()


def _weighted(rewards: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``Σ_r w_r R_r`` over the first dim, kept as a dim of one."""
    if weights is None:
        return rewards.sum(dim=0, keepdim=True)
    w = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    return (rewards * w.reshape(-1, *([1] * (rewards.dim() - 1)))).sum(dim=0, keepdim=True)


def mgai_advantages(rewards: torch.Tensor, group_size: int, adv_clip_max: float | None = None,
                    weights: torch.Tensor | None = None, norm: Normalization = Normalization(),
                    pooled: torch.Tensor | None = None) -> torch.Tensor:
    """``rewards [num_rewards, num_granularities, B, K]`` -> advantages ``[B, K]`` (§4).

    ``B`` = groups × ``group_size`` with each group's generations contiguous; ``K`` branching steps.
    ``weights`` (``[num_rewards]``, default all 1 as in the reference) scale each reward's term (with
    ``norm.weighted_sum``: each reward in the sum normalised once). ``pooled``: the rewards of every
    generation of the step (``[num_rewards, num_granularities, B_all, K]``) for ``norm.pooled_std``.
    """
    if rewards.dim() != 4:
        raise ValueError(f"rewards must be [num_rewards, num_granularities, B, K], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (rewards.shape[0],):
            raise ValueError(f"weights {tuple(weights.shape)} must have one entry per reward ({rewards.shape[0]})")
    if norm.weighted_sum:
        rewards = _weighted(rewards.to(norm.dtype), weights)
        pooled = None if pooled is None else _weighted(pooled.to(norm.dtype), weights)
        weights = None
    per_term = group_normalize(rewards, group_size, 2, norm, pooled)
    if weights is not None:
        per_term = per_term * weights.to(per_term.device)[:, None, None, None]
    advantages = per_term.sum(dim=(0, 1))
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return advantages


def terminal_advantages(rewards: torch.Tensor, group_size: int, adv_clip_max: float | None = None,
                        weights: torch.Tensor | None = None, norm: Normalization = Normalization(),
                        pooled: torch.Tensor | None = None) -> torch.Tensor:
    """DanceGRPO / Flow-GRPO / MixGRPO: ``rewards [num_rewards, B]`` of each trajectory's final image ->
    ``[B]``, ``A = Σ_r w_r·(R_r − mean_n R_r)/(std_n R_r + 1e-8)`` clipped to ±adv_clip_max (``norm``: how the
    statistics are taken; ``pooled [num_rewards, B_all]``); the same advantage for every trained transition of a
    trajectory. (`mgai_advantages` with G = K = 1.)"""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_rewards, B], got shape {tuple(rewards.shape)}")
    pooled = None if pooled is None else pooled[:, None, :, None]
    return mgai_advantages(rewards[:, None, :, None], group_size, adv_clip_max, weights, norm, pooled)[:, 0]


def dense_gains(step_rewards: torch.Tensor) -> torch.Tensor:
    """DenseGRPO's step-wise reward gains: ``step_rewards [..., T+1]`` -> ``[..., T]``,
    ``ΔR_i = R_{i+1} − R_i`` for the transition ``x_i -> x_{i+1}`` (grid index i: σ_i -> σ_{i+1}), where
    ``R_i`` is the reward of the ODE completion of ``x_i`` (``R_T``: of the final ``x_T`` itself). The gains
    telescope: ``Σ_i ΔR_i = R(x_T) − R(ODE(x_0))``."""
    return step_rewards[..., 1:] - step_rewards[..., :-1]


def dense_advantages(step_rewards: torch.Tensor, group_size: int, adv_clip_max: float | None = None,
                     weights: torch.Tensor | None = None, norm: Normalization = Normalization(),
                     pooled: torch.Tensor | None = None) -> torch.Tensor:
    """DenseGRPO: ``step_rewards [num_rewards, B, T+1]`` -> per-transition advantages ``[B, T]``,
    ``Â_{n,i} = Σ_r w_r·(ΔR_{r,n,i} − mean_m ΔR_{r,m,i})/(std_m ΔR_{r,m,i} + 1e-8)`` (normalised across the
    group at each transition), clipped to ±adv_clip_max (``pooled [num_rewards, B_all, T+1]``)."""
    if step_rewards.dim() != 3:
        raise ValueError(f"step_rewards must be [num_rewards, B, T+1], got shape {tuple(step_rewards.shape)}")
    pooled = None if pooled is None else dense_gains(pooled)[:, None]
    return mgai_advantages(dense_gains(step_rewards)[:, None], group_size, adv_clip_max, weights, norm, pooled)


def calibrate_psi(psi: torch.Tensor, gains: torch.Tensor, eps1: float, eps2: float, groups: int = 1,
                  minimum: float = 0.0) -> torch.Tensor:
    """One round of DenseGRPO's exploration calibration: ``psi [T]``, ``gains [B, T]`` (the round's dense
    gains, B samples from ``groups`` prompt groups) -> the new ``psi``.

    For each transition t: where the signs are balanced, ``|#{ΔR_t > 0} − #{ΔR_t < 0}| < ε₁·groups``, the
    noise grows, ``ψ(t) += ε₂``; otherwise it shrinks, ``ψ(t) −= ε₂`` (never below ``minimum``). With one
    group per round this is the paper's rule; pooling ``groups`` groups scales ε₁ with them (our choice).
    """
    if gains.dim() != 2 or gains.shape[1] != psi.shape[0]:
        raise ValueError(f"gains {tuple(gains.shape)} must be [B, T] with T = {psi.shape[0]} (psi's length)")
    balance = ((gains > 0).sum(dim=0) - (gains < 0).sum(dim=0)).abs()
    step = torch.where(balance < eps1 * groups, eps2, -eps2).to(psi.dtype)
    return (psi + step).clamp(min=minimum)

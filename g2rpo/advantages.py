"""Multi-Granularity Advantage Integration (G2RPO_ALGORITHM.md §4), vectorised.

For every reward model r, granularity g and branching step k, rewards are normalised inside each
prompt group, ``A = (R - mean_n R) / (std_n R + 1e-8)`` with the unbiased standard deviation; the
normalised advantages are summed over granularities and rewards, then clipped to ±adv_clip_max.
With one reward and one granularity this is the plain per-step GRPO advantage.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-8


def group_normalize(rewards: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """``(r - mean) / (std + 1e-8)`` over groups of ``group_size`` consecutive entries along ``dim``.

    A group whose rewards are all equal gets advantage exactly 0. (The reference formula gives
    rounding noise there: ``r - mean`` can be one ulp off zero, which ``/ 1e-8`` would amplify.)
    """
    size = rewards.shape[dim]
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: need >= 2 generations per group for a standard deviation")
    if size % group_size:
        raise ValueError(f"{size} generations along dim {dim} are not a whole number of groups of {group_size}")
    moved = rewards.float().movedim(dim, -1)
    grouped = moved.reshape(*moved.shape[:-1], size // group_size, group_size)
    mean = grouped.mean(dim=-1, keepdim=True)
    std = grouped.std(dim=-1, keepdim=True, unbiased=True)
    advantages = torch.where(std > 0, (grouped - mean) / (std + STD_EPS), torch.zeros_like(grouped))
    return advantages.reshape(moved.shape).movedim(-1, dim)


def mgai_advantages(rewards: torch.Tensor, group_size: int, adv_clip_max: float | None = None,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """``rewards [num_rewards, num_granularities, B, K]`` -> advantages ``[B, K]`` (§4).

    ``B`` = groups × ``group_size`` with each group's generations contiguous; ``K`` branching steps.
    ``weights`` (``[num_rewards]``, default all 1 as in the reference) scale each reward's term.
    """
    if rewards.dim() != 4:
        raise ValueError(f"rewards must be [num_rewards, num_granularities, B, K], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    per_term = group_normalize(rewards, group_size, dim=2)
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=per_term.dtype, device=per_term.device)
        if weights.shape != (rewards.shape[0],):
            raise ValueError(f"weights {tuple(weights.shape)} must have one entry per reward ({rewards.shape[0]})")
        per_term = per_term * weights[:, None, None, None]
    advantages = per_term.sum(dim=(0, 1))
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return advantages


def terminal_advantages(rewards: torch.Tensor, group_size: int, adv_clip_max: float | None = None,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """DanceGRPO / Flow-GRPO / MixGRPO: ``rewards [num_rewards, B]`` of each trajectory's final image ->
    ``[B]``, ``A = Σ_r w_r·(R_r − mean_n R_r)/(std_n R_r + 1e-8)`` clipped to ±adv_clip_max; the same
    advantage for every trained transition of a trajectory. (`mgai_advantages` with G = K = 1.)"""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_rewards, B], got shape {tuple(rewards.shape)}")
    return mgai_advantages(rewards[:, None, :, None], group_size, adv_clip_max, weights)[:, 0]


def dense_gains(step_rewards: torch.Tensor) -> torch.Tensor:
    """DenseGRPO's step-wise reward gains: ``step_rewards [..., T+1]`` -> ``[..., T]``,
    ``ΔR_i = R_{i+1} − R_i`` for the transition ``x_i -> x_{i+1}`` (grid index i: σ_i -> σ_{i+1}), where
    ``R_i`` is the reward of the ODE completion of ``x_i`` (``R_T``: of the final ``x_T`` itself). The gains
    telescope: ``Σ_i ΔR_i = R(x_T) − R(ODE(x_0))``."""
    return step_rewards[..., 1:] - step_rewards[..., :-1]


def dense_advantages(step_rewards: torch.Tensor, group_size: int, adv_clip_max: float | None = None,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """DenseGRPO: ``step_rewards [num_rewards, B, T+1]`` -> per-transition advantages ``[B, T]``,
    ``Â_{n,i} = Σ_r w_r·(ΔR_{r,n,i} − mean_m ΔR_{r,m,i})/(std_m ΔR_{r,m,i} + 1e-8)`` (normalised across the
    group at each transition), clipped to ±adv_clip_max."""
    if step_rewards.dim() != 3:
        raise ValueError(f"step_rewards must be [num_rewards, B, T+1], got shape {tuple(step_rewards.shape)}")
    return mgai_advantages(dense_gains(step_rewards)[:, None], group_size, adv_clip_max, weights)


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

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

"""PPO-clipped GRPO policy loss (G2RPO_ALGORITHM.md §5). No KL term, no reference model."""

from __future__ import annotations

import torch


def ppo_clip_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float):
    """``mean_n max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))`` with ``ratio = exp(new - old)``.

    Returns ``(loss, stats)``; ``stats`` holds detached diagnostics: ``clip_frac`` (share of
    samples whose clipped term was the active one), ``ratio_mean`` and ``approx_kl``
    (``mean((ratio - 1) - log ratio)``, a non-negative estimate of KL(old‖new)).
    """
    if not (new_log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"new_log_prob {tuple(new_log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"advantages {tuple(advantages.shape)} must have the same shape")
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range}: must be > 0")
    log_ratio = new_log_prob.float() - old_log_prob.float().detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": (clipped > unclipped).float().mean(),
            "ratio_mean": ratio.mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
        }
    return loss, stats

"""PPO-clipped GRPO policy loss (docs/algorithm.md §5) and the optional KL penalty to a frozen reference
(``ppo.kl_beta``; Flow-GRPO's and DenseGRPO's β, off by default as in G²RPO, DanceGRPO and MixGRPO)."""

from __future__ import annotations

import torch


def _check(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    if not (new_log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(f"new_log_prob {tuple(new_log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"advantages {tuple(advantages.shape)} must have the same shape")
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range}: must be > 0")


def _clipped_objective(ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                       scale: torch.Tensor | None = None):
    """``mean_n max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)) / scale_n`` (``scale`` None: 1) and its diagnostics;
    ``log_ratio`` is the plain ``new - old`` (``approx_kl`` is of the plain ratio)."""
    advantages = advantages.float().detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    loss = (terms if scale is None else terms / scale).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": (clipped > unclipped).float().mean(),
            "ratio_mean": ratio.mean(),
            "approx_kl": ((torch.exp(log_ratio) - 1) - log_ratio).mean(),
        }
    return loss, stats


def ppo_clip_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float):
    """``mean_n max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε))`` with ``ratio = exp(new - old)``.

    Returns ``(loss, stats)``; ``stats`` holds detached diagnostics: ``clip_frac`` (share of
    samples whose clipped term was the active one), ``ratio_mean`` and ``approx_kl``
    (``mean((ratio - 1) - log ratio)``, a non-negative estimate of KL(old‖new)).
    """
    _check(new_log_prob, old_log_prob, advantages, clip_range)
    log_ratio = new_log_prob.float() - old_log_prob.float().detach()
    return _clipped_objective(torch.exp(log_ratio), log_ratio, advantages, clip_range)


def guard_clip_loss(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                    old_mean: torch.Tensor, std: torch.Tensor, dt: torch.Tensor, advantages: torch.Tensor,
                    clip_range: float):
    """GRPO-Guard's regulated clipping (``ppo.guard``, Flow-GRPO's GRPO-Guard trainer): `ppo_clip_loss` on the
    normalised ratio, each transition's term re-weighted by ``1/|dt|``.

    With ``s`` the transition's std (0-d, or per transition ``[m, 1, ...]``), ``μ_θ`` its mean under the policy
    (``[m, ...]`` or ``[1, ...]`` shared by the m) and ``μ_old`` under the sampling policy::

        log r̂ = s · (log p_θ − log p_old + mean((μ_θ − μ_old)²) / (2 s²))       (= mean(ε · (μ_θ − μ_old)))
        loss  = mean_n max(−A·r̂, −A·clip(r̂, 1 − ε, 1 + ε)) / |dt_n|

    The mean-shift term keeps its gradient (it cancels the part of ∇log p_θ that would push r̂ below 1). Flow-GRPO
    takes ``s`` and ``dt`` as the micro-batch's means, all of whose rows share a timestep; here they are per
    transition, which is the same there. ``stats`` as `ppo_clip_loss` (clip_frac on r̂; approx_kl of the plain
    ratio, as Flow-GRPO logs it)."""
    _check(new_log_prob, old_log_prob, advantages, clip_range)
    if mean.shape[1:] != old_mean.shape[1:]:
        raise ValueError(f"mean {tuple(mean.shape)} and old mean {tuple(old_mean.shape)} differ in shape")
    m = new_log_prob.shape[0]
    s = std.float().reshape(-1).expand(m) if std.numel() == 1 else std.float().reshape(m)
    step = dt.float().abs().reshape(-1).expand(m).to(s.device)
    shift = ((mean.float() - old_mean.float().detach()) ** 2).flatten(1).mean(dim=1).expand(m) / (2 * s**2)
    log_ratio = new_log_prob.float() - old_log_prob.float().detach()
    return _clipped_objective(torch.exp((log_ratio + shift) * s), log_ratio, advantages, clip_range, scale=step)


def reference_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor, dt: torch.Tensor | None = None,
                 form: str = "exact") -> torch.Tensor:
    """``KL(π_θ(·|x_t) ‖ π_ref(·|x_t))`` of one SDE transition, averaged over its elements -> ``[B]``.

    ``form="flow_grpo"`` is Flow-GRPO's code instead: ``mean((μ_θ − μ_ref)²) / (2·s²)`` with ``s`` the noise level,
    ``std = s·sqrt(|dt|)``, so it is ``|dt|`` (0-d or ``[B]``) times the exact KL (``ppo.kl_form``).

    Both policies' transitions are Gaussians with the same standard deviation ``std`` (it depends on the
    grid and the noise level only), so per element ``KL = (μ_θ − μ_ref)² / (2·std²)``; averaged over the
    non-batch elements like the log-prob (`g2rpo.flow.gaussian_log_prob`). Gradients flow through ``mean``
    only: ``ref_mean`` is the frozen reference's. ``mean`` may have batch size 1 where the whole group
    shares its transition's start (G²RPO's branch step).
    """
    if mean.shape[1:] != ref_mean.shape[1:]:
        raise ValueError(f"mean {tuple(mean.shape)} and reference mean {tuple(ref_mean.shape)} differ in shape")
    squared = (mean.float() - ref_mean.float().detach()) ** 2 / (2 * std.float() ** 2)
    kl = squared.flatten(1).mean(dim=1)
    if form == "exact":
        return kl
    if form != "flow_grpo" or dt is None:
        raise ValueError(f"reference_kl form={form!r}: expected exact, or flow_grpo with the steps dt")
    return kl * dt.float().abs().to(kl.device)

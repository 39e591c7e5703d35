"""GRPO-Guard (``ppo.guard``): its loss against an independent float64 computation of Flow-GRPO's formula, its
gradient against the closed form, and the rollouts' stored means against the update's own recomputation."""

import numpy as np
import pytest
import torch

from g2rpo.loss import guard_clip_loss, ppo_clip_loss
from tests.conftest import ROOT, model_overrides


def numpy_guard_loss(x_next, mean, old_mean, s, dt, new_lp, old_lp, adv, clip):
    """Flow-GRPO's GRPO-Guard trainer, one micro-batch row at a time (its σ_t·√Δt and Δt are the row's own):
    the ratio exp((log p − log p_old + mean(Δμ²) / (2 (σ√Δt)²)) · σ√Δt), the clipped loss divided by Δt."""
    terms = []
    for n in range(len(adv)):
        bias = np.mean((mean[min(n, len(mean) - 1)] - old_mean[min(n, len(old_mean) - 1)]) ** 2) / (2 * s[n] ** 2)
        ratio = np.exp((new_lp[n] - old_lp[n] + bias) * s[n])
        unclipped, clipped = -adv[n] * ratio, -adv[n] * np.clip(ratio, 1 - clip, 1 + clip)
        terms.append(max(unclipped, clipped) / abs(dt[n]))
    return float(np.mean(terms))


def numpy_log_prob(x, mean, s):
    """The per-element mean Gaussian log-density, constants included (as the rollouts score it)."""
    return np.mean(-((x - mean) ** 2) / (2 * s**2) - np.log(s) - 0.5 * np.log(2 * np.pi))


def transitions(m, shared, seed=0, shift=1e-3):
    """m transitions of 2x4x4 latents: a sampling mean, a policy mean shifted from it, x_next = μ_old + s·ε; per
    transition std and dt (``shared``: one mean for all m and one step, G²RPO's branch step)."""
    g = torch.Generator().manual_seed(seed)
    rows = 1 if shared else m
    old_mean = torch.randn(rows, 2, 4, 4, generator=g, dtype=torch.float64)
    mean = old_mean + shift * torch.randn(rows, 2, 4, 4, generator=g, dtype=torch.float64)
    dt = torch.full((m,), -0.1, dtype=torch.float64) if shared else -torch.rand(m, generator=g, dtype=torch.float64) * 0.2 - 0.01
    s = 0.7 * torch.sqrt(-dt) * (1 if shared else torch.rand(m, generator=g, dtype=torch.float64) + 0.5)
    eps = torch.randn(m, 2, 4, 4, generator=g, dtype=torch.float64)
    x_next = old_mean + s.reshape(m, 1, 1, 1) * eps
    adv = torch.randn(m, generator=g, dtype=torch.float64)
    return old_mean, mean, dt, s, eps, x_next, adv


def log_probs(x_next, mean, s):
    m = x_next.shape[0]
    return torch.tensor([numpy_log_prob(x_next[n].numpy(), mean[min(n, len(mean) - 1)].numpy(), s[n].item())
                         for n in range(m)], dtype=torch.float64)


@pytest.mark.parametrize("shared", [True, False], ids=["g2rpo-shared-mean", "per-transition"])
@pytest.mark.parametrize("shift,clip", [(1e-3, 1.0), (3e-2, 2e-6)], ids=["inside-the-clip", "clip-active"])
def test_the_guard_loss_equals_an_independent_computation(shared, shift, clip):
    m = 6
    old_mean, mean, dt, s, eps, x_next, adv = transitions(m, shared, shift=shift)
    new_lp, old_lp = log_probs(x_next, mean, s), log_probs(x_next, old_mean, s)
    std = s[:1].reshape(()) if shared else s.reshape(m, 1, 1, 1)  # as the methods hand it: 0-d, or [m, 1, ...]
    step = dt[0] if shared else dt
    loss, stats = guard_clip_loss(new_lp, old_lp, mean, old_mean, std, step, adv, clip)
    expected = numpy_guard_loss(x_next.numpy(), mean.numpy(), old_mean.numpy(), s.numpy(), dt.numpy(),
                                new_lp.numpy(), old_lp.numpy(), adv.numpy(), clip)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # the normalised log-ratio in closed form: mean(ε·(μ_θ − μ_old)); centred on 0 whatever the timestep
    closed = (eps * (mean - old_mean)).flatten(1).mean(1)
    ratio = torch.exp(closed)
    assert stats["ratio_mean"].item() == pytest.approx(ratio.mean().item(), rel=1e-6)
    clipped_wins = (-adv * ratio.clamp(1 - clip, 1 + clip) > -adv * ratio).double().mean().item()
    assert stats["clip_frac"].item() == pytest.approx(clipped_wins) and (clipped_wins > 0) == (clip < 1)
    # not the plain PPO loss: its ratio is far from 1 where the normalised one is not
    plain, _ = ppo_clip_loss(new_lp, old_lp, adv, clip)
    assert abs(plain.item() - loss.item()) > 1e-6


@pytest.mark.parametrize("shared", [True, False], ids=["g2rpo-shared-mean", "per-transition"])
def test_the_guard_gradient_is_the_closed_form(shared):
    """Inside the clip, ∂loss/∂μ_θ of transition n is −A_n·r̂_n·ε_n / (D·|dt_n|·m): the mean-shift term's gradient
    cancels the Δμ-dependent part of ∇log p_θ (detaching it would not), and 1/|dt| evens the steps' scales."""
    m = 5
    old_mean, mean, dt, s, eps, x_next, adv = transitions(m, shared, seed=3, shift=1e-2)
    mean = mean.clone().requires_grad_(True)
    std = s[:1].reshape(()) if shared else s.reshape(m, 1, 1, 1)
    new_lp = (-((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * np.log(2 * np.pi)).flatten(1).mean(1)
    old_lp = log_probs(x_next, old_mean, s)
    loss, _ = guard_clip_loss(new_lp, old_lp, mean, old_mean, std, dt[0] if shared else dt, adv, clip_range=1.0)
    (grad,) = torch.autograd.grad(loss, mean)
    d = eps[0].numel()
    ratio = torch.exp((eps * (mean.detach() - old_mean)).flatten(1).mean(1))
    per_row = (-adv * ratio / (d * dt.abs() * m)).reshape(m, 1, 1, 1) * eps
    expected = per_row.sum(0, keepdim=True) if shared else per_row
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-9)  # the loss is computed in float32


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny_flowgrpo.yaml", "tiny_mixgrpo.yaml", "tiny_sd35m_densegrpo.yaml"])
def test_the_rollout_keeps_the_means_the_update_recomputes(request, tmp_path, config):
    """Before any update the policy is the sampling policy: every chunk's recomputed mean equals the mean its
    rollout stored for that (generation, transition), the log-probs agree, and the normalised ratio is 1 -- on
    FLUX (G²RPO, Flow-GRPO, MixGRPO) and on SD3 with classifier-free guidance (DenseGRPO)."""
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer
    from tests.conftest import sd3_model_overrides

    if "sd35m" in config:
        models, embeddings = request.getfixturevalue("tiny_sd3_models"), request.getfixturevalue("tiny_sd3_embeddings")
        overrides = sd3_model_overrides(models)
    else:
        models, embeddings = request.getfixturevalue("tiny_models"), request.getfixturevalue("tiny_embeddings")
        overrides = model_overrides(models)
    cfg = load_config(TrainConfig, ROOT / "configs" / config, [
        *overrides, f"data.index={embeddings / 'index.jsonl'}", f"output_dir={tmp_path}",
        "ppo.guard=true", "eval_every=0", "sample_every=0", "data.holdout=0"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    try:
        groups = trainer.rollout(0)
        trainer.score(groups)
        chunks = [c for unit in trainer.method.units(groups, trainer.advantages(groups)) for c in unit]
        assert chunks and all(c.old_means is not None for c in chunks)
        for chunk in chunks:
            with torch.no_grad():
                new = chunk.transition(trainer.engine.module)
            torch.testing.assert_close(new.mean.expand_as(chunk.old_means), chunk.old_means, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new.log_probs, chunk.old_log_probs, rtol=1e-5, atol=1e-5)
            _, stats = guard_clip_loss(new.log_probs, chunk.old_log_probs, new.mean, chunk.old_means, new.std,
                                       new.dt, chunk.advantages, cfg.ppo.clip_range)
            assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    finally:
        trainer.close()

"""MGAI (spec §4) against a plain loop, and the PPO-clip loss (§5) against per-sample arithmetic."""

import statistics

import pytest
import torch

from g2rpo.advantages import mgai_advantages
from g2rpo.loss import ppo_clip_loss


def _loop_mgai(rewards, group_size, clip=None, weights=None):
    """§4 with Python loops and the statistics module (unbiased stdev), one slice at a time."""
    num_r, num_g, b, k = rewards.shape
    out = torch.zeros(b, k, dtype=torch.float64)
    for r in range(num_r):
        for g in range(num_g):
            for step in range(k):
                for start in range(0, b, group_size):
                    values = [float(rewards[r, g, n, step]) for n in range(start, start + group_size)]
                    mean, std = statistics.fmean(values), statistics.stdev(values)
                    for offset, value in enumerate(values):
                        weight = 1.0 if weights is None else weights[r]
                        out[start + offset, step] += weight * (value - mean) / (std + 1e-8)
    return out.clamp(-clip, clip) if clip is not None else out


def test_mgai_equals_loop_implementation():
    rewards = torch.randn(2, 3, 12, 4, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.3
    for clip in (None, 5.0, 1.5):
        torch.testing.assert_close(mgai_advantages(rewards, 4, clip).double(), _loop_mgai(rewards, 4, clip),
                                   atol=1e-5, rtol=1e-5)
    weights = [1.0, 0.5]
    torch.testing.assert_close(mgai_advantages(rewards, 6, 5.0, weights=weights).double(),
                               _loop_mgai(rewards, 6, 5.0, weights), atol=1e-5, rtol=1e-5)


def test_single_reward_single_granularity_is_plain_grpo():
    rewards = torch.rand(1, 1, 8, 3, generator=torch.Generator().manual_seed(1))
    groups = rewards[0, 0].view(2, 4, 3)
    grpo = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-8)).view(8, 3)
    torch.testing.assert_close(mgai_advantages(rewards, 4), grpo)
    # and every group's advantages sum to zero at every step
    torch.testing.assert_close(mgai_advantages(rewards, 4).view(2, 4, 3).sum(1), torch.zeros(2, 3), atol=1e-5, rtol=0)


def test_zero_variance_group_gives_zero_not_nan():
    rewards = torch.rand(1, 2, 8, 2, generator=torch.Generator().manual_seed(2))
    rewards[:, :, :4, 0] = 0.3  # group 0, step 0: identical rewards (0.3 has no exact float mean)
    advantages = mgai_advantages(rewards, 4, 5.0)
    assert torch.isfinite(advantages).all()
    assert torch.equal(advantages[:4, 0], torch.zeros(4))
    torch.testing.assert_close(advantages[4:].double(), _loop_mgai(rewards, 4, 5.0)[4:], atol=1e-5, rtol=1e-5)


def test_advantage_clip():
    rewards = torch.zeros(2, 2, 12, 1)
    rewards[:, :, 0] = 10.0  # one outlier per group: normalised value (n-1)/sqrt(n) = 3.18 per term
    advantages = mgai_advantages(rewards, 12, adv_clip_max=5.0)
    assert advantages[0, 0] == 5.0  # 4 terms x 3.18 = 12.7, clipped
    assert mgai_advantages(rewards, 12)[0, 0] == pytest.approx(4 * 11 / 12**0.5, rel=1e-5)


def test_mgai_validates():
    with pytest.raises(ValueError, match="num_rewards, num_granularities, B, K"):
        mgai_advantages(torch.zeros(12, 4), 4)
    with pytest.raises(ValueError, match="not a whole number of groups of 5"):
        mgai_advantages(torch.zeros(1, 1, 12, 1), 5)
    with pytest.raises(ValueError, match="group_size=1"):
        mgai_advantages(torch.zeros(1, 1, 12, 1), 1)
    with pytest.raises(ValueError, match="NaN"):
        mgai_advantages(torch.full((1, 1, 4, 1), float("nan")), 2)


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage():
    advantages = torch.tensor([1.5, -0.5, 2.0, -3.0])
    log_prob = torch.tensor([0.1, -0.2, 0.3, 0.0], requires_grad=True)
    loss, stats = ppo_clip_loss(log_prob, log_prob.detach().clone(), advantages, 1e-4)
    assert loss.item() == pytest.approx(-advantages.mean().item())
    assert stats["clip_frac"] == 0 and stats["ratio_mean"] == 1 and stats["approx_kl"] == 0
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -advantages / 4)  # d ratio / d log_prob = ratio = 1


def test_ppo_loss_clipping_on_both_sides():
    eps = 0.2
    old = torch.zeros(6)
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1, 0.9])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -2.0])
    new = torch.log(ratio).requires_grad_(True)
    loss, stats = ppo_clip_loss(new, old, advantages, eps)
    per_sample = [max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)) for a, r in zip(advantages.tolist(), ratio.tolist())]
    # A>0, ratio above 1+ε: clipped to -A(1+ε); A<0, ratio below 1-ε: clipped to -A(1-ε);
    # the other two "bad" directions keep the unclipped (larger) loss; inside the band nothing clips
    assert per_sample == pytest.approx([-1.2, 1.5, -0.5, 0.8, -2.2, 1.8])
    assert loss.item() == pytest.approx(sum(per_sample) / 6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 6)
    loss.backward()
    expected_grad = torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2, 1.8]) / 6  # -A·ratio/6 where unclipped, 0 where clipped
    torch.testing.assert_close(new.grad, expected_grad)


def test_ppo_loss_validates():
    with pytest.raises(ValueError, match="same shape"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="clip_range=0"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0)


def test_reference_kl_is_the_gaussian_kl_with_its_gradient():
    """`reference_kl` against torch.distributions' KL of the two Gaussians (mean over elements), its gradient
    against autograd of that independent formula, and 0 with a zero gradient at the reference."""
    from torch.distributions import Normal, kl_divergence

    from g2rpo.loss import reference_kl

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 4, generator=g)
    for std in (torch.tensor(0.3), torch.tensor([0.2, 0.5, 1.5]).reshape(3, 1, 1)):  # one step; a step per sample
        mean = (ref + 0.1 * torch.randn(3, 5, 4, generator=g)).requires_grad_()
        got = reference_kl(mean, ref, std)
        expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(ref, std.expand_as(ref))).flatten(1).mean(1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        weights = torch.tensor([0.5, -1.0, 2.0])
        (grad,) = torch.autograd.grad((got * weights).sum(), mean)
        (independent,) = torch.autograd.grad((expected * weights).sum(), mean)
        torch.testing.assert_close(grad, independent, rtol=1e-5, atol=1e-7)
    at_reference = ref.clone().requires_grad_()
    kl = reference_kl(at_reference, ref, torch.tensor(0.3))
    assert torch.equal(kl, torch.zeros(3)) and torch.equal(torch.autograd.grad(kl.sum(), at_reference)[0],
                                                           torch.zeros_like(ref))
    shared = reference_kl(mean[:1], ref[:1], torch.tensor(0.3))  # G²RPO: one mean for the whole group
    assert shared.shape == (1,)

"""Singular-SDE rollouts (spec §3) on the tiny FLUX transformer: shared order == reference order."""

import dataclasses

import pytest
import torch

from g2rpo.config import SamplingConfig
from g2rpo.models import load_transformer
from g2rpo.models.flux import PromptEmbedding
from g2rpo.rollout import (VelocityField, complete_granular, expected_cost, policy_log_probs,
                           singular_sde_rollout)

# The reference recipe's sampling at a tiny resolution (32x32 px -> 4x4 latent -> 4 tokens).
REFERENCE = SamplingConfig(num_steps=16, branch_steps=list(range(8)), granularities=[1, 2], group_size=12,
                           height=32, width=32)


@pytest.fixture(scope="module")
def transformer(tiny_models):
    return load_transformer(tiny_models.base.path, "float32", subfolder="transformer").eval()


@pytest.fixture(scope="module")
def embedding(tiny_pipeline):
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = tiny_pipeline.encode_prompt("A red panda napping on a branch", None)
    return PromptEmbedding.from_batched(prompt_embeds, pooled, text_ids)


def _rollout(transformer, embedding, cfg, seed=0):
    return singular_sde_rollout(transformer, embedding, cfg, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shared(transformer, embedding):
    return _rollout(transformer, embedding, REFERENCE)


@pytest.fixture(scope="module")
def reference(transformer, embedding):
    return _rollout(transformer, embedding, dataclasses.replace(REFERENCE, order="reference"))


def test_shapes_and_closed_form_cost(shared, reference):
    n, k, g, tokens = 12, 8, 2, 4
    assert shared.anchor_latents.shape == (17, tokens, 64)
    assert shared.next_latents.shape == (n, k, tokens, 64)
    assert shared.old_log_probs.shape == (n, k)
    assert shared.completions.shape == (n, k, g, tokens, 64)
    assert shared.branch_latents.shape == (k, tokens, 64)
    # spec §3 "Cost": 16 anchor + 92 (g=1) + 32 (g=2) calls of batch 12; reference: 1,792 calls of batch 1
    assert (shared.num_calls, shared.num_sample_forwards) == (140, 1504)
    assert (reference.num_calls, reference.num_sample_forwards) == (1792, 1792)
    assert expected_cost(REFERENCE) == {"calls": 140, "sample_forwards": 1504}
    assert expected_cost(dataclasses.replace(REFERENCE, order="reference")) == {"calls": 1792, "sample_forwards": 1792}


def test_shared_order_equals_reference_order(shared, reference):
    for name in ("anchor_latents", "next_latents", "old_log_probs", "completions"):
        torch.testing.assert_close(getattr(shared, name), getattr(reference, name), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert torch.isfinite(shared.old_log_probs).all()
    # the branch noise makes generations differ; granularities give different completions
    assert not torch.allclose(shared.next_latents[0], shared.next_latents[1])
    assert not torch.allclose(shared.completions[:, :, 0], shared.completions[:, :, 1])


def test_micro_batching_changes_nothing_but_the_call_count(transformer, embedding, shared):
    cfg = dataclasses.replace(REFERENCE, micro_batch=5)
    chunked = _rollout(transformer, embedding, cfg)
    torch.testing.assert_close(chunked.completions, shared.completions, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked.old_log_probs, shared.old_log_probs, atol=1e-5, rtol=1e-5)
    assert chunked.num_sample_forwards == 1504
    assert chunked.num_calls == 16 + 124 * 3 == expected_cost(cfg)["calls"]  # 12 = 5 + 5 + 2


def test_deterministic_given_the_generator(transformer, embedding, shared):
    cfg = dataclasses.replace(REFERENCE, branch_steps=[0, 3])
    first, again = _rollout(transformer, embedding, cfg), _rollout(transformer, embedding, cfg)
    for name in ("anchor_latents", "next_latents", "old_log_probs", "completions"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    # the start noise is drawn first, so the anchor does not depend on K
    assert torch.equal(first.anchor_latents, shared.anchor_latents)
    other = _rollout(transformer, embedding, cfg, seed=1)
    assert not torch.equal(other.anchor_latents[0], first.anchor_latents[0])
    assert not torch.equal(other.next_latents, first.next_latents)


def test_first_granularity_completion_from_the_anchor_reproduces_the_anchor(transformer, embedding, shared):
    velocity = VelocityField(transformer, embedding, (32, 32), 3.5)
    with torch.no_grad():
        for k in (0, 4, 7):
            x = shared.anchor_latents[k + 1][None]
            completion = complete_granular(velocity, x, shared.sigmas, k, [1])
            torch.testing.assert_close(completion[0, 0], shared.anchor_latents[-1], atol=1e-5, rtol=1e-5)


def test_granular_completion_equals_hand_rolled_ode(transformer, embedding, shared):
    """k=1, g=2: from x_2, steps 2->3->5->7->...->15; the result is x̂0 at index 13 (the last step taken)."""
    sigmas = shared.sigmas
    velocity = VelocityField(transformer, embedding, (32, 32), 3.5)
    x = shared.next_latents[:3, 1]
    with torch.no_grad():
        state = x
        for a, b in [(2, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]:
            v = velocity(state, sigmas[a])
            state = state + (sigmas[b] - sigmas[a]) * v
        v = velocity(state, sigmas[13])
        expected = state - sigmas[13] * v
    torch.testing.assert_close(shared.completions[:3, 1, 1], expected, atol=1e-5, rtol=1e-5)


def test_rollout_policy_gives_ratio_one(transformer, embedding, shared):
    """Re-scoring the stored samples under the unchanged policy reproduces the old log-probs (§5)."""
    for ki in (0, 5, 7):
        new = policy_log_probs(transformer, embedding, shared, ki, REFERENCE)
        torch.testing.assert_close(new, shared.old_log_probs[:, ki], atol=1e-5, rtol=1e-5)
        assert new.requires_grad


def test_group_update_forward_equals_per_generation_forwards(transformer, embedding, shared):
    """§5 with one forward at (a_k, σ_k) for the group == the reference's forward/backward per generation.

    The policy is perturbed first so that ratios differ from 1 and the clip is active for some samples.
    """
    import copy

    from g2rpo.loss import ppo_clip_loss

    policy = copy.deepcopy(transformer)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 1e-2)
    ki, clip = 4, 1e-4
    advantages = torch.randn(12, generator=torch.Generator().manual_seed(7))
    old = shared.old_log_probs[:, ki]

    new = policy_log_probs(policy, embedding, shared, ki, REFERENCE)
    loss, stats = ppo_clip_loss(new, old, advantages, clip)
    assert 0 < stats["clip_frac"] < 1, (new - old)
    grouped = torch.autograd.grad(loss, list(policy.parameters()))

    per_generation = [torch.zeros_like(p) for p in policy.parameters()]
    for n in range(12):
        one = dataclasses.replace(shared, next_latents=shared.next_latents[n:n + 1])
        new_n = policy_log_probs(policy, embedding, one, ki, REFERENCE)
        loss_n, _ = ppo_clip_loss(new_n, old[n:n + 1], advantages[n:n + 1], clip)
        for acc, grad in zip(per_generation, torch.autograd.grad(loss_n / 12, list(policy.parameters()))):
            acc += grad
    for (name, _), a, b in zip(policy.named_parameters(), grouped, per_generation):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_rollout_makes_no_host_syncs(transformer, embedding):
    """No ``.item()`` / ``bool(tensor)`` / data-dependent shapes in the inner loop: on CUDA each would
    stall the launch queue once per call. Checked on CPU at the dispatcher, where they all pass through."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default}

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    cfg = dataclasses.replace(REFERENCE, branch_steps=[0, 3], group_size=3)
    with Record() as record:
        _rollout(transformer, embedding, cfg)
    assert record.seen == []
    with Record() as record:  # the probe itself sees a sync
        bool(torch.ones(1).sum() > 0)
    assert record.seen == ["aten._local_scalar_dense.default"]


def test_rollout_validates_embeddings(transformer, embedding):
    bad = PromptEmbedding(embedding.prompt_embeds, torch.zeros(7), embedding.text_ids)
    with pytest.raises(ValueError, match="pooled_prompt_embeds dim 7"):
        _rollout(transformer, bad, REFERENCE)
    bad = PromptEmbedding(embedding.prompt_embeds[:, :8], embedding.pooled_prompt_embeds, embedding.text_ids)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        _rollout(transformer, bad, REFERENCE)
    bad = PromptEmbedding(embedding.prompt_embeds, embedding.pooled_prompt_embeds, embedding.text_ids[:10])
    with pytest.raises(ValueError, match="text_ids"):
        _rollout(transformer, bad, REFERENCE)


@pytest.mark.parametrize("field, value, message", [
    ("branch_steps", [], "branch_steps is empty"),
    ("granularities", [1, 0], "granularities"),
    ("group_size", 1, "group_size=1"),
    ("height", 100, "height=100"),
    ("order", "fast", "order='fast'"),
    ("eta", 0.0, "eta=0.0"),
])
def test_sampling_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(REFERENCE, **{field: value})

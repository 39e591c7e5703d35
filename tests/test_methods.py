"""The method family (g2rpo.methods, g2rpo.trajectory): each method's math against an independent
computation or a closed form, the batched orders against the naive ones, and every tiny config training
through the one Trainer."""

import math

import pytest
import torch

from conftest import ROOT, model_overrides
from g2rpo.advantages import (calibrate_psi, dense_advantages, dense_gains, group_normalize, mgai_advantages,
                              terminal_advantages)
from g2rpo.config import SamplingConfig, TrainConfig, load_config
from g2rpo.flow import noise_level, sde_step, sde_step_stats, sigma_schedule
from g2rpo.methods import TrajectoryMethod, window_transitions
from g2rpo.models import load_transformer
from g2rpo.models.flux import PromptEmbedding
from g2rpo.rollout import ode_sample
from g2rpo.trajectory import expected_trajectory_cost, sde_trajectories

METHOD_CONFIGS = ["tiny.yaml", "tiny_dancegrpo.yaml", "tiny_flowgrpo.yaml", "tiny_mixgrpo.yaml",
                  "tiny_densegrpo.yaml"]
SMALL = SamplingConfig(num_steps=5, group_size=3, height=32, width=32, eta=0.7)


@pytest.fixture(scope="module")
def model(tiny_models):
    return load_transformer(tiny_models.base.path, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def embedding(model):
    g = torch.Generator().manual_seed(0)
    return PromptEmbedding(torch.randn(8, model.config.joint_attention_dim, generator=g),
                           torch.randn(model.config.pooled_projection_dim, generator=g), torch.zeros(8, 3))


# ------------------------------------------------------------------------------------ transition math


def test_noise_levels_and_per_sample_steps():
    sigmas = sigma_schedule(6, 3.0)
    flow = noise_level(sigmas, torch.arange(6), 0.7)
    for i in range(6):
        sigma = sigmas[i] if sigmas[i] < 1 else sigmas[1]
        assert flow[i].item() == pytest.approx(0.7 * math.sqrt(sigmas[i] / (1 - sigma)), rel=1e-6)
    assert torch.equal(noise_level(sigmas, torch.arange(6), 0.3, "dance"), torch.full((6,), 0.3))
    # DanceGRPO's step written out: mean = x + dt·v + η²/(2σ)·(x + (1−σ)v)·dt, std = η·sqrt(−dt)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    mean, std, _ = sde_step_stats(x, v, sigmas, 2, 0.0, level=0.3)
    s, dt = sigmas[2], sigmas[3] - sigmas[2]
    torch.testing.assert_close(mean, x + dt * v + 0.3**2 / (2 * s) * (x + (1 - s) * v) * dt)
    assert std.item() == pytest.approx(0.3 * math.sqrt(-dt), rel=1e-6)
    # each sample at its own step, in one call == one call per sample
    index = torch.tensor([0, 3])
    nxt = torch.randn(2, 4, 3, generator=g)
    batched = sde_step(v, x, sigmas, index, 0.0, prev_sample=nxt, level=flow[index])[2]
    single = torch.stack([sde_step(v[j:j + 1], x[j:j + 1], sigmas, int(index[j]), 0.7, prev_sample=nxt[j:j + 1])[2][0]
                          for j in range(2)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------ advantages


def test_terminal_advantages_are_the_group_normalised_weighted_sum():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(2, 8, generator=g)
    weights = torch.tensor([1.0, 0.5])
    expected = sum(w * group_normalize(r, 4, dim=0) for w, r in zip(weights, rewards)).clamp(-5, 5)
    torch.testing.assert_close(terminal_advantages(rewards, 4, 5.0, weights), expected)


def test_dense_gains_telescope_and_normalise_per_transition():
    g = torch.Generator().manual_seed(3)
    step_rewards = torch.randn(1, 6, 5, generator=g)  # [R, N, T+1]
    gains = dense_gains(step_rewards)
    torch.testing.assert_close(gains.sum(-1), step_rewards[..., -1] - step_rewards[..., 0])
    adv = dense_advantages(step_rewards, 3, None)
    for i in range(4):
        for grp in (slice(0, 3), slice(3, 6)):
            column = gains[0, grp, i]
            torch.testing.assert_close(adv[grp, i], (column - column.mean()) / (column.std() + 1e-8))


def test_under_singular_sampling_the_dense_advantage_is_the_plain_one():
    """A G²RPO branch: every generation leaves the same anchor a_k, whose ODE completion is the anchor's own
    image (one reward for the whole group); the dense gain R(x̂0 of x_{k+1}) − R(anchor) normalises to the
    plain per-step advantage."""
    g = torch.Generator().manual_seed(4)
    branch = torch.randn(2, 8, generator=g)  # [R, N]: rewards of the N completions of x_{k+1}
    anchor = torch.randn(2, 1, generator=g).expand(-1, 8)  # the shared anchor's reward
    dense = dense_advantages(torch.stack([anchor, branch], dim=-1), 8, 5.0)[:, 0]
    plain = mgai_advantages(branch[:, None, :, None], 8, 5.0)[:, 0]
    torch.testing.assert_close(dense, plain, atol=1e-5, rtol=1e-5)


def test_psi_calibration_round_moves_each_level_by_eps2():
    psi = torch.tensor([0.5, 0.5, 0.5, 0.005])
    gains = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, 2.0, 1.0], [1.0, -1.0, 3.0, -1.0],
                          [-1.0, 1.0, 4.0, 0.0]])  # balance |#pos − #neg| per t: 0, 2, 4, 1
    new = calibrate_psi(psi, gains, eps1=2, eps2=0.01)
    torch.testing.assert_close(new, torch.tensor([0.51, 0.49, 0.49, 0.015]))
    assert calibrate_psi(torch.tensor([0.005]), torch.ones(4, 1), 2, 0.01)[0] == 0.0  # floored at 0
    pooled = calibrate_psi(psi, torch.cat([gains, gains]), eps1=2, eps2=0.01, groups=2)  # ε₁ scales with groups
    torch.testing.assert_close(pooled, new)


# ------------------------------------------------------------------------------------ what is trained


def test_mixgrpo_window_moves_on_schedule_and_rolls_back():
    windows = [window_transitions(step, 8, size=3, start=1, shift_every=2, stride=1) for step in range(12)]
    assert windows[:8] == [[1, 2, 3]] * 2 + [[2, 3, 4]] * 2 + [[3, 4, 5]] * 2 + [[4, 5]] * 2
    assert windows[8:] == [[5]] * 2 + [[0, 1, 2]] * 2  # w = 6 = T − 2 would be empty: back to 0
    assert window_transitions(99, 25, 4, 0, 20, 0) == [0, 1, 2, 3]  # stride 0: MixGRPO-Flash*'s fixed window


def _diffusers_dpm(grid):
    """diffusers' DPM-Solver++(2M) (midpoint, flow prediction) stepping over the σ grid ``grid``."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                            prediction_type="flow_prediction", use_flow_sigmas=True,
                                            final_sigmas_type="zero")
    scheduler.set_timesteps(len(grid) - 1)
    scheduler.sigmas, scheduler.timesteps = grid.float().clone(), grid[:-1].float() * 1000  # our grid, not its own
    return scheduler


def test_dpm_solver_step_is_diffusers_dpm_solver_plus_plus_2m():
    """`dpm_solver_step` along a shifted grid equals diffusers' DPMSolverMultistepScheduler (first order from no
    history, second order after, first order into σ = 0); its first-order step is the Euler step."""
    from g2rpo.flow import dpm_solver_step, ode_step

    g = torch.Generator().manual_seed(0)
    weight = 0.3 * torch.randn(6, 6, generator=g)
    velocity = lambda x, sigma: x @ weight + sigma  # noqa: E731 -- any smooth field
    grid = sigma_schedule(8, 3.0)[2:]  # from σ_2 (< 1) to 0
    scheduler = _diffusers_dpm(grid)
    ours = theirs = torch.randn(2, 6, generator=g)
    prev = None
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i].item(), grid[i + 1].item()
        v = velocity(ours, sigma)
        x0 = ours - sigma * v
        if i == 0:  # first order: Euler
            torch.testing.assert_close(dpm_solver_step(ours, x0, sigma, sigma_next), ode_step(v, ours, grid, 0)[0])
        ours, prev = dpm_solver_step(ours, x0, sigma, sigma_next, prev, grid[i - 1].item() if i else None), x0
        theirs = scheduler.step(velocity(theirs, sigma), scheduler.timesteps[i], theirs).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_mixgrpo_flash_grid_and_solver_after_the_window(model, embedding):
    """The compressed grid (MixGRPO's example: T = 25, window ending at 3, ratio 0.4 -> 7 steps after it; ratio 1
    -> the T-step grid), and a Flash rollout: identical to the Euler one through the window (latents and
    old log-probs), then DPM-Solver++(2M) steps whose first already uses the window's last x̂0 -- diffusers'
    scheduler, its history primed with that x̂0, gives the same final latents."""
    from g2rpo.rollout import VelocityField
    from g2rpo.trajectory import compressed_grid

    grid = compressed_grid(25, 3.0, 3, 0.4)
    assert len(grid) == 3 + 1 + 8 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    torch.testing.assert_close(grid[:5], sigma_schedule(25, 3.0)[:5])
    torch.testing.assert_close(compressed_grid(25, 3.0, 3, 1.0), sigma_schedule(25, 3.0))

    cfg = SamplingConfig(num_steps=6, group_size=3, height=32, width=32, eta=0.7)
    grid = compressed_grid(6, cfg.shift, 1, 0.7)  # window [0, 1], then 2 compressed steps
    levels = torch.tensor([0.7, 0.7] + [0.0] * (len(grid) - 3))
    euler = sde_trajectories(model, embedding, cfg, levels, torch.Generator().manual_seed(1), sigmas=grid)
    flash = sde_trajectories(model, embedding, cfg, levels, torch.Generator().manual_seed(1), sigmas=grid, dpm_from=2)
    assert torch.equal(flash.latents[:, :3], euler.latents[:, :3]) and torch.equal(flash.sigmas, grid)
    assert torch.equal(flash.old_log_probs[:, :2], euler.old_log_probs[:, :2])
    assert (flash.final - euler.final).abs().max() > 1e-4  # the solver changed the image
    velocity = VelocityField.for_sampling(model, embedding, cfg, "cpu")
    x1 = flash.latents[:, 1]
    scheduler = _diffusers_dpm(grid[1:])  # from the window's last step, σ_1
    scheduler.set_begin_index(1)
    scheduler.model_outputs = [None, x1 - grid[1] * velocity(x1, grid[1])]  # the primed history: x̂0 at σ_1
    scheduler.lower_order_nums = 1
    x = flash.latents[:, 2]
    for i in range(2, len(grid) - 1):
        x = scheduler.step(velocity(x, grid[i]), scheduler.timesteps[i - 1], x).prev_sample
    torch.testing.assert_close(flash.final, x, atol=1e-5, rtol=1e-4)


def test_timestep_subsets_have_the_fraction_and_differ_per_sample(tiny_models, tmp_path):
    cfg = _cfg("tiny_dancegrpo.yaml", tiny_models, tmp_path, "sampling.num_steps=16", "sampling.group_size=12")
    method = TrajectoryMethod(cfg)
    levels = method.levels(0)
    assert levels[-1] == 0 and (levels[:-1] > 0).all()  # ignore_last: the last step is deterministic

    class Rollout:
        stochastic = [i for i in range(16) if levels[i] > 0]

    subsets = method.trained_transitions(Rollout, torch.Generator().manual_seed(0))
    assert all(len(s) == 9 and len(set(s)) == 9 and set(s) <= set(range(15)) for s in subsets)  # ⌊0.6·15⌋
    assert len({tuple(sorted(s)) for s in subsets}) > 1


def test_method_fields_are_checked(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="method=ppo: expected one of g2rpo"):
        _cfg("tiny.yaml", tiny_models, tmp_path, "method=ppo")
    with pytest.raises(ValueError, match="method=g2rpo does not use window"):
        _cfg("tiny.yaml", tiny_models, tmp_path, "window.size=2")
    with pytest.raises(ValueError, match=r"method=dancegrpo does not use sampling.granularities"):
        _cfg("tiny_dancegrpo.yaml", tiny_models, tmp_path, "sampling.granularities=[1,2,3]")
    with pytest.raises(ValueError, match=r"sampling.branch_steps \[15\]"):
        _cfg("tiny.yaml", tiny_models, tmp_path, "sampling.branch_steps=[0,15]")
    from g2rpo.config import update_share

    with pytest.raises(ValueError, match=r"samples_per_update=3: .* share per group divides sampling.group_size=8"):
        update_share(_cfg("tiny_dancegrpo.yaml", tiny_models, tmp_path, "trajectory.samples_per_update=3"), 1)


# ------------------------------------------------------------------------------------ trajectories


@pytest.mark.parametrize("same", [True, False])
def test_batched_dense_completions_equal_the_naive_order_and_count(model, embedding, same):
    levels = noise_level(sigma_schedule(5, 3.0), torch.arange(5), 0.7)
    levels[-1] = 0
    results = {order: sde_trajectories(model, embedding, SMALL, levels, torch.Generator().manual_seed(5), same,
                                       dense=True, order=order) for order in ("shared", "reference")}
    shared, reference = results["shared"], results["reference"]
    assert torch.equal(shared.latents, reference.latents)
    torch.testing.assert_close(shared.completions, reference.completions, atol=1e-5, rtol=0)
    assert torch.equal(shared.completions[:, -1], shared.latents[:, -1])
    for order, result in results.items():
        cost = expected_trajectory_cost(SMALL, dense=True, same_start_noise=same, order=order)
        assert (result.num_calls, result.num_sample_forwards) == (cost["calls"], cost["sample_forwards"]), order
    # the completion of the shared start noise is the group's deterministic sample
    if same:
        torch.testing.assert_close(shared.completions[0, 0], ode_sample(model, embedding, SMALL,
                                                                        torch.Generator().manual_seed(5)), atol=1e-5, rtol=0)


def test_trajectory_log_probs_and_deterministic_steps(model, embedding):
    levels = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])  # a MixGRPO-like window over transitions 1 and 2
    r = sde_trajectories(model, embedding, SMALL, levels, torch.Generator().manual_seed(6), same_start_noise=False)
    assert r.stochastic == [1, 2] and torch.isnan(r.old_log_probs[:, [0, 3, 4]]).all()
    assert not torch.equal(r.latents[0, 0], r.latents[1, 0])  # one start noise per generation
    sigmas = r.sigmas
    for i in range(5):
        with torch.no_grad():
            v = _velocity(model, embedding, r.latents[:, i], sigmas[i])
        if i in (1, 2):
            _, _, log_prob = sde_step(v, r.latents[:, i], sigmas, i, 0.0, prev_sample=r.latents[:, i + 1], level=0.5)
            torch.testing.assert_close(r.old_log_probs[:, i], log_prob, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(r.latents[:, i + 1], r.latents[:, i] + (sigmas[i + 1] - sigmas[i]) * v,
                                       atol=1e-5, rtol=1e-5)
    cost = expected_trajectory_cost(SMALL, dense=False)
    assert (r.num_calls, r.num_sample_forwards) == (cost["calls"], cost["sample_forwards"]) == (5, 15)


def _velocity(model, embedding, x, sigma):
    from g2rpo.rollout import VelocityField

    return VelocityField.for_sampling(model, embedding, SMALL, x.device)(x, sigma)


# ------------------------------------------------------------------------------------ through the Trainer


def _cfg(name, tiny_models, tmp_path, *overrides):
    index = ROOT / "data" / "tiny_embeddings" / "index.jsonl"  # replaced by the fixture's where it is used
    return load_config(TrainConfig, ROOT / "configs" / name, [*model_overrides(tiny_models), f"data.index={index}",
                                                              f"output_dir={tmp_path / 'run'}", *overrides])


def _trainer(name, tiny_models, tiny_embeddings, tmp_path, *overrides):
    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer

    cfg = _cfg(name, tiny_models, tmp_path, f"data.index={tiny_embeddings / 'index.jsonl'}", "sample_every=0",
               "eval_every=0", "data.holdout=0", "checkpoint_start=1000", *overrides)
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


FLASH = ("window.solver=dpmsolver++", "window.post_compress=0.5")  # MixGRPO-Flash on the tiny config


@pytest.mark.parametrize("name, overrides", [(name, ()) for name in METHOD_CONFIGS[1:]] + [("tiny_mixgrpo.yaml", FLASH)])
def test_each_method_trains_through_the_trainer(name, overrides, tiny_models, tiny_embeddings, tmp_path):
    """One step of every full-trajectory tiny config (and MixGRPO-Flash): finite values, the closed-form rollout
    cost (Flash: the compressed grid's steps), as many optimiser steps as the method makes, and a trained copy
    that differs from the base."""
    trainer = _trainer(name, tiny_models, tiny_embeddings, tmp_path, *overrides)
    before = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    metrics = trainer.train_step(0)
    assert metrics["skipped_updates"] == 0 and all(math.isfinite(v) for v in metrics.values()), metrics
    cfg = trainer.cfg
    grid, dpm_from = trainer.method.grid(0)
    if overrides:  # the window 0..1 of T = 8, then ⌊7·0.5⌋ − 1 = 2 DPM-Solver++ steps
        assert len(grid) - 1 == 2 + 2 and dpm_from == 2
    cost = expected_trajectory_cost(cfg.sampling, dense=cfg.method == "densegrpo",
                                    same_start_noise=cfg.trajectory.same_start_noise,
                                    steps=None if grid is None else len(grid) - 1)
    assert metrics["sample_forwards"] == cost["sample_forwards"] and metrics["rollout_calls"] == cost["calls"]
    assert trainer.engine.scheduler.last_epoch == trainer.method.updates_per_step()
    changed = [n for n, p in trainer.engine.module.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed


def test_batched_training_forwards_equal_the_batch_1_order(tiny_models, tiny_embeddings, tmp_path):
    """trajectory.micro_batch: the reference's batch-1 forwards (one backward each) and one forward per
    prompt give the same loss and gradient of an update up to float rounding."""
    from g2rpo.loss import ppo_clip_loss

    results = []
    for size in (1, 0):
        trainer = _trainer("tiny_dancegrpo.yaml", tiny_models, tiny_embeddings, tmp_path / str(size),
                           f"trajectory.micro_batch={size}")
        groups = trainer.rollout(0)
        trainer.score(groups)
        unit = trainer.method.units(groups, trainer.advantages(groups))[0]
        assert len(unit) == (4 * 4 if size == 1 else 1)  # 4 generations x ⌊0.6·7⌋ transitions
        total = 0.0
        for chunk in unit:
            loss = ppo_clip_loss(chunk.transition(trainer.engine.module).log_probs, chunk.old_log_probs, chunk.advantages,
                                 trainer.cfg.ppo.clip_range)[0] * chunk.weight
            loss.backward()
            total += loss.item()
        grads = {n: p.grad.full_tensor().clone() for n, p in trainer.engine.module.named_parameters()}
        results.append((total, grads))
    (loss_1, grads_1), (loss_0, grads_0) = results
    assert loss_1 == pytest.approx(loss_0, rel=1e-5, abs=1e-8)
    scale = max(g.abs().max() for g in grads_0.values())
    for name in grads_1:
        torch.testing.assert_close(grads_1[name], grads_0[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name, overrides", [("tiny_flowgrpo.yaml", ()), ("tiny.yaml", ("ppo.update=accumulate",))])
def test_kl_to_the_reference_is_zero_at_the_start_then_measured_against_the_base(name, overrides, tiny_models,
                                                                               tiny_embeddings, tmp_path):
    """ppo.kl_beta (one optimiser update per step here): step 0 starts at the reference, so its KL is 0 and --
    its gradient being 0 there -- the step trains exactly as without the term; at step 1 the logged KL equals
    `reference_kl` against the base transformer loaded afresh (an independent model: the reference stayed
    the initial weights), and the term changes the update. tiny_flowgrpo.yaml takes Flow-GRPO's KL form (|dt| times
    the exact one, tests/test_conventions.py), tiny.yaml the exact one."""
    from g2rpo.loss import reference_kl

    plain = _trainer(name, tiny_models, tiny_embeddings, tmp_path / "plain", *overrides)
    kl = _trainer(name, tiny_models, tiny_embeddings, tmp_path / "kl", *overrides, "ppo.kl_beta=0.5")
    assert plain.method.updates_per_step() == 1 and "kl_ref" not in plain.train_step(0)
    assert kl.train_step(0)["kl_ref"] == 0.0

    def weights(trainer):
        return {n: p.detach().full_tensor().clone() for n, p in trainer.engine.module.named_parameters()}

    assert all(torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(kl).values()))
    base = load_transformer(tiny_models.base.path, subfolder="transformer").eval()
    groups = kl.rollout(1)
    kl.score(groups)
    advantages = kl.advantages(groups)
    expected = []
    for chunk in kl.method.units(groups, advantages)[0]:
        with torch.no_grad():
            new = chunk.transition(kl.engine.module)
            expected.append(reference_kl(new.mean, chunk.transition(base).mean, new.std, new.dt,
                                         kl.cfg.ppo.kl_form).mean())  # tiny_flowgrpo: Flow-GRPO's form
    expected = torch.stack(expected).mean().item()
    assert kl.update(groups, advantages)["kl_ref"] == pytest.approx(expected, rel=1e-4) and expected > 0
    plain.train_step(1)
    assert not all(torch.equal(a, b) for a, b in zip(weights(plain).values(), weights(kl).values()))


def test_kl_beta_is_checked():
    with pytest.raises(ValueError, match="ppo.kl_beta=-0.1: must be a number >= 0"):
        load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["ppo.kl_beta=-0.1"])
    with pytest.raises(ValueError, match="ppo.kl_beta=0.04 needs engine.kind=fsdp"):
        load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", ["ppo.kl_beta=0.04", "engine.kind=deepspeed"])


def test_a_non_finite_update_of_a_trajectory_method_leaves_no_gradient_behind(tiny_models, tiny_embeddings,
                                                                              tmp_path):
    """One backward per chunk (FSDP): a NaN in the first of a step's two updates is found after its chunks went
    back; that update is skipped and its gradients dropped, so the step ends where a run that never had the
    first update ends (bit for bit), with one skip counted."""
    runs = []
    for name, drop_first in (("nan", False), ("without", True)):
        trainer = _trainer("tiny_dancegrpo.yaml", tiny_models, tiny_embeddings, tmp_path / name)
        units = trainer.method.units

        def patched(groups, advantages, units=units, drop_first=drop_first):
            first, *rest = units(groups, advantages)
            if drop_first:
                return rest
            first[-1].advantages = torch.full_like(first[-1].advantages, float("nan"))  # its last chunk: NaN loss
            return [first, *rest]

        trainer.method.units = patched
        metrics = trainer.train_step(0)
        runs.append((metrics, {n: p.detach().full_tensor().clone() for n, p in trainer.engine.module.named_parameters()}))
    (nan_metrics, nan_weights), (metrics, weights) = runs
    assert trainer.method.updates_per_step() == 2 and trainer.method.backward_per_chunk
    assert nan_metrics["skipped_updates"] == 1 and metrics["skipped_updates"] == 0
    assert nan_metrics["loss"] == metrics["loss"] and math.isfinite(metrics["loss"])
    assert all(torch.equal(nan_weights[n], weights[n]) for n in weights)


def test_g2rpo_accumulate_is_the_mean_of_the_per_branch_losses(tiny_models, tiny_embeddings, tmp_path):
    """ppo.update=accumulate: one optimiser step whose loss is the mean of the K per-branch losses of the same
    rollout at the same weights (per_branch steps between them, so only its first loss is comparable)."""
    per_branch = _trainer("tiny.yaml", tiny_models, tiny_embeddings, tmp_path / "a")
    accumulate = _trainer("tiny.yaml", tiny_models, tiny_embeddings, tmp_path / "b", "ppo.update=accumulate")
    groups = accumulate.rollout(0)
    accumulate.score(groups)
    units = accumulate.method.units(groups, accumulate.advantages(groups))
    assert len(units) == 1 and len(units[0]) == len(accumulate.cfg.sampling.branch_steps)
    from g2rpo.loss import ppo_clip_loss

    def losses(trainer, chunks):
        return [ppo_clip_loss(c.transition(trainer.engine.module).log_probs, c.old_log_probs, c.advantages,
                              trainer.cfg.ppo.clip_range)[0] * c.weight for c in chunks]

    k = len(units[0])
    separate = per_branch.method.units(groups, accumulate.advantages(groups))
    assert len(separate) == k
    total = sum(losses(accumulate, units[0]))
    torch.testing.assert_close(total, sum(sum(losses(per_branch, u)) for u in separate) / k, atol=1e-7, rtol=1e-5)
    metrics = accumulate.update(groups, accumulate.advantages(groups))
    assert accumulate.engine.scheduler.last_epoch == 1 and math.isfinite(metrics["loss"])


def test_psi_calibration_script_applies_the_rule_and_training_reads_its_table(tiny_models, tiny_embeddings, tmp_path):
    """scripts/densegrpo/calibrate_psi.py in process (one rank, 2 rounds): every stochastic ψ(t) moves by ±ε₂ as
    its recorded sign balance says; the deterministic last step stays 0; a psi config trains on the table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_psi", ROOT / "scripts/densegrpo/calibrate_psi.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = script.calibrate(["--config", str(ROOT / "configs/tiny_densegrpo.yaml"), "--out", str(tmp_path / "psi"),
                              "--rounds", "2", "--eps1", "3", "--eps2", "0.05", *model_overrides(tiny_models),
                              f"data.index={tiny_embeddings / 'index.jsonl'}", "data.holdout=0", "eval_every=0", "sample_every=0"])
    previous = table["initial"]
    assert previous[-1] == 0 and all(v > 0 for v in previous[:-1])
    for record in table["rounds"]:
        for t, (old, new, count) in enumerate(zip(previous, record["psi"], record["balance"])):
            if t == len(previous) - 1:
                assert new == 0
            else:
                assert new == pytest.approx(max(old + (0.05 if count < 3 * record["groups"] else -0.05), 0), abs=1e-6)
        previous = record["psi"]
    assert (tmp_path / "psi" / "psi.png").stat().st_size > 0
    trainer = _trainer("tiny_densegrpo.yaml", tiny_models, tiny_embeddings, tmp_path / "train", "trajectory.noise=psi",
                       f"dense.psi_table={tmp_path / 'psi' / 'psi.json'}")
    assert trainer.method.levels(0).tolist() == pytest.approx(table["psi"])
    assert math.isfinite(trainer.train_step(0)["loss"])


def test_two_fsdp_ranks_train_a_trajectory_method_as_one_process_does(tiny_models, tiny_embeddings, tmp_path):
    """Two FSDP ranks with one prompt group each (one backward per training forward, gradients reduced across
    ranks) == one process with both groups (same seeds, same data, same random timestep subsets). One
    optimiser step per training step, so that both make the same updates. DenseGRPO: also its batched
    completions with per-sample timesteps, a different number of rows per call, on both ranks."""
    import json
    import subprocess

    from conftest import ENV, TORCHRUN

    name = "tiny_densegrpo.yaml"

    common = [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", "max_steps=2",
              "sample_every=0", "eval_every=0", "data.holdout=0", "checkpoint_start=1000", "save_dtype=float32",
              "trajectory.samples_per_update=0"]
    cmd = [*TORCHRUN, "-m", "g2rpo.train", "--config", str(ROOT / "configs" / name), *common,
           f"output_dir={tmp_path / 'two'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    trainer = _trainer(name, tiny_models, tiny_embeddings, tmp_path / "one", "max_steps=2", "data.prompts_per_rank=2",
                       "save_dtype=float32", "trajectory.samples_per_update=0")
    trainer.fit()
    two, one = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                for run in (tmp_path / "two", tmp_path / "one" / "run"))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "reward/hps", "reward/clip_score"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


# ------------------------------------------------------------------------------------ learning


def _trained_log_probs(trainer, groups) -> dict:
    """``{(group, j, i): log-prob}`` of every trained transition ``x_i -> x_{i+1}`` of generation j, recomputed here
    by `sde_step` at the recorded latents under the trainer's weights (not through the method's training chunks)."""
    from g2rpo.rollout import VelocityField

    log_probs = {}
    for gi, group in enumerate(groups):
        r = group.rollout
        velocity = VelocityField.for_sampling(trainer.engine.module, group.embedding, trainer.cfg.sampling,
                                              torch.device("cpu"))
        for j, trained in enumerate(group.trained):
            for i in trained:
                with torch.no_grad():
                    v = velocity(r.latents[j:j + 1, i], r.sigmas[i:i + 1])
                    _, _, log_prob = sde_step(v, r.latents[j:j + 1, i], r.sigmas, i, 0.0,
                                              prev_sample=r.latents[j:j + 1, i + 1], level=r.levels[i].item())
                log_probs[gi, j, i] = log_prob.item()
    return log_probs


def _weighted_change(advantages, change, shift=0) -> float:
    """sum over trained (group, j, i) of A * change, A of generation j + shift of the group (cyclically)."""
    total = 0.0
    for (gi, j, i), d in change.items():
        a = advantages[gi]
        jj = (j + shift) % a.shape[0]
        total += float(a[jj] if a.dim() == 1 else a[jj, i]) * d
    return total


@pytest.mark.parametrize("name,extra", [("tiny_dancegrpo.yaml", ()), ("tiny_flowgrpo.yaml", ()),
                                        ("tiny_densegrpo.yaml", ()), ("tiny_flowgrpo.yaml", ("ppo.guard=true",))],
                         ids=["dancegrpo", "flowgrpo", "densegrpo", "flowgrpo-guard"])
def test_one_update_raises_the_advantage_weighted_likelihood_and_its_twin_lowers_it(name, extra, tiny_models,
                                                                                  tiny_embeddings, tmp_path):
    """Each full-trajectory method's update climbs its own objective. After one optimiser step on one step's
    rollouts (trajectory.samples_per_update=0: first order), the change of the log-likelihood of the trained
    transitions, recomputed independently (`sde_step` at the recorded latents), follows the advantages:
    S = sum_(j, i trained) A_ji * (log pi_new - log pi_old)(x_i+1 | x_i) > 0, and S is larger with each
    generation's own advantages than with those of any other generation of its group (a cyclic shift), so an
    advantage that reached the wrong generation fails. The minimising twin (every reward weight -1; the same
    seed: the same rollouts, A negated) gives S < 0. The update starts on-policy (clip_frac 0: the old
    log-probs are the sampling policy's). GRPO-Guard's loss (``ppo.guard``: the normalised ratio, 1/|dt| weights)
    climbs the same objective. The held-out learning signal of these three takes 48 two-rank steps
    (docs/benchmarks.md "Learning signal"); CI runs that of MixGRPO and G2RPO."""
    def moved(weight):
        trainer = _trainer(name, tiny_models, tiny_embeddings, tmp_path / str(weight), "seed=0",
                           "trajectory.samples_per_update=0", f"rewards=[{{name: hps, weight: {weight}}}, "
                           f"{{name: clip_score, weight: {weight}}}]", *extra)
        groups = trainer.rollout(0)
        trainer.score(groups)
        advantages = trainer.advantages(groups)
        before = _trained_log_probs(trainer, groups)
        for (gi, j, i), old in before.items():
            assert old == pytest.approx(groups[gi].rollout.old_log_probs[j, i].item(), abs=1e-5)
        metrics = trainer.update(groups, advantages)
        assert (metrics["skipped_updates"], metrics["clip_frac"], trainer.engine.scheduler.last_epoch) == (0, 0, 1)
        after = _trained_log_probs(trainer, groups)
        return advantages, {key: after[key] - old for key, old in before.items()}

    advantages, up = moved(1.0)
    twin, down = moved(-1.0)
    for a, t in zip(advantages, twin):
        torch.testing.assert_close(t, -a, atol=1e-5, rtol=0)  # the same rollouts, the advantages negated
    gain, twin_gain = _weighted_change(advantages, up), _weighted_change(advantages, down)
    assert gain > 0 > twin_gain, (gain, twin_gain)
    shifted = [_weighted_change(advantages, up, shift) for shift in range(1, advantages[0].shape[0])]
    assert gain > max(shifted), (gain, shifted)


@pytest.mark.slow
def test_mixgrpo_raises_heldout_reward_over_its_minimising_twin(tiny_models, tiny_embeddings, tmp_path):
    """Learning signal of a full-trajectory method (trajectories, window, terminal advantages), measured:
    configs/tiny_mixgrpo.yaml, 16 steps, held-out summed HPS + CLIP change. Measured in one process: seeds 0, 1, 2
    gained +0.0084, +0.0204, +0.0037 maximising and -0.0017, -0.0070, +0.0012 minimising (every weight -1);
    the bars (gain > 0.003, gap > 0.002) pass on every seed and fail if the update ignores the reward (the
    twins are then one run: gap 0) or inverts it. CI runs seed 0. Every method under two FSDP ranks, 3 seeds,
    48 steps: docs/benchmarks.md "Learning signal" (scripts/benchmark/learning_signal.py)."""
    def heldout_gain(weight):
        trainer = _trainer("tiny_mixgrpo.yaml", tiny_models, tiny_embeddings, tmp_path / str(weight), "seed=0",
                           "data.holdout=20", f"rewards=[{{name: hps, weight: {weight}}}, "
                           f"{{name: clip_score, weight: {weight}}}]")
        before = sum(trainer.evaluate(trainer.heldout).values())
        for step in range(16):
            trainer.train_step(step)
        return sum(trainer.evaluate(trainer.heldout).values()) - before

    up, down = heldout_gain(1.0), heldout_gain(-1.0)
    assert up > 0.003 and up - down > 0.002, (up, down)

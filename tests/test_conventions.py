"""Each method's own conventions (docs/algorithm.md, "Method conventions"), against independent computations
written here (numpy float64, closed forms): trained-transition selection, advantage statistics, tied groups,
the KL forms, the timestep feed, reward-weight normalisation, and the same training on any world size."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ENV, ROOT, TORCHRUN, model_overrides
from g2rpo.advantages import Normalization, dense_advantages, mgai_advantages, terminal_advantages
from g2rpo.config import TrainConfig, load_config, update_share
from g2rpo.loss import reference_kl
from g2rpo.methods import TrajectoryMethod

FLOW = Normalization(ddof=0, eps=1e-4, dtype=torch.float64, weighted_sum=True, pooled_std=True)  # Flow-GRPO's
FLOW_GROUP = Normalization(ddof=0, eps=1e-4, dtype=torch.float64, weighted_sum=True)  # its global_std: false
REFERENCE = Normalization()  # G²RPO's official trainer, DanceGRPO, MixGRPO


def _cfg(name, *overrides):
    return load_config(TrainConfig, ROOT / "configs" / name, list(overrides))


# ------------------------------------------------------------------------------------ trained transitions


class _Rollout:
    def __init__(self, stochastic):
        self.stochastic = stochastic


@pytest.mark.parametrize("config, steps, expected", [("flowgrpo_hps.yaml", 16, list(range(15))),
                                                     ("flowgrpo_pickscore_flux.yaml", 6, list(range(5))),
                                                     ("tiny_flowgrpo.yaml", 8, list(range(7)))])
def test_flowgrpo_trains_the_first_transitions_of_every_sample(config, steps, expected):
    """int(0.99·T) transitions from the first, in order, the same for every sample (Flow-GRPO's training loop)."""
    method = TrajectoryMethod(_cfg(config), world_size=1 if "tiny" in config else 16 if "pickscore" not in config
                              else 8)
    assert method.cfg.sampling.num_steps == steps and len(expected) == int(0.99 * steps)
    trained = method.trained_transitions(_Rollout(list(range(steps))), torch.Generator().manual_seed(0))
    assert trained == [expected] * method.cfg.sampling.group_size


def test_dancegrpo_trains_a_random_subset_per_sample_drawn_as_a_permutation():
    """⌊0.6·15⌋ = 9 per sample: the first 9 of a fresh permutation of the 15 candidates, sample after sample."""
    method = TrajectoryMethod(_cfg("dancegrpo_hps.yaml"), world_size=16)
    candidates = list(range(15))  # ignore_last: the 16th transition is deterministic
    trained = method.trained_transitions(_Rollout(candidates), torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    assert trained == [torch.randperm(15, generator=g)[:9].tolist() for _ in range(12)]
    assert len({tuple(sorted(t)) for t in trained}) > 1


# ------------------------------------------------------------------------------------ advantages


def _flow_grpo_numpy(prompts, rewards, global_std=True):
    """Flow-GRPO's per-prompt statistics, written out in numpy float64: each prompt's mean, the population std of
    all rewards (global) or of the prompt's + 1e-4."""
    prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for p in np.unique(prompts):
        mine = rewards[prompts == p]
        std = (rewards.std() if global_std else mine.std()) + 1e-4
        out[prompts == p] = (mine - mine.mean()) / std
    return out


def _reference_numpy(rewards, n):
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, n)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-8)).reshape(-1)


@pytest.mark.parametrize("groups", [1, 2])
def test_advantages_equal_each_methods_formula_in_float64(groups):
    g = torch.Generator().manual_seed(groups)
    n = 12
    rewards = torch.rand(2, groups * n, generator=g, dtype=torch.float64).float()  # two reward models
    weights = torch.tensor([1.0, 0.5])
    prompts = [i // n for i in range(groups * n)]
    combined = (rewards.double() * weights.double()[:, None]).sum(0).numpy()
    # Flow-GRPO, global std (its recipes) and per-prompt std: the weighted sum of the rewards, normalised once
    for norm, global_std in ((FLOW, True), (FLOW_GROUP, False)):
        ours = terminal_advantages(rewards, n, None, weights, norm, pooled=rewards)
        np.testing.assert_allclose(ours.numpy(), _flow_grpo_numpy(prompts, combined, global_std), rtol=1e-6, atol=1e-6)
    # the reference: each reward normalised in its group (unbiased std + 1e-8), the weighted sum of them
    ours = terminal_advantages(rewards, n, None, weights, REFERENCE)
    expected = sum(w * _reference_numpy(r, n) for w, r in zip(weights.tolist(), rewards.numpy()))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-5)
    if groups == 2:  # a global std differs from the per-group one: the test can tell them apart
        assert not np.allclose(_flow_grpo_numpy(prompts, combined, True), _flow_grpo_numpy(prompts, combined, False))


def test_pooled_std_of_two_ranks_is_the_std_of_everything():
    """A rank holding one group normalises with the std of every rank's groups (what the trainer's gather gives)."""
    g = torch.Generator().manual_seed(3)
    everything = torch.rand(1, 24, generator=g)
    whole = terminal_advantages(everything, 12, None, None, FLOW, pooled=everything)
    halves = [terminal_advantages(part, 12, None, None, FLOW, pooled=everything) for part in everything.split(12, 1)]
    assert torch.equal(torch.cat(halves), whole)


@pytest.mark.parametrize("value", [0.3, 0.1, 0.7])
@pytest.mark.parametrize("norm", [REFERENCE, FLOW, FLOW_GROUP, Normalization(ddof=0), Normalization(eps=1e-4)])
def test_tied_groups_give_exactly_zero(value, norm):
    """Twelve equal rewards: exactly 0 for every method's statistics -- terminal, MGAI and dense -- also when the
    group sits beside an untied one (a global std > 0)."""
    tied = torch.full((1, 12), value)
    other = torch.rand(1, 12, generator=torch.Generator().manual_seed(0))
    both = torch.cat([tied, other], dim=1)
    assert torch.equal(terminal_advantages(tied, 12, 5.0, None, norm, pooled=tied), torch.zeros(12))
    assert torch.equal(terminal_advantages(both, 12, 5.0, None, norm, pooled=both)[:12], torch.zeros(12))
    grid = tied[:, None, :, None].expand(1, 2, 12, 3)
    assert torch.equal(mgai_advantages(grid, 12, 5.0, None, norm, pooled=grid), torch.zeros(12, 3))
    steps = torch.stack([tied[0] * (i + 1) for i in range(5)], dim=-1)[None]  # every gain equal across the group
    assert torch.equal(dense_advantages(steps, 12, 5.0, None, norm, pooled=steps), torch.zeros(12, 4))


def test_the_tied_case_is_real_in_float32():
    """Why the rule is needed: the plain formula gives non-zero advantages to a float32 group of twelve equal values
    (its mean is one ulp off) for some of them."""
    naive = []
    for value in (0.3, 0.1, 0.7, 0.37, 0.9):
        r = torch.full((12,), value)
        std = r.std()
        naive.append(bool(std > 0 and ((r - r.mean()) / (std + 1e-8)).abs().max() > 0.1))
    assert any(naive)


def test_mixgrpo_normalises_the_reward_weights(tiny_models, tiny_embeddings, tmp_path):
    """MixGRPO's weights sum to 1 (tiny_mixgrpo.yaml: 1 and 1 -> 0.5 each), and its advantages are half of the
    un-normalised ones; a minimising twin (weights -1) keeps its sign."""
    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer

    common = [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", "sample_every=0",
              "eval_every=0", "data.holdout=0"]
    trainer = Trainer(_cfg("tiny_mixgrpo.yaml", *common, f"output_dir={tmp_path / 'a'}"),
                      DistInfo(0, 1, 0, torch.device("cpu")))
    assert trainer.reward_weights.tolist() == [0.5, 0.5]
    groups = trainer.rollout(0)
    trainer.score(groups)
    rewards = groups[0].rewards
    assert torch.equal(trainer.advantages(groups)[0], terminal_advantages(rewards, 8, 5.0, torch.tensor([0.5, 0.5])))
    assert torch.allclose(trainer.advantages(groups)[0], terminal_advantages(rewards, 8, None) / 2, atol=1e-6)
    trainer.close()
    twin = Trainer(_cfg("tiny_mixgrpo.yaml", *common, f"output_dir={tmp_path / 'b'}", "rewards=[{name: hps, weight: -1}, "
                        "{name: clip_score, weight: -1}]"), DistInfo(0, 1, 0, torch.device("cpu")))
    assert twin.reward_weights.tolist() == [-0.5, -0.5]
    twin.close()


# ------------------------------------------------------------------------------------ KL, timestep


def test_kl_forms_on_given_means_std_and_step():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    level, dt = 0.7, torch.tensor([-0.1, -0.05, -0.2], dtype=torch.float64)
    std = level * dt.abs().sqrt()[:, None, None]
    m, r = mean.numpy(), ref.numpy()
    exact = ((m - r) ** 2 / (2 * std.numpy() ** 2)).reshape(3, -1).mean(1)  # the Gaussian KL per element, averaged
    flow = ((m - r) ** 2).reshape(3, -1).mean(1) / (2 * level**2)  # Flow-GRPO: mean(Δμ²) / (2 s²)
    np.testing.assert_allclose(reference_kl(mean.float(), ref.float(), std.float()).numpy(), exact, rtol=1e-5)
    np.testing.assert_allclose(reference_kl(mean.float(), ref.float(), std.float(), dt, "flow_grpo").numpy(), flow,
                               rtol=1e-5)
    np.testing.assert_allclose(flow / exact, dt.abs().numpy(), rtol=1e-6)  # |dt| times the exact one


def test_timestep_feed_quantised_or_exact():
    from g2rpo.models.flux import PromptEmbedding
    from g2rpo.rollout import VelocityField

    seen = []

    def policy(hidden_states, timestep, **kwargs):
        seen.append(timestep.tolist())
        return (torch.zeros_like(hidden_states),)

    embedding = PromptEmbedding(torch.zeros(4, 8), torch.zeros(8), torch.zeros(4, 3))
    for quantize in (True, False):
        VelocityField(policy, embedding, (16, 16), 3.5, quantize=quantize)(torch.zeros(2, 4, 64),
                                                                                          torch.tensor(0.12345))
    assert seen[0] == pytest.approx([0.123] * 2, abs=1e-7) and seen[1] == pytest.approx([0.12345] * 2, abs=1e-7)
    assert _cfg("flowgrpo_hps.yaml").sampling.timestep == "exact" and _cfg("g2rpo_hps_clip.yaml").sampling.timestep \
        == "quantized" and _cfg("dancegrpo_hps.yaml").sampling.timestep == "quantized"


# ------------------------------------------------------------------------------------ the update batch


def test_update_batch_is_global_and_refused_where_it_does_not_divide():
    dance = _cfg("dancegrpo_hps.yaml")
    assert update_share(dance, 16) == 4  # DanceGRPO: 4 generations of every group per optimiser step
    eight = _cfg("dancegrpo_hps_8gpu.yaml")
    assert update_share(eight, 8) == 4 and TrajectoryMethod(eight, 8).updates_per_step() == 3  # the same algorithm
    assert TrajectoryMethod(_cfg("mixgrpo_hps_8gpu.yaml"), 8).updates_per_step() == 4
    assert update_share(_cfg("flowgrpo_pickscore_flux.yaml"), 8) == 12
    with pytest.raises(ValueError, match=r"trajectory.samples_per_update=64: .* 8 prompt groups \(8 rank\(s\) x "
                                         r"data.prompts_per_rank=1\)"):
        update_share(dance, 8)  # 8 per group does not divide 12


WORLD_STEP = ("max_steps=2", "sample_every=0", "eval_every=0", "data.holdout=0", "checkpoint_start=1000",
              "save_dtype=float32", "sampling.num_steps=4", "sampling.group_size=4", "sampling.height=32",
              "sampling.width=32")
WORLD_CONFIGS = {"tiny.yaml": ("sampling.branch_steps=[0,1]",), "tiny_dancegrpo.yaml": (), "tiny_flowgrpo.yaml": (),
                 "tiny_mixgrpo.yaml": (), "tiny_densegrpo.yaml": ()}


@pytest.mark.slow
def test_every_method_trains_the_same_on_two_ranks_as_one_process_with_both_groups(tiny_models, tiny_embeddings,
                                                                                   tmp_path):
    """2 steps of every tiny method: two FSDP ranks with one prompt group each == one process holding both groups
    (data.prompts_per_rank=2): the same losses and rewards, and the same weights after training -- which moved far
    more than they differ. DanceGRPO and MixGRPO make several optimiser updates per step (their global
    trajectory.samples_per_update: 2 of every group's 4 per update); Flow-GRPO's std is over both groups."""
    from safetensors.torch import load_file

    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer

    common = [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", *WORLD_STEP]
    runs = {name: [*common, *extra] for name, extra in WORLD_CONFIGS.items()}
    two = tmp_path / "two"
    result = subprocess.run([*TORCHRUN, str(ROOT / "tests/helpers/world_equivalence.py"), str(two), json.dumps(runs)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    def weights(folder):  # every shard of a diffusers transformer folder
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    start = weights(Path(tiny_models.base.path) / "transformer")
    for name, overrides in runs.items():
        cfg = load_config(TrainConfig, ROOT / "configs" / name, [*overrides, "data.prompts_per_rank=2",
                                                                 f"output_dir={tmp_path / 'one' / name}"])
        Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
        paths = [tmp_path / "one" / name, two / name]
        one_m, two_m = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in paths)
        assert len(one_m) == len(two_m) == 2
        for a, b in zip(one_m, two_m):
            for key in ("loss", "reward/hps", "reward/clip_score"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (name, key)
        one_w, two_w = (weights(next(run.glob("checkpoint-*/transformer"))) for run in paths)
        assert one_w.keys() == two_w.keys() == start.keys()
        diff = max((one_w[k] - two_w[k]).abs().max().item() for k in one_w)
        moved = max((one_w[k] - start[k].float()).abs().max().item() for k in one_w)
        assert diff < 1e-5 and moved > 100 * diff, (name, diff, moved)

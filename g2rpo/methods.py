"""The method family as configuration: how a group is sampled (a), which transitions are trained (b), how
rewards become per-transition advantages (c); each method's own conventions (advantage statistics, trained
transitions, KL form, timestep feed, reward weights) are config fields (docs/algorithm.md, "Method conventions").

| ``method`` | (a) a group of N | (b) trained transitions | (c) advantage |
|---|---|---|---|
| ``g2rpo`` | singular: one ODE anchor, one SDE step per branch step k, granular ODE completions | the K branch steps, one forward at ``(a_k, σ_k)`` shared by the group | MGAI (`mgai_advantages`) |
| ``dancegrpo`` | N full SDE trajectories, constant noise η (``trajectory.noise: dance``), last step deterministic | ``⌊fraction·(T−1)⌋`` random transitions per sample | terminal (`terminal_advantages`) |
| ``flowgrpo`` | N full SDE trajectories, ``s = η·sqrt(σ/(1−σ))`` | the first ``⌊fraction·T⌋`` transitions, every sample (``trajectory.select: first``) | terminal |
| ``mixgrpo`` | ODE except a window of SDE transitions that moves during training (`window_transitions`) | the window | terminal |
| ``densegrpo`` | N full SDE trajectories (noise ``flow_grpo`` or a calibrated ψ table) + the ODE completion of every ``x_i`` | ``⌊fraction·T⌋`` per sample | dense gains (`dense_advantages`) |

A method object turns a group's rollout into the images to score, the scores into advantages, and
those into *update units*: one optimiser step each, made of *chunks*, one training forward each, whose
weighted clipped losses sum to the unit's loss. One `Trainer` runs them all (g2rpo.trainer).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from g2rpo.advantages import Normalization, dense_advantages, mgai_advantages, terminal_advantages
from g2rpo.config import update_share
from g2rpo.flow import gaussian_log_prob, noise_level, sde_step_stats, sigma_schedule
from g2rpo.rollout import Transition, VelocityField, policy_transition, singular_sde_rollout
from g2rpo.trajectory import compressed_grid, sde_trajectories


@dataclass
class Chunk:
    """One training forward: ``transition(policy)`` gives its m transitions under ``policy`` (their new
    log-probs ``[m]``, means and std: `g2rpo.rollout.Transition`), whose clipped loss (a mean over the m) -- plus
    β times their KL to the reference where ``ppo.kl_beta > 0`` -- enters the unit's loss with ``weight``."""

    transition: Callable[[torch.nn.Module], Transition]
    old_log_probs: torch.Tensor  # [m]
    advantages: torch.Tensor  # [m]
    weight: float
    old_means: torch.Tensor | None = None  # [m or 1, *latent]: the sampling policy's means (ppo.guard)


def window_transitions(step: int, num_steps: int, size: int, start: int, shift_every: int, stride: int) -> list[int]:
    """MixGRPO's SDE window at training step ``step``: ``range(w, min(w + size, T − 2))``.

    The window start ``w`` begins at ``start`` and moves ``stride`` transitions towards lower noise every
    ``shift_every`` steps; when it would leave no transition (``w ≥ T − 2``) it rolls back to 0 (the
    official code rolls back one shift later, after a step with an empty window).
    """
    limit = num_steps - 2
    w = start
    for _ in range(step // shift_every):
        w += stride
        if w >= limit:
            w = 0
    return list(range(w, min(w + size, limit)))


def load_psi_table(path: str | Path, num_steps: int) -> torch.Tensor:
    """ψ(t) per transition from the JSON `scripts/densegrpo/calibrate_psi.py` writes (``{"psi": [...]}``)."""
    path = Path(path)
    try:
        psi = json.loads(path.read_text())["psi"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a ψ table ({type(exc).__name__}: {exc}); write one with "
                         f"scripts/densegrpo/calibrate_psi.py") from None
    if len(psi) != num_steps or any(not isinstance(v, (int, float)) or v < 0 for v in psi):
        raise ValueError(f"{path}: psi must list num_steps={num_steps} noise levels >= 0, got {psi!r}")
    return torch.tensor(psi, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# G2RPO: singular sampling
# --------------------------------------------------------------------------------------------


class SingularMethod:
    """G²RPO (docs/algorithm.md §3-5). ``ppo.update``: ``per_branch`` -- one optimiser step per branch step
    k (the default); ``accumulate`` -- the K losses ``/ K`` accumulated into one optimiser step per training
    step."""

    name = "g2rpo"
    backward_per_chunk = False  # an update's few chunks (one per prompt group) go back in one backward

    def __init__(self, cfg):
        self.cfg = cfg
        self.norm = Normalization.from_config(cfg.advantage)

    @property
    def sampling(self):
        return self.cfg.sampling  # read at use: a benchmark may swap the sampling config between rollouts

    def updates_per_step(self) -> int:
        return len(self.sampling.branch_steps) if self.cfg.ppo.update == "per_branch" else 1

    def rollout(self, policy, embedding, generator, step, device):
        return singular_sde_rollout(policy, embedding, self.sampling, generator, device=device)

    def trained_transitions(self, rollout, generator: torch.Generator) -> None:
        """Every generation trains every branch step: nothing to draw."""
        return None

    def score_latents(self, rollout) -> torch.Tensor:
        """Every completion ``[N·K·G]`` (generation-major), then the anchor's final latent."""
        c = rollout.completions
        return torch.cat([c.reshape(-1, *c.shape[3:]), rollout.anchor_final[None]])

    def assign_scores(self, group, scores: torch.Tensor, images: torch.Tensor) -> None:
        n, k, g = group.rollout.completions.shape[:3]
        group.rewards = scores[:, :-1].reshape(-1, n, k, g).permute(0, 3, 1, 2)  # [R, G, N, K]
        group.anchor_rewards = scores[:, -1]
        group.sample_image = images[-1].cpu()

    def logged_rewards(self, group) -> torch.Tensor:
        """``[R, ...]``: what ``reward/<name>`` averages (every completion's reward)."""
        return group.rewards

    def advantages(self, groups, weights, gather=None) -> list[torch.Tensor]:
        """``[N, K]`` per group: MGAI over every group of this rank (each group normalised on its own; with
        ``advantage.std_over: global`` the std over ``gather``'s every group of the step, on every rank)."""
        n = self.sampling.group_size
        rewards = torch.cat([group.rewards for group in groups], dim=2)
        pooled = gather(rewards, 2) if self.norm.pooled_std else None
        flat = mgai_advantages(rewards, n, self.cfg.ppo.adv_clip_max, weights, self.norm, pooled)
        return list(flat.split(n))

    def units(self, groups, advantages, compute_dtype=None) -> list[list[Chunk]]:
        def chunk(group, adv, ki, weight):
            def transition(policy):
                return policy_transition(policy, group.embedding, group.rollout, ki, self.sampling, compute_dtype)
            return Chunk(transition, group.rollout.old_log_probs[:, ki], adv[:, ki], weight,
                         group.rollout.old_means[ki][None] if self.cfg.ppo.guard else None)

        k = len(self.sampling.branch_steps)
        per_branch = [[chunk(g, a, ki, 1 / len(groups)) for g, a in zip(groups, advantages)] for ki in range(k)]
        if self.cfg.ppo.update == "per_branch":
            return per_branch
        return [[dataclasses.replace(c, weight=c.weight / k) for unit in per_branch for c in unit]]


# --------------------------------------------------------------------------------------------
# Full trajectories: DanceGRPO / Flow-GRPO, MixGRPO, DenseGRPO
# --------------------------------------------------------------------------------------------


class TrajectoryMethod:
    """N full trajectories per prompt (`g2rpo.trajectory.sde_trajectories`); see the module table."""

    backward_per_chunk = True  # up to hundreds of training forwards per update: one backward each

    def __init__(self, cfg, world_size: int = 1):
        self.cfg, self.tcfg = cfg, cfg.trajectory
        self.name = cfg.method
        self.share = update_share(cfg, world_size)  # generations of each group per optimiser update
        self.norm = Normalization.from_config(cfg.advantage)
        self.dense = cfg.method == "densegrpo"
        t = self.sampling.num_steps
        sigmas = sigma_schedule(t, self.sampling.shift)
        if self.tcfg.noise == "psi":
            self.base_levels = load_psi_table(cfg.dense.psi_table, t)
        else:
            self.base_levels = noise_level(sigmas, torch.arange(t), self.sampling.eta, self.tcfg.noise)
        if self.tcfg.ignore_last:
            self.base_levels[-1] = 0.0

    @property
    def sampling(self):
        return self.cfg.sampling

    def levels(self, step: int) -> torch.Tensor:
        """``[T]`` noise levels at training step ``step`` (0: a deterministic transition)."""
        if self.name != "mixgrpo":
            return self.base_levels
        levels = torch.zeros_like(self.base_levels)
        window = self.window(step)
        levels[window] = self.base_levels[window]
        return levels

    def window(self, step: int) -> list[int]:
        w = self.cfg.window
        return window_transitions(step, self.sampling.num_steps, w.size, w.start, w.shift_every, w.stride)

    def grid(self, step: int) -> tuple[torch.Tensor | None, int | None]:
        """``(σ grid or None for the T-step one, first grid index of DPM-Solver++ steps or None)`` at ``step``:
        MixGRPO-Flash's compressed tail and solver after the window; None, None for every other method."""
        if self.name != "mixgrpo":
            return None, None
        w, window = self.cfg.window, self.window(step)
        sigmas = None
        if w.post_compress < 1 and window:
            sigmas = compressed_grid(self.sampling.num_steps, self.sampling.shift, window[-1], w.post_compress)
        return sigmas, (window[-1] + 1 if w.solver == "dpmsolver++" and window else None)

    def updates_per_step(self) -> int:
        return self.sampling.group_size // self.share

    def rollout(self, policy, embedding, generator, step, device):
        sigmas, dpm_from = self.grid(step)
        levels = self.levels(step)
        if sigmas is not None:
            levels = levels[:len(sigmas) - 1]  # the compressed tail is deterministic
        return sde_trajectories(policy, embedding, self.sampling, levels, generator, self.tcfg.same_start_noise,
                                dense=self.dense, order=self.sampling.order, device=device, sigmas=sigmas,
                                dpm_from=dpm_from, keep_means=self.cfg.ppo.guard)

    def score_latents(self, rollout) -> torch.Tensor:
        """The N final latents; DenseGRPO also the completions of ``x_0 .. x_{T-1}`` (``x_0``'s once when the
        group shares its start noise), generation-major."""
        if not self.dense:
            return rollout.final
        c = rollout.completions
        rest = c[:, 1:-1].reshape(-1, *c.shape[2:])
        first = c[:1, 0] if self.tcfg.same_start_noise else c[:, 0]
        return torch.cat([rollout.final, first, rest])

    def assign_scores(self, group, scores: torch.Tensor, images: torch.Tensor) -> None:
        n, t = self.sampling.group_size, self.sampling.num_steps
        final = scores[:, :n]
        group.sample_image = images[0].cpu()
        group.anchor_rewards = None
        if not self.dense:
            group.rewards = final  # [R, N]
            return
        shared = self.tcfg.same_start_noise
        first = scores[:, n:n + 1].expand(-1, n) if shared else scores[:, n:2 * n]
        rest = scores[:, n + (1 if shared else n):].reshape(-1, n, t - 1)
        group.rewards = torch.cat([first[..., None], rest, final[..., None]], dim=2)  # [R, N, T+1]
        if shared:
            group.anchor_rewards = first[:, 0]  # the ODE sample from the shared start noise

    def logged_rewards(self, group) -> torch.Tensor:
        """``[R, N]``: what ``reward/<name>`` averages (the final images' rewards)."""
        return group.rewards[..., -1] if self.dense else group.rewards

    def advantages(self, groups, weights, gather=None) -> list[torch.Tensor]:
        """Per group: ``[N]`` (terminal) or ``[N, T]`` (dense); with ``advantage.std_over: global`` the std over
        ``gather``'s every generation of the step, on every rank."""
        n, clip = self.sampling.group_size, self.cfg.ppo.adv_clip_max
        pooled = gather(torch.cat([g.rewards for g in groups], dim=1), 1) if self.norm.pooled_std else None
        advantages = dense_advantages if self.dense else terminal_advantages
        return [advantages(g.rewards, n, clip, weights, self.norm, pooled) for g in groups]

    def trained_transitions(self, rollout, generator: torch.Generator) -> list[list[int]]:
        """Per generation, the grid indices of the transitions it trains: all stochastic ones, or ``⌊fraction·n⌋``
        of them -- a random subset per sample (``trajectory.select: random``, a permutation per sample, DanceGRPO's
        order) or the first ones in grid order for every sample (``first``, Flow-GRPO)."""
        candidates = rollout.stochastic
        fraction = self.tcfg.timestep_fraction
        if fraction >= 1:
            return [list(candidates) for _ in range(self.sampling.group_size)]
        count = max(1, math.floor(fraction * len(candidates)))
        if self.tcfg.select == "first":
            return [list(candidates[:count]) for _ in range(self.sampling.group_size)]
        return [[candidates[j] for j in torch.randperm(len(candidates), generator=generator)[:count].tolist()]
                for _ in range(self.sampling.group_size)]

    def units(self, groups, advantages, compute_dtype=None) -> list[list[Chunk]]:
        """One unit per optimiser update: generations ``u·share .. (u+1)·share − 1`` of every group of this rank,
        so that one process holding P groups makes the same updates as P ranks holding one each."""
        n, share, size = self.sampling.group_size, self.share, self.tcfg.micro_batch
        units = []
        for begin in range(0, n, share):
            samples = [(gi, j) for gi in range(len(groups)) for j in range(begin, begin + share)]
            total = sum(len(groups[gi].trained[j]) for gi, j in samples)
            unit = []
            for gi in dict.fromkeys(gi for gi, _ in samples):  # chunks stay within one prompt
                group, adv = groups[gi], advantages[gi]
                rows = [(j, i, adv) for g, j in samples if g == gi for i in group.trained[j]]
                for start in range(0, len(rows), size or len(rows)):
                    part = rows[start:start + (size or len(rows))]
                    unit.append(self._chunk(group, part, len(part) / total, compute_dtype))
            units.append(unit)
        return units

    def _chunk(self, group, rows, weight, compute_dtype) -> Chunk:
        r = group.rollout
        gen = torch.tensor([j for j, _, _ in rows])
        index = torch.tensor([i for _, i, _ in rows])
        advantages = torch.stack([a[j] if a.dim() == 1 else a[j, i] for j, i, a in rows])
        sampling = self.sampling

        def transition(policy):
            x = r.latents[gen, index]
            velocity = VelocityField.for_sampling(policy, group.embedding, sampling, x.device,
                                                  compute_dtype=compute_dtype)
            at = index.to(x.device)
            v = velocity(x, r.sigmas[at])
            mean, std, _ = sde_step_stats(x, v, r.sigmas, at, 0.0, level=r.levels.to(x.device)[index])
            dt = r.sigmas[at + 1] - r.sigmas[at]
            return Transition(gaussian_log_prob(r.latents[gen, index + 1], mean, std), mean, std, dt)

        return Chunk(transition, r.old_log_probs[gen, index], advantages, weight,
                     r.old_means[gen, index] if r.old_means is not None else None)


def build_method(cfg, world_size: int = 1):
    """The method of ``cfg`` for a run on ``world_size`` ranks (the full-trajectory methods split their global
    ``trajectory.samples_per_update`` over the step's prompt groups)."""
    return SingularMethod(cfg) if cfg.method == "g2rpo" else TrajectoryMethod(cfg, world_size)

"""The training step and loop: rollout -> decode -> reward -> advantages -> clipped PPO updates.

One `Trainer` serves every method (``method``: g2rpo, dancegrpo, flowgrpo, mixgrpo, densegrpo; see
g2rpo.methods) and every reward combination (HPS, HPS + CLIP, ...): both are config. Each step, every rank
rolls out ``data.prompts_per_rank`` prompt groups as the method samples them, decodes and scores the
method's images with every reward, turns the rewards into per-transition advantages, then makes the
method's optimiser updates (G²RPO: one per branching step k, §5). Checkpoints are exported in diffusers
format under ``output_dir/checkpoint-<step>/transformer``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from g2rpo.config import TrainConfig, checkpoint_due, to_dict
from g2rpo.data import EmbeddingDataset, GroupSchedule
from g2rpo import checkpoint, hacking
from g2rpo.checkpoint import BEST
from g2rpo.cli import Refusal
from g2rpo.distributed import (DistInfo, agreed, all_gather_object, all_reduce, any_rank, broadcast_object, io_group,
                               print0)
from g2rpo.engine import build_engine
from g2rpo.io import atomic_write_text
from g2rpo.loss import guard_clip_loss, ppo_clip_loss, reference_kl
from g2rpo.memory import PhaseMeter
from g2rpo.methods import build_method
from g2rpo.metrics import MetricsLogger
from g2rpo.models import family_of, load_vae, release_memory, transformer_config
from g2rpo.models.base import Conditioning
from g2rpo.http_reward import HttpReward, RewardServerError
from g2rpo.rollout import ode_sample
from g2rpo.rundir import RunLock, append_history, clear_run, describe_run, run_files


@dataclass
class Group:
    """One prompt group of this rank's step: its conditioning, rollout and rewards (shapes: g2rpo.methods)."""

    caption: str
    embedding: Conditioning
    rollout: object  # RolloutResult (g2rpo) | TrajectoryResult
    rewards: torch.Tensor | None = None  # g2rpo [R, G, N, K]; terminal [R, N]; dense [R, N, T+1]
    anchor_rewards: torch.Tensor | None = None  # [R]: the group's deterministic sample, where the method has one
    sample_image: torch.Tensor | None = None  # [3, H, W]: the image of the step's sample grid
    trained: list[list[int]] | None = None  # full trajectories: per generation, the transitions it trains


@dataclass
class TrainState:
    """Everything that advances during training (the rest is rebuilt from the config)."""

    step: int = 0  # the next step to run; also the data-schedule position
    skipped: int = 0  # optimiser updates skipped for non-finite values, in all
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped = state["step"], state.get("skipped", 0)


class NonFiniteError(Refusal, RuntimeError):
    """Too many non-finite updates in a row: the run stops with a message naming the fix."""


def out_of_domain_rewards(cfg: TrainConfig, trained: list[str]) -> list:
    """The `RewardEntry`s the held-out evaluation scores beside the trained ones: ``eval.rewards`` (registry names or
    import paths), or every registry reward whose files are present but UnifiedReward; those trained on left out."""
    from g2rpo.reward_plugins import resolve
    from g2rpo.reward_registry import REWARDS, missing_inputs

    names = cfg.eval.rewards
    if names is None:
        names = [n for n in REWARDS if n != "unifiedreward" and not missing_inputs([n], cfg.models)]
    elif missing := missing_inputs([n for n in names if n in REWARDS], cfg.models):
        raise FileNotFoundError(f"eval.rewards: not found: {'; '.join(missing)}")
    entries = [resolve(name) for name in names]
    return [entry for entry in entries if entry.name not in trained]


def group_seed(seed: int, position: int) -> int:
    """Sampling seed of the prompt group at a schedule position: independent of rank and world size."""
    return (seed * 1_000_003 + position) % (2**63 - 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo, meter: PhaseMeter | None = None):
        """``meter``: where start-up memory is recorded (a benchmark passes its own to go on measuring).

        What can refuse the run is checked before any model is loaded: the output folder (lock, an
        earlier run in it, a checkpoint to resume and whether it fits) and every embedding file's header.
        """
        self.cfg, self.info = cfg, info
        self._lock = RunLock(Path(cfg.output_dir)) if info.is_main else None
        try:
            self._build(meter or PhaseMeter(info.device))
        except BaseException:
            self.close(failed=True)  # a refused or failed start leaves the folder free
            raise

    def _build(self, meter: PhaseMeter) -> None:
        cfg, info, device = self.cfg, self.info, self.info.device
        torch.manual_seed(cfg.seed)
        self.out_dir = Path(cfg.output_dir)
        self.state = TrainState()
        self.saved_step = -1  # the step of the newest checkpoint this run wrote or resumed from
        self.data_identity = broadcast_object(agreed(lambda: checkpoint.data_identity(cfg.data.index)
                                                     if info.is_main else None))
        self.resume_from, self.resume_step, self.resume_changes = broadcast_object(agreed(self._claim_output_dir))
        entries = [spec.entry() for spec in cfg.rewards]
        problems = broadcast_object(agreed(lambda: [p for p in (e.check() for e in entries) if p] if info.is_main else []))
        if problems:  # a reward server that does not answer: refused before any model is loaded
            raise RewardServerError(problems[0])
        # the logs start before any model loads, so that a W&B run that cannot start is refused at once
        self.logger = agreed(lambda: MetricsLogger(self.out_dir, [e.name for e in entries], enabled=info.is_main,
                                                   purge_step=self.resume_step,
                                                   log_files={e.name: e.log_file for e in entries},
                                                   logging=cfg.logging, config=to_dict(cfg)))
        self.family = family_of(cfg.models.base.path, cfg.models.kind)
        config = transformer_config(cfg.models.base.path)
        dataset = agreed(lambda: EmbeddingDataset(cfg.data.index, config, self.family))
        agreed(lambda: dataset.check_files(info.rank, info.world_size))
        self.dataset, self.heldout = dataset.split(cfg.data.holdout)
        # One model at a time, each freed of its loading buffers before the next: the transformer is read
        # shard by shard into the engine, then the VAE, then each reward model.
        self.method = build_method(cfg, info.world_size)
        self.engine = build_engine(cfg, info, cfg.max_steps * self.method.updates_per_step(), meter.mark)
        self.vae = load_vae(cfg.models.base.path, cfg.models.base.dtype).to(device).eval().requires_grad_(False)
        self.rewards = {}
        for entry in entries:
            self.rewards[entry.name] = entry.build(cfg.models, device)
            release_memory()
        self.eval_rewards = {}  # out-of-domain: scored only by the held-out evaluation
        if cfg.eval_every:
            eval_device = torch.device("cpu") if cfg.eval.reward_device == "cpu" else device
            for entry in out_of_domain_rewards(cfg, [e.name for e in entries]):
                self.eval_rewards[entry.name] = entry.build(cfg.models, eval_device)
                release_memory()
        self.strip_images = []
        meter.mark("vae+rewards")
        self.reward_scales = torch.tensor([entry.train_scale for entry in entries])  # PickScore: / 26
        self.reward_weights = torch.tensor([spec.weight for spec in cfg.rewards])
        if cfg.advantage.normalize_weights:  # MixGRPO: the weights sum to 1 (in magnitude: a negated twin stays negated)
            self.reward_weights = self.reward_weights / self.reward_weights.abs().sum()
        self.schedule = GroupSchedule(len(self.dataset), info.world_size, cfg.data.prompts_per_rank, cfg.seed,
                                      cfg.data.shuffle)
        self.io_group = io_group(cfg.io_timeout_minutes)
        self.parts = checkpoint.Parts(self.engine, self.state, to_dict(cfg), self.data_identity)
        self._report_startup_memory(dict(meter.phases))

    def _claim_output_dir(self) -> tuple[str | None, int, list[str]] | None:
        """Rank 0: lock ``output_dir`` and decide how this run starts there: ``(checkpoint to resume or None,
        its step, the config fields that changed)``. Raises, naming the way out, where the folder holds
        another run that this one would mix with or destroy."""
        if not self.info.is_main:
            return None
        cfg, out = self.cfg, self.out_dir
        self._lock.acquire()
        earlier = run_files(out)
        if cfg.overwrite:
            if earlier:
                print0(f"overwrite=true: deleted the earlier run in {out} ({describe_run(clear_run(out))})")
            return None, 0, []
        path = checkpoint.resolve_resume(cfg.resume, out)
        if path is None:
            if earlier and cfg.resume != "auto":
                raise FileExistsError(f"{out}: holds an earlier run ({describe_run(earlier)}); continue it with "
                                      f"--resume auto (the launchers' default), replace it with --overwrite "
                                      f"(OVERWRITE=1; deletes it), or set another output_dir")
            exports = [p for p in earlier if checkpoint.step_of(p) is not None]
            if exports:
                raise FileExistsError(f"{out}: --resume auto found no resumable checkpoint, but the folder holds "
                                      f"exports of an earlier run ({describe_run(exports)}) that a fresh start would "
                                      f"overwrite; replace them with --overwrite (OVERWRITE=1), or set another output_dir")
            return None, 0, []  # an earlier attempt that never checkpointed: its logs are dropped
        if earlier and path.resolve().parent != out.resolve():
            raise FileExistsError(f"{out}: holds an earlier run ({describe_run(earlier)}), and resume={path} belongs "
                                  f"to another folder; resume into an empty output_dir, or into {path.parent}")
        state, changed = checkpoint.check_resume(path, to_dict(cfg), self.info.world_size, self.data_identity)
        return str(path), state["step"], [c for c in changed if not c.startswith(("resume:", "overwrite:"))]

    def _report_startup_memory(self, phases: dict) -> None:
        """``output_dir/startup_memory.json`` (every rank's phases) and one line: the largest over ranks."""
        ranks = all_gather_object(phases)
        if not self.info.is_main:
            return
        fp32_gb = sum(self.engine.param_sizes().values()) * 4 / 1e9
        atomic_write_text(self.out_dir / "startup_memory.json", json.dumps(
            {"transformer_fp32_gb": fp32_gb, "world_size": self.info.world_size, "ranks": ranks}, indent=1))
        worst = {name: max(r[name]["peak_rss_increase_gb"] for r in ranks) for name in ranks[0]}
        cuda = max((p.get("peak_cuda_gb", 0.0) for r in ranks for p in r.values()), default=0.0)
        print0("start-up host memory per rank (largest increase over ranks): " + ", ".join(
            f"{name} +{gb:.3g} GB" for name, gb in worst.items()) + f" (fp32 transformer: {fp32_gb:.3g} GB)"
            + (f"; GPU peak {cuda:.3g} GB" if cuda else ""))

    # ---------------------------------------------------------------- phases of a step

    def rollout(self, step: int) -> list[Group]:
        groups = []
        with self.engine.rollout_policy() as policy:
            for position in self.schedule.positions(step, self.info.rank):
                embedding, caption = self.dataset[self.schedule.item(position)]
                embedding = embedding.to(self.info.device)
                generator = torch.Generator().manual_seed(group_seed(self.cfg.seed, position))
                result = self.method.rollout(policy, embedding, generator, step, self.info.device)
                # the transitions each generation trains: drawn after the rollout's noise, from the same generator
                groups.append(Group(caption, embedding, result, trained=self.method.trained_transitions(result, generator)))
        return groups

    def score(self, groups: list[Group]) -> None:
        """Decode the method's images of every group (G²RPO: every completion and the anchor's final latent)
        and score them with every reward. A reward server that stops answering on any rank raises
        `_RewardsUnavailable` on every rank (`fit` then stops with a checkpoint)."""
        s = self.cfg.sampling
        failure = None
        for group in groups:
            latents = self.method.score_latents(group.rollout)
            images = self.family.decode(self.vae, latents, s.height, s.width, self.cfg.decode_batch_size)
            prompts = [group.caption] * len(images)
            try:
                scores = torch.stack([reward.score(images, prompts) for reward in self.rewards.values()]).cpu()
            except RewardServerError as exc:
                failure = str(exc)
                break
            scores = scores * self.reward_scales[:, None] if (self.reward_scales != 1).any() else scores
            self.method.assign_scores(group, scores, images)
        self._agree_on_rewards(failure)

    def _agree_on_rewards(self, failure: str | None) -> None:
        """With a reward server among the rewards (the only ones that fail by design): every rank learns whether
        any rank's server failed (one collective per scoring phase; none without a server)."""
        if not any(isinstance(reward, HttpReward) for reward in self.rewards.values()):
            if failure:
                raise _RewardsUnavailable(failure)
            return
        failures = [f for f in all_gather_object(failure) if f]
        if failures:
            raise _RewardsUnavailable(failures[0])

    def advantages(self, groups: list[Group]) -> list[torch.Tensor]:
        """Per group, the advantage of every trained transition (G²RPO: MGAI, ``[N, K]``)."""
        return self.method.advantages(groups, self.reward_weights, gather=self._gather)

    def _gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """``tensor`` of every rank, concatenated along ``dim`` in rank order (one rank: itself)."""
        return torch.cat([t.to(tensor.device) for t in all_gather_object(tensor.cpu())], dim=dim)

    def update(self, groups: list[Group], advantages: list[torch.Tensor]) -> dict[str, float]:
        """The method's optimiser updates, in order (G²RPO: one per branching step k, §5).

        Each update sums the weighted clipped losses of its chunks (one training forward each; plus β times their
        KL to the frozen reference, one no-grad reference forward each, where ``ppo.kl_beta > 0``): in one
        backward, or -- for the full-trajectory methods on an engine that accumulates gradients (FSDP) -- one
        backward per chunk, so that only one forward's activations are alive. A non-finite loss or gradient
        norm on any rank skips that update on every rank (no parameter changes; the ranks agree through an
        all-reduce before stepping).
        """
        losses, clip_fracs, kls, ref_kls, norms, skipped = [], [], [], [], [], 0
        per_chunk = self.method.backward_per_chunk and self.engine.accumulates_backward
        beta = self.cfg.ppo.kl_beta
        for ui, unit in enumerate(self.method.units(groups, advantages)):
            total, stats = None, []
            for chunk in unit:
                with self.engine.autocast():
                    new = chunk.transition(self.engine.module)
                if self.cfg.ppo.guard:  # GRPO-Guard: the normalised ratio, 1/|dt| per transition
                    loss, chunk_stats = guard_clip_loss(new.log_probs, chunk.old_log_probs, new.mean, chunk.old_means,
                                                        new.std, new.dt, chunk.advantages, self.cfg.ppo.clip_range)
                else:
                    loss, chunk_stats = ppo_clip_loss(new.log_probs, chunk.old_log_probs, chunk.advantages,
                                                      self.cfg.ppo.clip_range)
                if beta:  # + β·KL(π_θ ‖ π_ref) of the same transitions (g2rpo.loss.reference_kl)
                    with self.engine.reference_policy() as reference:
                        ref_mean = chunk.transition(reference).mean
                    kl = reference_kl(new.mean, ref_mean, new.std, new.dt, self.cfg.ppo.kl_form).mean()
                    loss = loss + beta * kl
                    chunk_stats["kl_ref"] = kl.detach()
                stats.append(chunk_stats)
                weighted = loss * chunk.weight
                if per_chunk:  # a non-finite chunk's gradients are dropped with the update's below
                    self.engine.backward(weighted)
                    weighted = weighted.detach()
                total = weighted if total is None else total + weighted
            if any_rank(not torch.isfinite(total).item()):  # one check (a host sync and an all-reduce) per update
                if per_chunk:
                    self.engine.skip_step()
                self._skip("loss", ui)
                skipped += 1
                continue
            if not per_chunk:
                self.engine.backward(total)
            norm = self.engine.clip_grad_norm()
            if not torch.isfinite(norm).item():
                self.engine.skip_step()
                self._skip("gradient norm", ui)
                skipped += 1
                continue
            ds_norm = self.engine.step()
            self.state.consecutive_skips = 0
            norms.append(ds_norm if ds_norm is not None else norm)
            losses.append(total.detach().cpu())
            clip_fracs.append(torch.stack([s["clip_frac"] for s in stats]).mean().cpu())
            kls.append(torch.stack([s["approx_kl"] for s in stats]).mean().cpu())
            if beta:
                ref_kls.append(torch.stack([s["kl_ref"] for s in stats]).mean().cpu())

        def mean(values):
            return torch.stack(values).mean().cpu() if values else torch.tensor(float("nan"))

        metrics = {
            "loss": all_reduce(mean(losses)).item(),
            "clip_frac": all_reduce(mean(clip_fracs)).item(),
            "approx_kl": all_reduce(mean(kls)).item(),
            "grad_norm": mean(norms).item(),
            "lr": self.engine.scheduler.get_last_lr()[0],
            "skipped_updates": skipped,
        }
        if beta:
            metrics["kl_ref"] = all_reduce(mean(ref_kls)).item()  # mean KL to the reference, before each update
        return metrics

    def _skip(self, what: str, branch_index: int | None, updates: int = 1) -> None:  # branch_index: the update
        """Record a skip (one update, or a whole step's ``updates`` for a bad reward); stop after too many in a row."""
        self.state.skipped += updates
        self.state.consecutive_skips += 1
        where = f"all {updates} updates of the step" if branch_index is None else (
            f"update k={self.cfg.sampling.branch_steps[branch_index]}" if self.method.name == "g2rpo"
            and self.cfg.ppo.update == "per_branch" else f"update {branch_index + 1} of the step")
        print0(f"warning: non-finite {what} on some rank at step {self.state.step}: skipped {where} on every rank "
               f"({self.state.consecutive_skips} skip(s) in a row, {self.state.skipped} skipped update(s) in all)")
        if self.state.consecutive_skips > self.cfg.max_consecutive_skips:
            raise NonFiniteError(f"{self.state.consecutive_skips} skips in a row (last: non-finite {what}), more than "
                                 f"max_consecutive_skips={self.cfg.max_consecutive_skips}; stopping. Lower optim.lr, "
                                 f"check the reward models, or resume from the last checkpoint.")

    def train_step(self, step: int, stop_requested=None) -> dict[str, float] | None:
        """One step; None when ``stop_requested()`` (collective) turned true before its update phase began:
        the step is abandoned, nothing has changed. Once updating, the step runs to its end."""
        t0 = time.perf_counter()
        groups = self.rollout(step)
        t1 = time.perf_counter()
        if stop_requested is not None and stop_requested():
            return None
        self.score(groups)
        t2 = time.perf_counter()
        if stop_requested is not None and stop_requested():
            return None
        finite = all(torch.isfinite(g.rewards).all() and (g.anchor_rewards is None or torch.isfinite(g.anchor_rewards).all())
                     for g in groups)
        if any_rank(not finite):
            updates = self.method.updates_per_step()
            self._skip("reward", None, updates=updates)
            for g in groups:  # keep the logged means finite
                g.rewards = g.rewards.nan_to_num(0.0)
                g.anchor_rewards = None if g.anchor_rewards is None else g.anchor_rewards.nan_to_num(0.0)
            metrics = {"loss": float("nan"), "skipped_updates": updates}
        else:
            metrics = self.update(groups, self.advantages(groups))
        t3 = time.perf_counter()
        anchored = all(g.anchor_rewards is not None for g in groups)
        for ri, name in enumerate(self.rewards):  # reward/: G²RPO's completions, or the trajectories' final images
            metrics[f"reward/{name}"] = all_reduce(torch.stack([self.method.logged_rewards(g)[ri].mean()
                                                                for g in groups]).mean()).item()
            if anchored:
                metrics[f"eval_reward/{name}"] = all_reduce(torch.stack([g.anchor_rewards[ri] for g in groups]).mean()).item()
        metrics.update(time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2, step_time=t3 - t0,
                       rollout_calls=sum(g.rollout.num_calls for g in groups),
                       sample_forwards=sum(g.rollout.num_sample_forwards for g in groups))
        if self.cfg.sample_every and step % self.cfg.sample_every == 0:
            self.logger.save_grid(step, torch.stack([g.sample_image for g in groups]))
        return metrics

    @torch.no_grad()
    def evaluate(self, dataset: EmbeddingDataset, seed: int = 0, strip: int = 0) -> dict[str, float]:
        """Rewards of deterministic (ODE) samples of every prompt in ``dataset`` (prompt i from seed ``seed + i``):
        ``{name: mean}`` of the trained rewards (as trained), ``{"ood/<name>": mean}`` of the out-of-domain ones
        (``eval.rewards`` not trained on; their own units), and ``{"std/<key>": std}`` across the prompts. Decoded
        and scored ``eval.batch_size`` at a time. ``strip``: the images of the first ``strip`` prompts are kept in
        ``self.strip_images`` (rank 0) for the sample strip.

        Collective under FSDP/DeepSpeed: every rank must call it (prompts are split across ranks).
        """
        s, world = self.cfg.sampling, self.info.world_size
        samples = []  # (index, latent, caption)
        with self.engine.rollout_policy() as policy:
            # every rank samples equally often (sharded weights gather on every forward, so the ranks' forwards
            # must match); a rank past the end re-samples the last prompt and drops the result
            for i in range(self.info.rank, -(-len(dataset) // world) * world, world):
                embedding, caption = dataset[min(i, len(dataset) - 1)]
                latent = ode_sample(policy, embedding.to(self.info.device), s, torch.Generator().manual_seed(seed + i),
                                    self.info.device)
                if i < len(dataset):
                    samples.append((i, latent, caption))
        rewards = {**self.rewards, **{f"ood/{name}": r for name, r in self.eval_rewards.items()}}
        scales = {**dict(zip(self.rewards, self.reward_scales.tolist())), **{f"ood/{n}": 1.0 for n in self.eval_rewards}}
        scores, kept, failure = [], [], None  # scores: per prompt {key: value}
        size = self.cfg.eval.batch_size
        for start in range(0, len(samples), size):  # decoded and scored outside the policy's autocast
            chunk = samples[start:start + size]
            images = self.family.decode(self.vae, torch.stack([latent for _, latent, _ in chunk]), s.height, s.width,
                                        size)
            captions = [caption for _, _, caption in chunk]
            try:
                values = {key: reward.score(images, captions).cpu().float() * scales[key]
                          for key, reward in rewards.items()}
            except RewardServerError as exc:
                failure = str(exc)
                break
            scores += [{key: v[j].item() for key, v in values.items()} for j in range(len(chunk))]
            kept += [(i, (images[j] * 255).round().byte().cpu()) for j, (i, _, _) in enumerate(chunk) if i < strip]
        self._agree_on_rewards(failure)
        everyone = [row for part in all_gather_object(scores) for row in part]
        strip_parts = all_gather_object(kept) if strip else []
        self.strip_images = [image for _, image in sorted(x for part in strip_parts for x in part)]
        result = {}
        for key in rewards:
            values = torch.tensor([row[key] for row in everyone], dtype=torch.float64)
            result[key] = values.mean().item()
            result[f"std/{key}"] = values.std().item() if len(values) > 1 else 0.0
        return result

    def heldout_rewards(self) -> dict[str, float]:
        """`evaluate` on the held-out prompts; with an EMA and ``ema.eval``, also with the averaged weights swapped
        in (``ema_<reward>``; the trained weights are back bit for bit afterwards). Collective."""
        rewards = self.evaluate(self.heldout, strip=self.cfg.eval.strip)
        ema = self.engine.ema
        if ema is not None and self.cfg.ema.eval:
            if ema.updates == 0:  # the average is still the initial weights: the same samples
                averaged = dict(rewards)
            else:
                strip = self.strip_images
                with ema.swapped_in():
                    averaged = self.evaluate(self.heldout)
                self.strip_images = strip  # the strip shows the trained weights
            rewards.update({f"ema_{name}": value for name, value in averaged.items() if not name.startswith("std/")})
        return rewards

    # ---------------------------------------------------------------- checkpoints and the loop

    def should_checkpoint(self, step: int) -> bool:
        return checkpoint_due(self.cfg, step)

    def save_checkpoint(self, step: int) -> Path:
        """A committed full-state checkpoint after ``step`` (see g2rpo.checkpoint). Collective."""
        save_dtype = torch.float32 if self.cfg.save_dtype == "float32" else torch.bfloat16
        path = checkpoint.save(self.out_dir, step, self.parts, self.info, self.io_group, self.cfg.keep_last, save_dtype)
        self.saved_step = step
        return path

    def resume(self) -> Path | None:
        """Load the checkpoint `_claim_output_dir` chose (if any), then record this start: ``config.yaml``
        (the config in force), a line of ``config_history.jsonl``, logs cut back to the resumed step."""
        path = Path(self.resume_from) if self.resume_from else None
        if path is None:
            print0("starting from scratch" + (" (no committed checkpoint found)" if self.cfg.resume else ""))
        else:
            checkpoint.load(path, self.parts, self.info, self.io_group, self.cfg.verify_checksums)
            self.saved_step = self.state.step - 1
            print0(f"resumed from {path} at step {self.state.step}")
            for change in self.resume_changes:
                print0(f"  changed on resume, applied from step {self.state.step}: {change}")
        if self.info.is_main:
            self.logger.truncate(self.state.step)
            atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
            append_history(self.out_dir, {"step": self.state.step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "resumed_from": str(path) if path else None,
                                          "world_size": self.info.world_size, "changes": self.resume_changes,
                                          "config": to_dict(self.cfg)})
        return path

    def _eval_due(self, step: int) -> bool:
        """Held-out evaluation after ``step`` completed steps: every eval_every, and at the start and the end."""
        every = self.cfg.eval_every
        return bool(every) and (step % every == 0 or step == self.cfg.max_steps)

    def fit(self) -> TrainState:
        """Train to ``max_steps``. SIGTERM/SIGINT stop the run at the next check -- after the rollout or the
        scoring of a step (that step is abandoned) or at the end of a step -- write a committed checkpoint of
        the last completed step (unless one exists) and raise `Interrupted` (the CLI exits 128 + signal). A
        held-out evaluation that a stop pre-empted runs when the run resumes."""
        from tqdm import tqdm

        try:
            self.resume()
            stop = _StopFlag()
            requested = lambda: any_rank(stop.signal is not None)  # noqa: E731 -- collective: every rank asks
            bar = tqdm(range(self.state.step, self.cfg.max_steps), disable=not self.info.is_main, desc="g2rpo",
                       dynamic_ncols=True, initial=self.state.step, total=self.cfg.max_steps)
            with stop.installed():
                if self._eval_due(self.state.step) and not broadcast_object(self.logger.has_heldout(self.state.step)):
                    self._log_heldout()
                for step in bar:
                    rng = checkpoint.rng_state()
                    try:
                        metrics = self.train_step(step, requested)
                    except _RewardsUnavailable as exc:  # the step is abandoned: the state is still that after step - 1
                        checkpoint.set_rng_state(rng)
                        self._stop_for_rewards(str(exc), step - 1, f"step {step} abandoned")
                    if metrics is None:  # stopped before updating: the state is still that after step - 1
                        checkpoint.set_rng_state(rng)
                        self._stop(stop.signal, step - 1, f"step {step} abandoned before its update")
                    self.logger.log(step, metrics)
                    rewards = " ".join(f"{k.split('/')[1]}={metrics[k]:.4f}" for k in metrics
                                       if k.startswith("eval_reward/"))
                    bar.set_postfix_str(f"loss={metrics['loss']:.3g} {rewards} {metrics['step_time']:.1f}s/step")
                    self.state.step = step + 1
                    if requested():
                        self._stop(stop.signal, step, f"after step {step}")
                    if self._eval_due(self.state.step):
                        self._log_heldout()
                    if self.should_checkpoint(step):
                        self.save_checkpoint(step)
                        self._update_best(step)
            self.logger.close()
            self._write_report()
            return self.state
        except BaseException:
            self.close(failed=True)
            raise
        finally:
            self.close()

    def _log_heldout(self) -> None:
        """The held-out evaluation after ``state.step`` steps: logged with its sample strip and the hacking detector's
        flags (g2rpo.hacking; ``eval.stop_on_hacking`` stops the run there, with a checkpoint). A reward server that
        stops answering stops the run with a checkpoint of the last completed step (the evaluation runs again on
        resume)."""
        step, e = self.state.step, self.cfg.eval
        try:
            rewards = self.heldout_rewards()
        except _RewardsUnavailable as exc:
            self._stop_for_rewards(str(exc), step - 1, f"the held-out evaluation after step {step - 1}")
        record = {"step": step, **{f"heldout/{k}": v for k, v in rewards.items()}}
        fired = broadcast_object(hacking.flags([*self.logger.heldout, record], e.window, e.margin)
                                 if self.info.is_main else None)
        self.logger.log_heldout(step, rewards, fired)
        self.logger.save_strip(step, self.strip_images)
        if fired:
            print0(f"warning: reward hacking flagged after {step} steps: {', '.join(fired)} below their start by more "
                   f"than {e.margin} std for {e.window} evaluations while the trained rewards rose (g2rpo.hacking)")
            if e.stop_on_hacking:
                last = step - 1
                if last >= 0 and self.saved_step != last:
                    self.save_checkpoint(last)
                    self._update_best(last)
                self.logger.close()
                self._write_report()
                raise HackingDetected(f"eval.stop_on_hacking: reward hacking flagged after {step} steps ({', '.join(fired)}"
                                      f" fell while the trained rewards rose); checkpoint-{last} written"
                                      + self._best_note())

    def _update_best(self, step: int) -> None:
        """Rank 0, after checkpoint ``step`` was committed: point ``best.json`` at it when its held-out evaluation (after
        ``step + 1`` steps) beats the pointer's by ``eval.best_by`` (g2rpo.hacking.criterion)."""
        by = self.cfg.eval.best_by
        if not by or not self.info.is_main:
            return
        record = next((r for r in self.logger.heldout if r["step"] == step + 1), None)
        value = hacking.criterion(self.logger.heldout, record, by) if record else None
        if value is None:
            return
        path = self.out_dir / BEST
        if path.is_file():
            current = json.loads(path.read_text())
            if current.get("by") == by and current["value"] >= value:
                return
        atomic_write_text(path, json.dumps({"checkpoint": f"checkpoint-{step}", "step": step, "by": by,
                                            "value": value}, indent=1) + "\n")

    def _write_report(self) -> None:
        if self.info.is_main:
            from g2rpo.report import write_report

            print0(f"report: {write_report(self.out_dir)}")

    def _best_note(self) -> str:
        path = self.out_dir / BEST
        if not self.cfg.eval.best_by or not path.is_file():
            return ""
        best = json.loads(path.read_text())
        return f"; the best by {best['by']}: {best['checkpoint']} ({self.out_dir / 'best'} for inference)"

    def _stop_for_rewards(self, message: str, last_step: int, where: str) -> None:
        """Leave a committed checkpoint of ``last_step`` (unless one exists), then raise `RewardServerError`: one
        line naming the server, where the run stopped and how to go on."""
        if last_step >= 0 and self.saved_step != last_step:
            self.save_checkpoint(last_step)
        self.logger.close()
        saved = f"checkpoint-{last_step} written" if last_step >= 0 else "no step completed, nothing to save"
        raise RewardServerError(f"{message}; stopped at {where}, {saved}; once the server answers, run the same "
                                f"command again (--resume auto, the launchers' default) to continue")

    def _stop(self, signum: int | None, last_step: int, where: str) -> None:
        """Leave a committed checkpoint of ``last_step`` (the last completed step), then raise `Interrupted`."""
        if last_step >= 0 and self.saved_step != last_step:  # the same on every rank, whatever the file system shows
            self.save_checkpoint(last_step)
        self.logger.close()
        saved = f"checkpoint-{last_step}" if last_step >= 0 else "nothing to save (no step completed)"
        raise Interrupted(signum or signal.SIGTERM, f"{where}; {saved}")

    def close(self, failed: bool = False) -> None:
        """Close the logs (if still open; ``failed``: the run ended in an error) and release the output folder's lock
        (the end of the process releases it too)."""
        if getattr(self, "logger", None) is not None:
            self.logger.close(failed=failed)
        if self._lock is not None:
            self._lock.release()


class Interrupted(Exception):
    """Training stopped by a signal after writing a committed checkpoint."""

    def __init__(self, signum: int, where: str = ""):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} ({where})")
        self.exit_code = 128 + int(signum)


class HackingDetected(Refusal, RuntimeError):
    """``eval.stop_on_hacking``: the run stopped where the detector fired, with a checkpoint."""


class _RewardsUnavailable(Exception):
    """Internal: a reward server failed on some rank during a scoring phase (every rank raises it together)."""


class _StopFlag:
    """Remembers SIGTERM/SIGINT instead of dying mid-step; the loop checks it between steps."""

    def __init__(self):
        self.signal = None

    def _handler(self, signum, frame):
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

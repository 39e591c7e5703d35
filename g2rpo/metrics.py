"""Rank-0 training logs: JSONL metrics, TensorBoard scalars, the reference's reward text files,
sample grids every N steps and a reward-curve PNG at the end. Every file is written atomically or
appended one whole line at a time."""

from __future__ import annotations

import io
import json
import secrets
import shutil
from pathlib import Path

import torch

from g2rpo.cli import Refusal
from g2rpo.io import atomic_write_bytes, atomic_write_text, write_png_grid
from g2rpo.reward_registry import REWARDS

WANDB_RUN = "wandb_run.json"  # the W&B run this output_dir logs to: {"id", "project", "entity"}


class WandbError(Refusal, RuntimeError):
    """logging.wandb: the W&B run could not be started (not logged in, no network in online mode, ...)."""


class WandbRun:
    """Rank 0's Weights & Biases run (``logging.wandb``): the same scalars as metrics.jsonl / heldout.jsonl, the
    held-out sample strips, and the config in force, each row carrying the training step as ``step`` (W&B's x-axis
    for every chart). The run's id is kept in ``output_dir/wandb_run.json``, so a resumed run logs into the same
    W&B run; the steps that a stopped run logged after its last checkpoint appear there twice (under an exact
    resume with the same values)."""

    def __init__(self, out_dir: Path, cfg, config: dict | None):
        import wandb

        self.wandb = wandb
        path = out_dir / WANDB_RUN
        self.created = {p for p in (path, out_dir / "wandb") if not p.exists()}  # what `discard` may remove
        saved = json.loads(path.read_text()) if path.is_file() else {}
        same = saved.get("project") == cfg.wandb_project and saved.get("entity") == cfg.wandb_entity
        run_id = saved["id"] if same and saved.get("id") else secrets.token_hex(6)
        try:
            self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, id=run_id,
                                  name=cfg.wandb_name or out_dir.resolve().name, resume="allow", dir=str(out_dir),
                                  mode=cfg.wandb_mode, tags=list(cfg.wandb_tags) or None)
        except Exception as exc:  # noqa: BLE001 -- wandb raises several kinds; each becomes the one line
            hint = ("log in with `wandb login` (or set WANDB_API_KEY), or set logging.wandb_mode=offline"
                    if cfg.wandb_mode == "online" else "or set logging.wandb=false")
            raise WandbError(f"logging.wandb: wandb.init failed ({type(exc).__name__}: {exc}); {hint}") from None
        if config is not None:
            self.run.config.update(config, allow_val_change=True)  # also on resume: the config in force now
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        atomic_write_text(path, json.dumps({"id": run_id, "project": cfg.wandb_project,
                                            "entity": cfg.wandb_entity}) + "\n")

    def log(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def image(self, step: int, key: str, path: Path) -> None:
        self.log(step, {key: self.wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)

    def discard(self) -> None:
        """After `finish`: remove this start's local W&B files (a start that failed before logging anything), so
        that the folder holds no run for the next start to trip over."""
        shutil.rmtree(Path(self.run.dir).parent, ignore_errors=True)  # <output_dir>/wandb/<mode>-run-<time>-<id>
        for path in self.created:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class MetricsLogger:
    def __init__(self, out_dir: str | Path, reward_names: list[str], enabled: bool = True, purge_step: int | None = None,
                 log_files: dict[str, str] | None = None, logging=None, config: dict | None = None):
        """``purge_step``: the step a resumed run continues from (TensorBoard drops the events from it on);
        ``log_files``: each reward's per-step text log (default: the registry's); ``logging``: the run's
        `g2rpo.config.LoggingConfig` (default: TensorBoard only); ``config``: the config in force (for W&B)."""
        from g2rpo.config import LoggingConfig

        logging = logging or LoggingConfig()
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.reward_names = reward_names
        self.log_files = {name: (log_files or {}).get(name) or (REWARDS[name].log_file if name in REWARDS
                                                                else f"{name}_reward.txt") for name in reward_names}
        self.history: list[dict] = []
        self.heldout: list[dict] = []
        self._writer, self.wandb = None, None
        self._tensorboard = enabled and logging.tensorboard
        self.purge_step = purge_step
        self.closed = self.logged = False
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if logging.wandb:  # started at once, so that a W&B run that cannot start is refused before any model loads
                self.wandb = WandbRun(self.out_dir, logging, config)

    @property
    def writer(self):
        """TensorBoard's writer, made at the first thing logged: a start refused before that leaves no files."""
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.purge_step)
        return self._writer

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        self.logged = True
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(step, {k: v for k, v in record.items() if k != "step"})
        # the reference's per-reward logs, one line per step: the anchor sample's reward (G²RPO; DenseGRPO with a
        # shared start noise), or -- for the methods without one -- the mean reward of the step's final images
        for name in self.reward_names:
            key = f"eval_reward/{name}" if f"eval_reward/{name}" in record else f"reward/{name}"
            if key in record:
                with open(self.out_dir / self.log_files[name], "a", encoding="utf-8") as f:
                    f.write(f"{step} {record[key]:.6f}\n")

    def truncate(self, step: int) -> None:
        """On resume at ``step``: drop what the stopped run logged after its checkpoint -- training lines of
        steps >= ``step``, held-out lines of more than ``step`` completed steps -- so no step is logged twice."""
        if not self.enabled:
            return

        def keep(path: Path, step_of, limit: int) -> list[str]:
            if not path.is_file():
                return []
            lines = [line for line in path.read_text().splitlines() if step_of(line) < limit]
            atomic_write_text(path, "".join(line + "\n" for line in lines))
            return lines

        jsonl, text = (lambda line: json.loads(line)["step"]), (lambda line: int(line.split()[0]))
        self.history = [json.loads(line) for line in keep(self.out_dir / "metrics.jsonl", jsonl, step)]
        self.heldout = [json.loads(line) for line in keep(self.out_dir / "heldout.jsonl", jsonl, step + 1)]
        keep(self.out_dir / "heldout_reward.txt", text, step + 1)
        for path in self.out_dir.glob("*_reward.txt"):
            if path.name != "heldout_reward.txt":
                keep(path, text, step)

    def has_heldout(self, step: int) -> bool:
        """Whether a held-out evaluation after ``step`` completed steps is logged (rank 0 knows)."""
        return any(record["step"] == step for record in self.heldout)

    def log_heldout(self, step: int, rewards: dict[str, float], hacking: list[str] | None = None) -> None:
        """Held-out evaluation (``step`` = optimiser steps taken so far): JSONL, TensorBoard, heldout_reward.txt;
        ``hacking``: the out-of-domain rewards the detector flags there (g2rpo.hacking), logged as ``hacking``."""
        if not self.enabled:
            return
        scalars = {f"heldout/{k}": v for k, v in rewards.items()}
        record = {"step": step, **scalars}
        if hacking is not None:
            record["hacking"] = list(hacking)
            scalars["heldout/hacking_flags"] = len(hacking)
        self.heldout.append(record)
        with open(self.out_dir / "heldout.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.out_dir / "heldout_reward.txt", "a", encoding="utf-8") as f:
            f.write(f"{step} " + " ".join(f"{k}={v:.6f}" for k, v in rewards.items()) + "\n")
        self._scalars(step, scalars)

    def save_strip(self, step: int, images: list[torch.Tensor]) -> Path | None:
        """The held-out sample strip (the same prompts and noise at every evaluation; uint8 ``[3, H, W]`` each) ->
        samples/heldout/step-XXXXX.png, and TensorBoard's images."""
        if not self.enabled or not images:
            return None
        stacked = torch.stack(images).float() / 255
        path = self.out_dir / "samples" / "heldout" / f"step-{step:05d}.png"
        write_png_grid(path, stacked, columns=len(images))
        if self.writer is not None:
            self.writer.add_images("heldout/strip", stacked, step)
        if self.wandb is not None:
            self.wandb.image(step, "heldout/strip", path)
        return path

    def save_grid(self, step: int, images: torch.Tensor) -> Path | None:
        """A PNG grid of images ``[M, 3, H, W]`` in [0, 1] -> samples/step_XXXXX.png."""
        if not self.enabled:
            return None
        path = self.out_dir / "samples" / f"step_{step:05d}.png"
        write_png_grid(path, images)
        return path

    def close(self, failed: bool = False) -> None:
        """Flush and close the logs (once; later calls do nothing); ``failed``: the run ended in an error (W&B marks
        it failed; no reward curve is drawn)."""
        if not self.enabled or self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        if not failed:
            self.plot_reward_curve()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            if failed and not self.logged:  # a start that failed before its first log line leaves no W&B files
                self.wandb.discard()

    def plot_reward_curve(self) -> Path | None:
        """reward_curve.png: per reward, the step's mean (completions or final images), the anchor sample's reward
        where the method has one, and the held-out mean."""
        keys = [f"reward/{n}" for n in self.reward_names]
        rows = [r for r in self.history if all(k in r for k in keys)]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes[0], keys):
            anchor_key = key.replace("reward/", "eval_reward/", 1)
            if all(anchor_key in r for r in rows):
                ax.plot(steps, [r[anchor_key] for r in rows], lw=1, alpha=0.5, label="anchor sample")
            ax.plot(steps, [r[key] for r in rows], lw=1.5, label="step mean (completions or final images)")
            held = [(r["step"], r[f"heldout/{key.split('/', 1)[1]}"]) for r in self.heldout]
            if held:
                ax.plot(*zip(*held), "o-", lw=2, label="held-out prompts")
            ax.set_xlabel("step")
            ax.set_title(key.split("/", 1)[1])
            ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        path = self.out_dir / "reward_curve.png"
        atomic_write_bytes(path, buffer.getvalue())
        return path

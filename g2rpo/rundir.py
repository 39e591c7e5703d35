"""A training run's output folder: one run at a time, and never two runs mixed in one folder.

* **Lock.** The run's rank 0 holds an exclusive ``flock`` on ``<output_dir>/.lock`` for as long as it
  lives (the kernel drops it when the process dies, so a crashed run leaves no stale lock). The file
  names the holder (host, pid, start time, command); a second run into the folder stops with that
  name. On a shared file system the lock works where ``flock`` does across nodes (NFSv4, and Lustre
  mounted with ``-o flock``).
* **Fresh or resumed.** A folder that already holds a run (logs, configs, checkpoints) is refused for
  a fresh start: continue it with ``--resume auto``, or replace it with ``--overwrite``, which
  deletes the previous run's files (and nothing else) before the new run writes any.
* **Config history.** ``config.yaml`` is the config in force, written only once the run is accepted;
  ``config_history.jsonl`` gains one line per start: the step, where it resumed from, what changed.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from g2rpo.cli import Refusal

LOCK = ".lock"
# What a run writes into its output_dir (see g2rpo.metrics, g2rpo.checkpoint): what --overwrite deletes.
RUN_FILES = ("config.yaml", "config_history.jsonl", "metrics.jsonl", "heldout.jsonl", "heldout_reward.txt",
             "startup_memory.json", "reward_curve.png", "*_reward.txt", "tensorboard", "samples", "checkpoint-*",
             ".checkpoint-*.tmp", "best.json", "report.html", "wandb", "wandb_run.json")


class RunInUseError(Refusal, RuntimeError):
    """Another live process holds the output folder's lock."""


class RunLock:
    """An exclusive lock on ``<folder>/.lock``, held until `release` or the end of the process."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self._file = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "(unknown)"
            handle.close()
            raise RunInUseError(f"{self.path.parent}: another run is writing to this folder (lock {self.path} held "
                                f"by {holder}); wait for it to end, stop it, or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def run_files(folder: str | Path) -> list[Path]:
    """The files and folders of an earlier run in ``folder`` (empty for a new or empty folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {path for pattern in RUN_FILES for path in folder.glob(pattern)}
    return sorted(found)


def clear_run(folder: str | Path) -> list[Path]:
    """Delete an earlier run's files from ``folder`` (for ``--overwrite``); returns what was deleted."""
    removed = run_files(folder)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def describe_run(paths: list[Path], limit: int = 6) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def append_history(folder: str | Path, record: dict) -> None:
    """One line of ``config_history.jsonl``, appended whole (the file is a log of starts)."""
    with open(Path(folder) / "config_history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

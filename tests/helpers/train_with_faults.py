"""Run `python -m g2rpo.train` with a fault injected, for tests/test_reliability.py (torchrun entry point).

    torchrun ... tests/helpers/train_with_faults.py FAULT --config ... [overrides]

FAULT: ``nan-reward@RANK:STEP`` (that rank's rewards are NaN at that step; STEP may be ``*``),
``nan-loss@RANK:STEP`` (that rank's PPO loss is NaN in every update of that step),
``crash@RANK:STEP`` (that rank dies at the start of that step, on the first torchrun attempt only),
``slow@RANK:STEP:SECONDS`` (that rank's rollout of that step takes SECONDS longer),
``enospc@RANK:STEP`` (the disk is full when that rank writes the checkpoint after that step).
RANK may be ``*`` (every rank); several faults are separated by commas. The production code is unchanged:
the faults are patched in from outside.
"""

import errno
import os
import sys
import time

import torch

from g2rpo import checkpoint, train, trainer
from g2rpo.cli import run_main


def main() -> None:
    faults, args = sys.argv[1], sys.argv[2:]
    for fault in faults.split(","):
        inject(fault)
    run_main(lambda: train.main(args))


def inject(fault: str) -> None:
    kind, where = fault.split("@")
    rank, step, *extra = where.split(":")

    def hit(self) -> bool:
        return (rank == "*" or self.info.rank == int(rank)) and (step == "*" or self.state.step == int(step))

    if kind == "nan-reward":
        original = trainer.Trainer.score

        def score(self, groups):
            original(self, groups)
            if hit(self):
                for group in groups:
                    group.rewards = torch.full_like(group.rewards, float("nan"))

        trainer.Trainer.score = score
    elif kind == "nan-loss":
        original_update = trainer.Trainer.update
        original_loss = trainer.ppo_clip_loss

        def update(self, groups, advantages):
            def loss(*args, **kwargs):
                value, stats = original_loss(*args, **kwargs)
                return (value * float("nan"), stats) if hit(self) else (value, stats)

            trainer.ppo_clip_loss = loss
            try:
                return original_update(self, groups, advantages)
            finally:
                trainer.ppo_clip_loss = original_loss

        trainer.Trainer.update = update
    elif kind == "crash":
        original = trainer.Trainer.train_step

        def train_step(self, current, *args):
            if hit(self) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                print(f"injected crash of rank {rank} at step {current}", flush=True)
                os._exit(17)
            return original(self, current, *args)

        trainer.Trainer.train_step = train_step
    elif kind == "slow":
        original_rollout = trainer.Trainer.rollout

        def rollout(self, current):
            if hit(self):
                print(f"injected delay of {extra[0]} s in the rollout of step {current}", flush=True)
                time.sleep(float(extra[0]))
            return original_rollout(self, current)

        trainer.Trainer.rollout = rollout
    elif kind == "enospc":
        original_save = checkpoint.save_safetensors
        original_checkpoint = trainer.Trainer.save_checkpoint

        def save_checkpoint(self, current):
            def full(state_dict, path, metadata=None):
                if (rank == "*" or self.info.rank == int(rank)) and current == int(step):
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return original_save(state_dict, path, metadata)

            checkpoint.save_safetensors = full
            try:
                return original_checkpoint(self, current)
            finally:
                checkpoint.save_safetensors = original_save

        trainer.Trainer.save_checkpoint = save_checkpoint
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    main()

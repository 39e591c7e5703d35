"""Run `python -m g2rpo.train` with a fault injected, for tests/test_reliability.py (torchrun entry point).

    torchrun ... tests/helpers/train_with_faults.py FAULT --config ... [overrides]

FAULT: ``nan-reward@RANK:STEP`` (that rank's rewards are NaN at that step; STEP may be ``*``),
``nan-loss@RANK:STEP`` (that rank's PPO loss is NaN in every update of that step),
``crash@RANK:STEP`` (that rank dies at the start of that step, on the first torchrun attempt only).
The production code is unchanged: the fault is patched in from outside.
"""

import os
import sys

import torch

from g2rpo import train, trainer


def main() -> None:
    fault, args = sys.argv[1], sys.argv[2:]
    kind, where = fault.split("@")
    rank, step = where.split(":")
    rank = int(rank)

    def hit(self) -> bool:
        return self.info.rank == rank and (step == "*" or self.state.step == int(step))

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

        def train_step(self, current):
            if hit(self) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                print(f"injected crash of rank {rank} at step {current}", flush=True)
                os._exit(17)
            return original(self, current)

        trainer.Trainer.train_step = train_step
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    train.main(args)


if __name__ == "__main__":
    main()

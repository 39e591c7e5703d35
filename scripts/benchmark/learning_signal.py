"""Held-out learning signal per method: each config trained to maximise its rewards and, as its twin, to
minimise them (every reward weight negated); the change of the summed held-out reward of both.

    torchrun --nproc_per_node=2 scripts/benchmark/learning_signal.py --seeds 0 1 2 --steps 48 \
        --json outputs/learning_signal.json            # the tiny configs of the full-trajectory methods
    torchrun --nproc_per_node=2 scripts/benchmark/learning_signal.py --configs configs/tiny.yaml --steps 24

For every config, seed and sign: builds `g2rpo.trainer.Trainer` in a scratch output folder, evaluates the
held-out prompts (``data.holdout``; deterministic ODE samples, `Trainer.evaluate`), trains ``--steps`` steps,
evaluates again. A method that follows its reward gains on held-out prompts and beats its twin; one whose
update ignored the reward would give twins with the same change (the same seeds: the same run). Prints a
markdown table (docs/benchmarks.md "Learning signal") and writes every number to ``--json``. Needs the
configs' embeddings (``bash scripts/run_tiny.sh`` writes the tiny ones).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [ROOT / "configs" / f"tiny_{name}.yaml" for name in ("dancegrpo", "flowgrpo", "mixgrpo", "densegrpo")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", type=Path, default=TINY)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "learning_signal")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides for every config")
    return p.parse_args(argv)


def heldout_change(path: Path, seed: int, sign: float, args, info) -> float:
    """Summed held-out reward after ``args.steps`` steps minus before, rewards weighted ``sign·weight``."""
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.trainer import Trainer

    cfg = load_config(TrainConfig, path, [*args.overrides, f"output_dir={args.workdir / f'{path.stem}_{seed}_{sign:+.0f}'}",
                                          "overwrite=true", f"seed={seed}", f"max_steps={args.steps}", "sample_every=0",
                                          "checkpoint_start=1000000"])
    cfg = dataclasses.replace(cfg, rewards=[dataclasses.replace(r, weight=sign * r.weight) for r in cfg.rewards])
    if not cfg.data.holdout:
        raise SystemExit(f"{path}: data.holdout is 0; the learning signal needs held-out prompts")
    trainer = Trainer(cfg, info)
    try:
        before = sum(trainer.evaluate(trainer.heldout).values())
        for step in range(cfg.max_steps):
            trainer.train_step(step)
        return sum(trainer.evaluate(trainer.heldout).values()) - before
    finally:
        trainer.close()


def main(argv=None) -> None:
    from g2rpo.distributed import init_distributed, print0, teardown

    args = parse_args(argv)
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    results = []
    for path in args.configs:
        for seed in args.seeds:
            started = time.perf_counter()
            up, down = (heldout_change(path, seed, sign, args, info) for sign in (1.0, -1.0))
            results.append({"config": path.name, "seed": seed, "steps": args.steps, "world_size": info.world_size,
                            "up": up, "down": down, "gap": up - down, "seconds": time.perf_counter() - started})
            print0(f"{path.name} seed {seed}: maximising {up:+.4f}, minimising {down:+.4f}, gap {up - down:+.4f}")
    lines = ["| config | seed | steps | ranks | maximising | minimising | gap | time (s) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['seed']} | {r['steps']} | {r['world_size']} | {r['up']:+.4f} | {r['down']:+.4f} | "
              f"{r['gap']:+.4f} | {r['seconds']:.0f} |" for r in results]
    print0("\n" + "\n".join(lines))
    if args.json is not None and info.is_main:
        from g2rpo.io import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    teardown(0)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

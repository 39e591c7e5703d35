"""Cost of one training step per method (g2rpo.methods), closed form beside measured, through the real Trainer.

    python scripts/benchmark/bench_methods.py                               # the tiny configs, one CPU process
    torchrun --nproc_per_node=8 scripts/benchmark/bench_methods.py --configs configs/g2rpo_hps_clip.yaml \
        configs/dancegrpo_hps.yaml configs/mixgrpo_hps.yaml configs/densegrpo_hps.yaml

For every config: builds `g2rpo.trainer.Trainer` (scratch output folder), runs one warm-up step and one timed
step, and prints per prompt group: transformer calls and sample-forwards of the rollout (closed form /
measured), decoded images (= images each reward scores), training forwards and the transitions they score,
optimiser updates, and the phase times of the timed step (slowest rank). Needs the configs' embeddings
(``bash scripts/run_tiny.sh`` writes the tiny ones).
"""

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = [ROOT / "configs" / f"tiny{suffix}.yaml" for suffix in ("", "_dancegrpo", "_flowgrpo", "_mixgrpo",
                                                                "_densegrpo")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", type=Path, default=TINY)
    p.add_argument("overrides", nargs="*", help="section.field=value overrides for every config")
    return p.parse_args(argv)


def closed_form(cfg, method, step: int) -> dict:
    """The rollout's closed-form cost at training ``step`` (MixGRPO-Flash's grid depends on the window)."""
    from g2rpo.rollout import expected_cost
    from g2rpo.trajectory import expected_trajectory_cost

    if cfg.method == "g2rpo":
        return expected_cost(cfg.sampling)
    grid = method.grid(step)[0]
    return expected_trajectory_cost(cfg.sampling, dense=cfg.method == "densegrpo",
                                    same_start_noise=cfg.trajectory.same_start_noise, order=cfg.sampling.order,
                                    steps=None if grid is None else len(grid) - 1)


def measure(path: Path, overrides: list[str], info) -> dict:
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import all_reduce
    from g2rpo.trainer import Trainer

    cfg = load_config(TrainConfig, path, [*overrides, f"output_dir=outputs/bench_methods/{path.stem}",
                                          "overwrite=true", "sample_every=0", "eval_every=0", "checkpoint_start=100000"])
    trainer = Trainer(cfg, info)
    try:
        trainer.train_step(0)  # warm-up: optimiser state, backward hooks
        metrics = trainer.train_step(1)
        groups = trainer.rollout(1)
    finally:
        trainer.close()
    per_group = cfg.data.prompts_per_rank  # metrics count a rank's groups
    decodes = len(trainer.method.score_latents(groups[0].rollout))
    if cfg.method == "g2rpo":
        k = len(cfg.sampling.branch_steps)  # one forward at (a_k, σ_k) per branch step scores the group's N
        forwards, transitions = k, k * cfg.sampling.group_size
    else:  # the chunks of the step's units, per group (advantages do not change how many there are)
        n, t = cfg.sampling.group_size, cfg.sampling.num_steps
        shape = (n, t) if cfg.method == "densegrpo" else (n,)
        units = trainer.method.units(groups, [torch.zeros(shape) for _ in groups])
        forwards = sum(len(unit) for unit in units) // per_group
        transitions = sum(len(t) for g in groups for t in g.trained) // per_group
    return {"method": cfg.method, "config": path.name, "closed": closed_form(cfg, trainer.method, 1),
            "calls": metrics["rollout_calls"] // per_group, "sample_forwards": metrics["sample_forwards"] // per_group,
            "decodes": decodes, "train_forwards": forwards, "transitions": transitions,
            "updates": trainer.method.updates_per_step(),
            **{k: all_reduce(torch.tensor(metrics[k]), "max").item() for k in ("time_rollout", "time_reward",
                                                                                "time_update")}}


def main(argv=None) -> None:
    from g2rpo.distributed import init_distributed, print0, teardown

    args = parse_args(argv)
    info = init_distributed(None)
    rows = [measure(path, args.overrides, info) for path in args.configs]
    print0("\n| method (config) | calls: closed / measured | sample-forwards: closed / measured | decodes = reward "
           "images | training forwards (transitions) | updates | rollout s | decode+reward s | update s |\n"
           "|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print0(f"| {r['method']} ({r['config']}) | {r['closed']['calls']} / {r['calls']} | "
               f"{r['closed']['sample_forwards']} / {r['sample_forwards']} | {r['decodes']} | "
               f"{r['train_forwards']} ({r['transitions']}) | {r['updates']} | {r['time_rollout']:.3f} | "
               f"{r['time_reward']:.3f} | {r['time_update']:.3f} |")
    teardown(0)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

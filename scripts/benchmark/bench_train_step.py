"""Benchmark one training step of the real trainer (torchrun, FSDP) in the reference's way and in ours.

    torchrun --nproc_per_node=2 scripts/benchmark/bench_train_step.py                 # tiny, 2 CPU processes
    torchrun --nproc_per_node=2 scripts/benchmark/bench_train_step.py --smoke         # small grid (CI: in process)
    torchrun --nproc_per_node=8 scripts/benchmark/bench_train_step.py --config configs/g2rpo_hps_clip.yaml \
        --sampling-as-configured

Builds `g2rpo.trainer.Trainer` from ``--config`` (default configs/tiny.yaml: FSDP over the processes)
with the reference sampling grid (T=16, K=0..7, G={1,2}, N=12; keep the config's with
``--sampling-as-configured``) and times, on the same weights and noise, three ways to roll out
one prompt group per rank:

* ``reference``: the reference recipe's order (batch 1 per generation, nothing shared) through the
  FSDP wrapper, which all-gathers every block on every forward;
* ``shared``: our evaluation order (shared evaluations, batched completions), still through the wrapper;
* ``shared+gathered``: our order on weights gathered once (``engine.rollout_weights=gathered``, the default:
  FSDP2 unshards every unit before the rollout; the timed rollout includes that gather, as every step pays it);
* ``shared+gathered+compiled`` (with ``--compile``): the same, torch.compiled (``engine.compile_rollout``);
  its first rollout compiles and is not reported.

Then decode + score every completion (per image for ``reference``, batched otherwise), and time the
policy update once: the official update already makes ONE batch-1 forward at ``(a_k, σ_k)`` per branch
step, shared by the group (its velocity repeated N times), then one optimiser step -- which is exactly
ours, so both rows carry the same update time. Prints a markdown table on rank 0: transformer calls and
sample-forwards per group, wall time per phase (slowest rank), max |Δ completions| against the reference,
and the ratios. Needs the tiny embeddings (``bash scripts/run_tiny.sh`` writes them).
"""

import argparse
import dataclasses
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_GRID = ["sampling.num_steps=16", "sampling.branch_steps=[0,1,2,3,4,5,6,7]", "sampling.granularities=[1,2]",
                  "sampling.group_size=12"]
SMOKE_GRID = ["sampling.num_steps=6", "sampling.branch_steps=[0,2]", "sampling.group_size=3",
              "sampling.height=32", "sampling.width=32"]
VARIANTS = {"reference": ("reference", False, False), "shared": ("shared", False, False),
            "shared+gathered": ("shared", True, False), "shared+gathered+compiled": ("shared", True, True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    p.add_argument("overrides", nargs="*", help="section.field=value overrides of the config")
    p.add_argument("--smoke", action="store_true", help="small grid, one iteration (CI)")
    p.add_argument("--iters", type=int, default=1, help="rollouts per variant; the last is reported")
    p.add_argument("--sampling-as-configured", action="store_true", help="keep the config's sampling grid")
    p.add_argument("--compile", action="store_true", help="also time the torch.compiled rollout")
    return p.parse_args(argv)


def slowest(seconds: float) -> float:
    from g2rpo.distributed import all_reduce

    return all_reduce(torch.tensor(seconds), "max").item()


def timed(fn, device):
    from g2rpo.distributed import barrier

    barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, slowest(time.perf_counter() - start)


def benchmark(argv=None) -> None:
    """The whole benchmark (collective under torchrun; one process otherwise); prints the table."""
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import all_reduce, init_distributed, print0
    from g2rpo.trainer import Trainer

    args = parse_args(argv)
    grid = SMOKE_GRID if args.smoke else [] if args.sampling_as_configured else REFERENCE_GRID
    # its own scratch folder, replaced on every run (not the config's output_dir, which may hold a real run)
    scratch = ["output_dir=outputs/bench_train_step", "overwrite=true"]
    cfg = load_config(TrainConfig, args.config, grid + ["data.prompts_per_rank=1"] + scratch + args.overrides)
    if not Path(cfg.data.index).is_file():
        raise SystemExit(f"{cfg.data.index}: no embedding index; run `bash scripts/run_tiny.sh` (or the preprocess "
                         f"step) first, or point data.index=... at one")
    info = init_distributed(None if cfg.engine.device == "auto" else cfg.engine.device)
    trainer = Trainer(cfg, info)
    engine = trainer.engine
    configured_weights = cfg.engine.rollout_weights
    reward_batch = {name: reward.batch_size for name, reward in trainer.rewards.items()}
    rows, results = {}, {}
    for name, (order, gathered, compiled) in VARIANTS.items():
        if compiled and not args.compile:
            continue
        if gathered and cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage != 3:
            print0(f"skipping {name}: DeepSpeed ZeRO-{cfg.engine.zero_stage} keeps whole weights on every rank")
            continue
        trainer.cfg.sampling = dataclasses.replace(cfg.sampling, order=order)
        engine.cfg.rollout_weights = "gathered" if gathered else "sharded"
        engine.cfg.compile_rollout = compiled
        for _ in range(max(1 if args.smoke else args.iters, 2 if compiled else 1)):
            engine.mark_weights_changed()  # as after an optimiser step: the gathered variants pay their refresh
            groups, t_rollout = timed(lambda: trainer.rollout(0), info.device)
        per_image = name == "reference"
        trainer.cfg.decode_batch_size = 1 if per_image else cfg.decode_batch_size
        for reward_name, reward in trainer.rewards.items():
            reward.batch_size = 1 if per_image else reward_batch[reward_name]
        _, t_score = timed(lambda: trainer.score(groups), info.device)
        rows[name] = {"calls": groups[0].rollout.num_calls, "sample_forwards": groups[0].rollout.num_sample_forwards,
                      "rollout_s": t_rollout, "decode+reward_s": t_score}
        results[name] = groups
    engine.cfg.rollout_weights = configured_weights
    trainer.cfg.sampling = cfg.sampling
    trainer.cfg.decode_batch_size = cfg.decode_batch_size
    ours = list(results)[-1]
    our_advantages = trainer.advantages(results[ours])
    trainer.update(results[ours], our_advantages)  # warm-up: optimiser state, backward hooks
    _, update = timed(lambda: trainer.update(results[ours], our_advantages), info.device)
    rows["reference"]["update_s"] = rows[ours]["update_s"] = update  # the official update is this one
    for name, groups in results.items():
        diff = (groups[0].rollout.completions - results["reference"][0].rollout.completions).abs().max()
        rows[name]["max|Δ|"] = all_reduce(diff, "max").item()

    s = cfg.sampling
    print0(f"\n{info.world_size} x {info.device.type}, engine {cfg.engine.kind}, {s.height}x{s.width}, "
           f"T={s.num_steps}, K={s.branch_steps}, G={s.granularities}, N={s.group_size}, "
           f"rewards {list(trainer.rewards)}, one group per rank\n")
    columns = ["calls", "sample_forwards", "rollout_s", "decode+reward_s", "update_s", "max|Δ|"]
    print0("| variant | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for name, row in rows.items():
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) and c == "max|Δ|" else
                 f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        print0(f"| {name} | " + " | ".join(cells) + " |")
    ref = rows["reference"]
    print0("\nreference / variant: " + "; ".join(
        f"{name}: rollout {ref['rollout_s'] / row['rollout_s']:.2f}x, decode+reward "
        f"{ref['decode+reward_s'] / row['decode+reward_s']:.2f}x" for name, row in rows.items() if name != "reference"))
    step = {name: row["rollout_s"] + row["decode+reward_s"] + row.get("update_s", update) for name, row in rows.items()}
    print0(f"update: the same in both (one forward per branch step for the group); whole step (rollout + "
           f"decode+reward + update): reference "
           f"{step['reference']:.3f} s; " + "; ".join(f"{name} {t:.3f} s ({step['reference'] / t:.2f}x)"
                                                     for name, t in step.items() if name != "reference"))


def main() -> None:
    from g2rpo.distributed import teardown

    benchmark()
    teardown(0)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

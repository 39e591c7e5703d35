"""Train FLUX with G2RPO: the entry point the launchers start under torchrun.

    torchrun --nproc_per_node=2 -m g2rpo.train --config configs/tiny.yaml
    torchrun --nnodes=2 --nproc_per_node=8 ... -m g2rpo.train --config configs/g2rpo_hps.yaml max_steps=301
    python -m g2rpo.train --config configs/g2rpo_hps.yaml --dry-run --nnodes 2 --nproc-per-node 8

Positional ``section.field=value`` arguments override the YAML. ``--dry-run`` validates the config
and prints the resolved world (nodes, ranks, groups per rank, steps, updates) without a GPU.
"""

import argparse
import sys

from g2rpo.config import TrainConfig, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="G2RPO training")
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved run and exit")
    parser.add_argument("--resume", default=None, help="auto (latest committed checkpoint, else fresh) or a "
                        "checkpoint folder; same as the override resume=...")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an output_dir that holds an earlier "
                        "run, deleting that run's files; same as overwrite=true")
    parser.add_argument("--nnodes", type=int, default=None, help="for --dry-run: nodes (default: $NNODES or 1)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="for --dry-run: processes per node (default: $NPROC_PER_NODE or 1)")
    return parser.parse_args(argv)


def describe(cfg: TrainConfig, nnodes: int, nproc_per_node: int) -> str:
    from g2rpo.methods import build_method

    s, world = cfg.sampling, nnodes * nproc_per_node
    groups = world * cfg.data.prompts_per_rank
    k = build_method(cfg, world).updates_per_step()
    if cfg.method == "g2rpo":
        sampling = f"K={s.branch_steps}, G={s.granularities}, update={cfg.ppo.update}"
    else:
        t = cfg.trajectory
        sampling = (f"full trajectories, noise={t.noise}, timestep_fraction={t.timestep_fraction}, "
                    f"ignore_last={str(t.ignore_last).lower()}")
        if cfg.method == "mixgrpo":
            w = cfg.window
            sampling += f", SDE window {w.size} from {w.start}, +{w.stride} every {w.shift_every} steps"
            if w.solver != "euler" or w.post_compress < 1:
                sampling += f", then {w.solver} steps, tail x{w.post_compress} (MixGRPO-Flash)"
    lines = [
        f"world: {nnodes} node(s) x {nproc_per_node} process(es) = {world} rank(s), engine {cfg.engine.kind}",
        f"method: {cfg.method}",
        f"per step: {cfg.data.prompts_per_rank} prompt group(s) per rank, {groups} in all, "
        f"{s.group_size} generations each at {s.height}x{s.width}",
        f"sampling: T={s.num_steps}, shift={s.shift}, eta={s.eta}, {sampling}, order={s.order}",
        f"rewards: {', '.join(f'{r.name} (weight {r.weight})' for r in cfg.rewards)}",
        f"steps: {cfg.max_steps}, optimiser updates: {cfg.max_steps * k} ({k} per step), lr {cfg.optim.lr}, "
        f"clip_range {cfg.ppo.clip_range}" + (f", KL to the frozen base beta={cfg.ppo.kl_beta}" if cfg.ppo.kl_beta else ""),
        f"checkpoints: every {cfg.checkpoint_every} steps from step {cfg.checkpoint_start} and the last, "
        f"to {cfg.output_dir}",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    import os

    args = parse_args(argv)
    overrides = args.overrides + ([f"resume={args.resume}"] if args.resume else []) \
        + (["overwrite=true"] if args.overwrite else [])
    cfg = load_config(TrainConfig, args.config, overrides)
    if args.dry_run:
        nnodes = args.nnodes or int(os.environ.get("NNODES", "1"))
        nproc = args.nproc_per_node or int(os.environ.get("NPROC_PER_NODE", "1"))
        print(describe(cfg, nnodes, nproc))
        return

    from g2rpo.distributed import RankFailure, init_distributed, print0, teardown
    from g2rpo.rundir import RunInUseError
    from g2rpo.trainer import Interrupted, Trainer

    info = init_distributed(None if cfg.engine.device == "auto" else cfg.engine.device)
    print0(describe(cfg, int(os.environ.get("NNODES", "1")), info.world_size // int(os.environ.get("NNODES", "1"))))
    try:
        Trainer(cfg, info).fit()
    except Interrupted as stop:
        print0(f"{stop}; resume with --resume auto")
        teardown(stop.exit_code)
    except RankFailure:  # the failing rank reports it
        teardown(2, sync=False)
    except (ValueError, OSError, RunInUseError) as exc:  # refusals that name their fix: no traceback
        if os.environ.get("G2RPO_TRACEBACK") == "1" or not _refusal(exc):
            raise
        print(f"error (rank {info.rank}): {exc}", file=sys.stderr, flush=True)
        teardown(2, sync=False)
    teardown(0)


def _refusal(exc: BaseException) -> bool:
    """An error of ours that says what is wrong and how to fix it (a bad config, file or folder, a full disk);
    anything else keeps its traceback."""
    import errno

    if isinstance(exc, OSError):
        return isinstance(exc, (FileNotFoundError, FileExistsError)) or exc.errno == errno.ENOSPC
    return True


if __name__ == "__main__":
    main()

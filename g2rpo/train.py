"""Train FLUX with G2RPO: the entry point the launchers start under torchrun.

    torchrun --nproc_per_node=2 -m g2rpo.train --config configs/tiny.yaml
    torchrun --nnodes=2 --nproc_per_node=8 ... -m g2rpo.train --config configs/g2rpo_hps.yaml max_steps=301
    python -m g2rpo.train --config configs/g2rpo_hps.yaml --dry-run --nnodes 2 --nproc-per-node 8

Positional ``section.field=value`` arguments override the YAML. ``--dry-run`` validates the config
and prints the resolved world (nodes, ranks, groups per rank, steps, updates) without a GPU.
"""

import argparse

from g2rpo.config import TrainConfig, checkpoint_steps, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="G2RPO training")
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved run and exit")
    parser.add_argument("--resume", default=None, help="auto (latest committed checkpoint, else fresh), none (a "
                        "fresh start) or a checkpoint folder; same as the override resume=... (the two may not "
                        "disagree)")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an output_dir that holds an earlier "
                        "run, deleting that run's files; same as overwrite=true")
    parser.add_argument("--nnodes", type=int, default=None, help="for --dry-run: nodes (default: $NNODES or 1)")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="for --dry-run: processes per node (default: $NPROC_PER_NODE or 1)")
    return parser.parse_args(argv)


def start_overrides(args) -> list[str]:
    """The positional overrides with ``--resume`` / ``--overwrite`` folded in. A flag and an override of the same
    field that disagree are refused, naming both (the launchers pass RESUME= / OVERWRITE=1 as these flags)."""
    from g2rpo.config import normalize_resume

    overrides = list(args.overrides)
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    if args.resume is not None:
        if "resume" in given and normalize_resume(given["resume"]) != normalize_resume(args.resume):
            raise ValueError(f"resume is given twice, differently: --resume {args.resume or 'none'} (the launchers' "
                             f"RESUME=) and the override resume={given['resume'] or 'none'}; give one")
        overrides.append(f"resume={args.resume}")
    if args.overwrite:
        if given.get("overwrite", "true").strip().lower() not in ("true", "1", "yes"):
            raise ValueError(f"overwrite is given twice, differently: --overwrite (the launchers' OVERWRITE=1) and the "
                             f"override overwrite={given['overwrite']}; give one")
        overrides.append("overwrite=true")
    return overrides


def start_line(cfg: TrainConfig) -> str:
    if cfg.overwrite:
        return f"start: afresh, deleting any earlier run in {cfg.output_dir} (overwrite)"
    if cfg.resume == "auto":
        return f"start: the newest committed checkpoint in {cfg.output_dir}, else afresh (resume auto)"
    if cfg.resume:
        return f"start: resume from {cfg.resume}"
    return f"start: afresh; refused if {cfg.output_dir} holds an earlier run (resume none)"


def base_model_line(cfg: TrainConfig) -> str:
    """The base model's folder, family (read from it where models.kind is auto) and guidance."""
    from g2rpo.models import family, family_of

    path, kind = cfg.models.base.path, cfg.models.kind
    try:
        chosen = family_of(path, kind)
    except (OSError, ValueError):  # not there yet (the input check below names it): the family named, if any
        chosen = family(kind) if kind != "auto" else None
    if chosen is None:
        return f"{path} (models.kind auto: the family is read from its model_index.json)"
    guidance = (f"classifier-free guidance {cfg.sampling.guidance} (2 rows per sample)" if
                chosen.rows_per_sample(cfg.sampling.guidance) == 2 else f"guidance {cfg.sampling.guidance}")
    return f"{chosen.title} ({chosen.kind}) at {path}, {guidance}, timestep {cfg.sampling.timestep}"


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
        f"base model: {base_model_line(cfg)}",
        f"per step: {cfg.data.prompts_per_rank} prompt group(s) per rank, {groups} in all, "
        f"{s.group_size} generations each at {s.height}x{s.width}",
        f"sampling: T={s.num_steps} ({s.grid} grid), shift={s.shift}, eta={s.eta}, {sampling}, order={s.order}",
        f"rewards: {', '.join(f'{r.key} (weight {r.weight})' + ('' if r.key == r.name else f' = {r.name}') for r in cfg.rewards)}",
        f"steps: {cfg.max_steps}, optimiser updates: {cfg.max_steps * k} ({k} per step), lr {cfg.optim.lr}, "
        f"clip_range {cfg.ppo.clip_range}" + (" on GRPO-Guard's normalised ratio, each transition's loss / |dt|"
                                              if cfg.ppo.guard else ""),
        f"advantages: {cfg.advantage.std} std over the {cfg.advantage.std_over} + {cfg.advantage.eps:g}, "
        f"{cfg.advantage.precision}, rewards combined {cfg.advantage.combine}"
        + (", weights normalised" if cfg.advantage.normalize_weights else ""),
        f"KL to the frozen base: beta={cfg.ppo.kl_beta} ({cfg.ppo.kl_form} form)" if cfg.ppo.kl_beta else "KL: off",
        f"trained weights: LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.target_modules)}"
        if cfg.lora.rank else "trained weights: all (full fine-tuning)",
        f"EMA: decay {cfg.ema.decay}, every {cfg.ema.update_every} update(s), kept on {cfg.ema.device}" if cfg.ema.decay
        else "EMA: off",
        f"engine: {cfg.engine.kind}, {cfg.engine.mixed_precision}, "
        + (f"ZeRO-{cfg.engine.zero_stage}" if cfg.engine.kind == "deepspeed" else cfg.engine.fsdp_sharding)
        + (", fp32 state offloaded to host memory" if cfg.engine.offload else "")
        + f", rollout weights {cfg.engine.rollout_weights}" + (", compiled rollouts" if cfg.engine.compile_rollout else ""),
        f"checkpoints to {cfg.output_dir}: after steps {_listed(checkpoint_steps(cfg))} (every {cfg.checkpoint_every} "
        f"from {cfg.checkpoint_start}, and the last)",
        f"logs: metrics.jsonl" + (", TensorBoard" if cfg.logging.tensorboard else "")
        + (f", W&B {cfg.logging.wandb_entity + '/' if cfg.logging.wandb_entity else ''}{cfg.logging.wandb_project} "
           f"({cfg.logging.wandb_mode})" if cfg.logging.wandb else ""),
        start_line(cfg),
    ]
    return "\n".join(lines)


def _listed(steps: list[int], most: int = 8) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= most else \
        ", ".join(map(str, steps[:most - 2])) + f", ... ({len(steps)} in all), {steps[-1]}"


def input_problems(cfg: TrainConfig) -> list[str]:
    """The files a run of ``cfg`` reads that are missing: the base model's pipeline, the embedding index, the reward
    models, a ψ table (``DRY_RUN`` checks them before anything starts)."""
    from pathlib import Path

    from g2rpo.reward_registry import REWARDS, missing_inputs

    problems = [] if (Path(cfg.models.base.path) / "model_index.json").is_file() else [
        f"models.base.path={cfg.models.base.path} (no model_index.json: not a diffusers pipeline folder)"]
    if not Path(cfg.data.index).is_file():
        problems.append(f"data.index={cfg.data.index} (run the preprocessing launcher)")
    if cfg.trajectory.noise == "psi" and not Path(cfg.dense.psi_table).is_file():
        problems.append(f"dense.psi_table={cfg.dense.psi_table} (scripts/densegrpo/calibrate_psi.py writes it)")
    registry = [r.name for r in cfg.rewards if r.name in REWARDS]
    checks = [problem for problem in (r.entry().check() for r in cfg.rewards) if problem]  # reward servers
    return problems + missing_inputs(registry, cfg.models) + checks


def main(argv=None) -> None:
    """Parse, validate, train; a refusal or error ends the process through `g2rpo.cli.run_main`."""
    import os

    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, start_overrides(args))
    if args.dry_run:
        nnodes = args.nnodes or int(os.environ.get("NNODES", "1"))
        nproc = args.nproc_per_node or int(os.environ.get("NPROC_PER_NODE", "1"))
        print(describe(cfg, nnodes, nproc))
        problems = input_problems(cfg)
        print("inputs: " + ("all found" if not problems else f"{len(problems)} missing"), flush=True)
        if problems:
            raise FileNotFoundError(f"{args.config}: the run would read what is not there: {'; '.join(problems)}")
        return

    from g2rpo.distributed import init_distributed, print0, teardown
    from g2rpo.trainer import Interrupted, Trainer

    info = init_distributed(None if cfg.engine.device == "auto" else cfg.engine.device)
    print0(describe(cfg, int(os.environ.get("NNODES", "1")), info.world_size // int(os.environ.get("NNODES", "1"))))
    try:
        Trainer(cfg, info).fit()
    except Interrupted as stop:
        print0(f"{stop}; resume with --resume auto")
        teardown(stop.exit_code)
    teardown(0)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

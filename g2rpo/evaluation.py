"""Evaluation harness: generate with a (trained) FLUX pipeline, score with every metric, summarise.

    torchrun --nproc_per_node=8 scripts/evaluation/evaluate.py --base ckpt/flux \
        --transformer outputs/g2rpo_hps_clip/checkpoint-300/transformer --prompts data/hpdv2_test_prompts.txt \
        --models-config configs/models/flux_dev.yaml --out outputs/eval/g2rpo

Prompts are sharded across ranks (prompt i on rank i mod world); prompt i is sampled with seed
``--seed + i``, so a run is reproducible for any number of ranks. Images are written to
``<out>/images/NNNNN.png`` and skipped when they already exist (a re-run only re-scores); scores are
always computed from the saved PNG, so they do not depend on whether an image was just generated.
``<out>/fingerprint.json`` records what the images were made from (`image_fingerprint`: base
pipeline, transformer, sampling settings, prompt set); existing images are reused only when it equals
this run's, otherwise the run stops naming what changed (use a new --out, or --overwrite to delete the
old outputs first). A --transformer is checked with `g2rpo.checkpoint.verify_export` before use.
Outputs: ``scores.jsonl`` (one line per image), ``summary.md`` / ``summary.csv`` (mean ± std and n,
in the paper's column order), ``grid.png`` (the first 16 images) and ``settings.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from g2rpo.cli import Refusal
from g2rpo.io import atomic_write_text, write_png, write_png_grid
from g2rpo.reward_registry import REWARDS, missing_inputs

# The paper's table columns, in its order (g2rpo.reward_registry).
METRIC_COLUMNS = {name: entry.column for name, entry in REWARDS.items()}
# Everything an evaluation writes into --out besides images/ (what --overwrite deletes).
OUTPUT_FILES = ("fingerprint.json", "scores.jsonl", "summary.md", "summary.csv", "grid.png", "settings.json")


class EvaluationError(Refusal, RuntimeError):
    """A run that cannot start (stale outputs, a corrupted or uncommitted export): one line, no traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate and score images for the evaluation table")
    p.add_argument("--base", type=Path, required=True, help="diffusers pipeline folder of the base model (FLUX, SD3)")
    p.add_argument("--transformer", type=Path, default=None, help="trained transformer folder (default: the base's), or <output_dir>/best (the checkpoint eval.best_by chose)")
    p.add_argument("--lora", type=Path, default=None, help="trained LoRA folder (a checkpoint's lora/ or lora_ema/)")
    p.add_argument("--prompts", type=Path, required=True, help="UTF-8 prompt file, one per line")
    p.add_argument("--models-config", type=Path, default=Path("configs/models/flux_dev.yaml"),
                   help="where the reward models live (configs/models/*.yaml)")
    p.add_argument("--metrics", default=",".join(METRIC_COLUMNS),
                   help="comma-separated: " + ",".join(METRIC_COLUMNS) + ", and your own as extra columns: "
                   "package.module:factory or http (README \"Add a reward\")")
    p.add_argument("--reward-args", default="{}",
                   help="JSON: {metric: {argument: value}} for the extra metrics (a factory's arguments; http: url...)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--base-after-step", type=int, default=None,
                   help="MixGRPO's hybrid sampling: the trained model for the first K steps, the base for the rest")
    p.add_argument("--score-batch-size", type=int, default=8, help="images per reward call")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--guidance", type=float, default=None, help="default: the base model's (FLUX 3.5, SD3 CFG 4.5)")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="delete the images, scores and summary already in --out before generating")
    args = p.parse_args(argv)
    from g2rpo.checkpoint import resolve_best

    args.transformer, args.lora = resolve_best(args.transformer), resolve_best(args.lora, "lora")  # <run>/best
    if args.base_after_step is not None and (args.base_after_step < 0 or (args.transformer is None) == (args.lora is None)):
        p.error(f"--base-after-step {args.base_after_step}: needs K >= 0 and exactly one of --transformer, --lora")
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:
        reward_args = json.loads(args.reward_args)
    except ValueError as exc:
        p.error(f"--reward-args {args.reward_args!r}: not JSON ({exc})")
    if not isinstance(reward_args, dict) or not all(isinstance(v, dict) for v in reward_args.values()):
        p.error(f"--reward-args {args.reward_args!r}: expected a JSON object of objects, {{metric: {{arg: value}}}}")
    unknown = [m for m in args.metrics if m not in METRIC_COLUMNS and not (":" in m or m == "http")]
    if unknown or not args.metrics:
        p.error(f"--metrics {unknown or '(empty)'}: choose from {', '.join(METRIC_COLUMNS)}, or name your own "
                f"(package.module:factory, http)")
    from g2rpo.reward_plugins import resolve

    args.extra = {}  # label -> RewardEntry of the metrics outside the registry: extra columns
    for metric in [m for m in args.metrics if m not in METRIC_COLUMNS]:
        try:
            entry = resolve(metric, reward_args.get(metric))
        except ValueError as exc:
            p.error(f"--metrics {metric}: {exc}")
        if entry.name in METRIC_COLUMNS or entry.name in args.extra:
            p.error(f"--metrics {metric}: its name {entry.name!r} is taken; give the factory another name")
        args.extra[entry.name] = entry
    stray = sorted(set(reward_args) - set(args.metrics))
    args.metrics = [m for m in args.metrics if m in METRIC_COLUMNS] + list(args.extra)
    if stray:
        p.error(f"--reward-args {stray}: not among --metrics")
    if args.score_batch_size < 1:
        p.error(f"--score-batch-size {args.score_batch_size}: expected >= 1")
    return args


def summarize(records: list[dict], metrics: list[str]) -> list[dict]:
    """Per metric, in the paper's column order: mean, sample std and n over the records that have a score, and
    how many do not (``unscored``: a judge's answer without a score is NaN, left out as the reference does)."""
    rows = []
    extra = [m for m in metrics if m not in METRIC_COLUMNS]  # your own rewards: columns after the paper's, by name
    for name in [*(m for m in METRIC_COLUMNS if m in metrics), *extra]:
        values = np.array([r[name] for r in records], dtype=np.float64)  # null -> NaN
        scored = values[np.isfinite(values)]
        mean = float(scored.mean()) if len(scored) else float("nan")
        std = float(scored.std(ddof=1)) if len(scored) > 1 else float("nan")
        rows.append({"metric": METRIC_COLUMNS.get(name, name), "mean": mean, "std": std, "n": len(scored),
                     "unscored": len(values) - len(scored)})
    return rows


@dataclasses.dataclass(frozen=True)
class PaperTable:
    """A paper's result table in its own units: ``columns`` are ``(header, our metric or None, factor from our score
    to the paper's unit)`` (None: a benchmark we do not compute, printed "not computed")."""

    caption: str
    columns: tuple[tuple[str, str | None, float], ...]
    rows: dict[str, tuple[float, ...]]


def _g2rpo_columns():
    return tuple((METRIC_COLUMNS[m], m, REWARDS[m].paper_scale) for m in METRIC_COLUMNS)


# Each base-model family names the paper that benchmarks it (``ModelFamily.paper_table``).
PAPER_TABLES = {
    # G²RPO's table: HPDv2's 400 test prompts, FLUX.1-dev (PickScore / 100 as the paper prints it).
    "g2rpo": PaperTable("the G²RPO paper's table (HPDv2's test prompts, FLUX.1-dev; PickScore / 100 as the paper "
                        "prints it)", _g2rpo_columns(), {
                            "FLUX.1-dev": (0.305, 0.388, 0.226, 1.040, 3.621),
                            "DanceGRPO (HPS)": (0.353, 0.375, 0.228, 1.233, 3.548),
                            "MixGRPO (HPS)": (0.378, 0.358, 0.225, 1.266, 3.421),
                            "G²RPO (HPS)": (0.385, 0.355, 0.229, 1.313, 3.487),
                            "DanceGRPO (HPS + CLIP)": (0.331, 0.389, 0.227, 1.128, 3.569),
                            "MixGRPO (HPS + CLIP)": (0.363, 0.399, 0.230, 1.436, 3.661),
                            "G²RPO (HPS + CLIP)": (0.376, 0.406, 0.235, 1.483, 3.783)}),
    # DenseGRPO's table: SD3.5-Medium, each column its own task's test set (PickScore as logit_scale·cos).
    "densegrpo": PaperTable("the DenseGRPO paper's table (SD3.5-Medium; each column a model trained on that task)", (
        ("GenEval", None, 1.0), ("OCR", None, 1.0), ("PickScore", "pickscore", 1.0)), {
            "SD3.5-M": (0.63, 0.59, 21.72),
            "Flow-GRPO": (0.95, 0.92, 23.31),
            "DenseGRPO": (0.97, 0.95, 24.64)}),
}
PAPER_COLUMNS = tuple(c[0] for c in PAPER_TABLES["g2rpo"].columns)
PAPER_ROWS = PAPER_TABLES["g2rpo"].rows


def paper_comparison_markdown(rows: list[dict], label: str = "this evaluation", table: str = "g2rpo") -> str:
    """The paper's rows and ours below them, in the paper's columns and units; a metric we did not compute is "–",
    a benchmark we cannot compute "not computed"."""
    paper = PAPER_TABLES[table]
    ours = {}
    for row in rows:
        name = next((n for n, column in METRIC_COLUMNS.items() if column == row["metric"]), None)
        if name is not None and row["n"]:  # an extra column of your own reward has no paper value
            ours[name] = row["mean"]
    lines = ["| | " + " | ".join(c[0] for c in paper.columns) + " |", "|---|" + "---|" * len(paper.columns)]
    lines += [f"| {method} (paper) | " + " | ".join(f"{v:.3f}" for v in values) + " |"
              for method, values in paper.rows.items()]
    cells = ["not computed" if metric is None else f"{ours[metric] * scale:.3f}" if metric in ours else "–"
             for _, metric, scale in paper.columns]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(row: dict) -> str:
    count = f"n={row['n']}" + (f", {row['unscored']} unscored" if row.get("unscored") else "")
    if not row["n"]:
        return f"– ({count})"
    return (f"{row['mean']:.4f} ± {row['std']:.4f} ({count})" if not math.isnan(row["std"])
            else f"{row['mean']:.4f} ({count})")


def summary_markdown(rows: list[dict]) -> str:
    header = "| " + " | ".join(r["metric"] for r in rows) + " |"
    rule = "|" + "---|" * len(rows)
    return "\n".join([header, rule, "| " + " | ".join(_cell(r) for r in rows) + " |"]) + "\n"


def summary_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["metric", "mean", "std", "n", "unscored"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _load_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)[None]


def image_fingerprint(args, prompts: list[str]) -> dict:
    """What the images of an evaluation are made from; the reward models are not part of it (scores
    are always recomputed from the PNGs). Cheap: model folders are named by `weights_identity`."""
    from g2rpo.fingerprint import digest, weights_identity

    # {"kind": "base"} rather than a bare string, so that a change reads "transformer.kind: was base, now ..."
    transformer = weights_identity(args.transformer) if args.transformer is not None else {"kind": "base"}
    identity = {
        "base": weights_identity(args.base),
        "transformer": transformer,
        "sampling": {"steps": args.steps, "guidance": args.guidance, "height": args.height, "width": args.width,
                     "seed": args.seed, "dtype": args.dtype},
        "prompts": {"count": len(prompts), "sha256": digest(prompts)},
    }
    if args.lora is not None:  # only then, so that the fingerprints of evaluations without one stay valid
        identity["lora"] = weights_identity(args.lora)
    if args.base_after_step is not None:  # likewise
        identity["sampling"]["base_after_step"] = args.base_after_step
    return identity


def clear_outputs(out: Path) -> None:
    """Delete what an earlier evaluation wrote into ``out`` (and nothing else that may live there)."""
    shutil.rmtree(out / "images", ignore_errors=True)
    for path in [*(out / name for name in OUTPUT_FILES), *out.glob(".scores.rank*.jsonl")]:
        path.unlink(missing_ok=True)


def prepare_out(args, prompts: list[str]) -> str | None:
    """Rank 0, before any rank generates: verify the transformer export, then make ``--out`` hold only
    images made from this run's inputs (reuse on an exact fingerprint match, clear with --overwrite)
    and record the fingerprint. Returns the verification note; raises `EvaluationError`."""
    from g2rpo.checkpoint import verify_export
    from g2rpo.fingerprint import StaleOutputsError, check_reuse, write_fingerprint

    try:
        if not (args.base / "model_index.json").is_file():
            raise FileNotFoundError(f"--base {args.base}: no model_index.json; expected a diffusers pipeline "
                                    f"folder (e.g. ckpt/flux)")
        notes = [verify_export(folder) for folder in (args.transformer, args.lora) if folder is not None]
        note = "\n".join(notes) or None
        expected = image_fingerprint(args, prompts)
        if args.overwrite:
            clear_outputs(args.out)
        images = args.out / "images"
        if any(images.glob("*.png")):
            check_reuse(args.out, expected, "evaluation images", "--overwrite (OVERWRITE=1 for run_eval.sh)",
                        has_outputs=True)
        images.mkdir(parents=True, exist_ok=True)
        write_fingerprint(args.out, expected)  # before the first image, so an interrupted run resumes
    except (OSError, ValueError, StaleOutputsError) as exc:
        raise EvaluationError(str(exc)) from None
    return note


def _prepare_all_ranks(args, prompts: list[str], info) -> None:
    """`prepare_out` on rank 0; an error there is raised on every rank (`g2rpo.distributed.agreed`), so all
    go on or all stop (no rank hangs)."""
    from g2rpo.distributed import agreed

    note = agreed(lambda: prepare_out(args, prompts) if info.is_main else None)
    if note:
        print(note, flush=True)


def main(argv=None) -> None:
    """The CLI: `evaluate`, then leave through `g2rpo.distributed.teardown`. A refusal (`EvaluationError`, rank 0's;
    the other ranks get `RankFailure` and leave quietly) ends the process through `g2rpo.cli.run_main`."""
    from g2rpo.distributed import teardown

    evaluate(argv)
    teardown(0)


def evaluate(argv=None) -> None:
    """Generate what ``--out`` lacks, score every image, write the tables. Collective under torchrun; in a plain
    process, one rank. Raises `EvaluationError` (rank 0) / `RankFailure` (the others) where the run is refused."""
    from g2rpo.config import ModelsConfig, load_config
    from g2rpo.data import read_prompt_file
    from g2rpo.distributed import barrier, init_distributed, print0
    from g2rpo.models import family_of, resolve_dtype
    from g2rpo.reward_registry import build_reward

    args = parse_args(argv)
    try:
        family = family_of(args.base)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"--base {args.base}: {exc}") from None
    if args.guidance is None:
        args.guidance = family.default_guidance
    prompts = read_prompt_file(args.prompts)[: args.limit]
    models = load_config(ModelsConfig, args.models_config)
    missing = missing_inputs([m for m in args.metrics if m in METRIC_COLUMNS], models)
    servers = [problem for problem in (entry.check() for entry in args.extra.values()) if problem]
    if servers:
        from g2rpo.http_reward import RewardServerError

        raise RewardServerError(servers[0])
    if missing:  # before any image is generated
        raise FileNotFoundError(f"{args.models_config}: not found: {'; '.join(missing)}; download them (README \"Real "
                                f"models\"), point the models config at them, or leave those metrics out (--metrics)")
    info = init_distributed(args.device)
    _prepare_all_ranks(args, prompts, info)
    images_dir = args.out / "images"
    mine = list(range(info.rank, len(prompts), info.world_size))
    todo = [i for i in mine if not (images_dir / f"{i:05d}.png").is_file()]
    print(f"rank {info.rank}: {len(mine)} prompts, {len(todo)} to generate", flush=True)

    if todo:
        pipe = family.load_pipeline(args.base, resolve_dtype(args.dtype), transformer_path=args.transformer,
                                    lora_path=args.lora)
        pipe = pipe.to(info.device)
        pipe.set_progress_bar_config(disable=True)
        from g2rpo.hybrid import hybrid
        from g2rpo.models import load_transformer

        base = (load_transformer(args.base, resolve_dtype(args.dtype), subfolder="transformer").to(info.device).eval()
                if args.base_after_step is not None and args.transformer is not None else None)
        for i in todo:
            generator = torch.Generator(info.device).manual_seed(args.seed + i)
            with hybrid(pipe, args.base_after_step, base) as switch:
                image = pipe(prompts[i], height=args.height, width=args.width, num_inference_steps=args.steps,
                             generator=generator, **family.pipeline_kwargs(args.guidance), **switch).images[0]
            write_png(images_dir / f"{i:05d}.png", image)
        del pipe

    rewards = {name: args.extra[name].build(models, info.device) if name in args.extra else
               build_reward(name, models, info.device) for name in args.metrics}
    records = []
    for start in range(0, len(mine), args.score_batch_size):
        chunk = mine[start:start + args.score_batch_size]
        images = torch.cat([_load_png(images_dir / f"{i:05d}.png") for i in chunk])
        scores = {name: reward.score(images, [prompts[i] for i in chunk]).tolist() for name, reward in rewards.items()}
        records += [{"index": i, "prompt": prompts[i], "image": f"images/{i:05d}.png",  # no score (NaN): null
                     **{name: None if math.isnan(values[k]) else values[k] for name, values in scores.items()}}
                    for k, i in enumerate(chunk)]
    atomic_write_text(args.out / f".scores.rank{info.rank}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    barrier()

    if info.is_main:
        parts = [args.out / f".scores.rank{r}.jsonl" for r in range(info.world_size)]
        merged = sorted((json.loads(line) for part in parts for line in part.read_text().splitlines()),
                        key=lambda r: r["index"])
        atomic_write_text(args.out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in merged))
        rows = summarize(merged, args.metrics)
        paper = PAPER_TABLES[family.paper_table]
        summary = (summary_markdown(rows) + f"\nBeside {paper.caption}:\n\n"
                   + paper_comparison_markdown(rows, f"this evaluation ({args.out.name})", family.paper_table))
        atomic_write_text(args.out / "summary.md", summary)
        atomic_write_text(args.out / "summary.csv", summary_csv(rows))
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "extra"}
        atomic_write_text(args.out / "settings.json", json.dumps({**settings, "world_size": info.world_size,
                                                                   "num_prompts": len(prompts)}, indent=2) + "\n")
        write_png_grid(args.out / "grid.png", torch.cat([_load_png(args.out / r["image"]) for r in merged[:16]]))
        for part in parts:
            part.unlink()
        print0(f"\n{args.out}: {len(merged)} images\n\n{summary}")


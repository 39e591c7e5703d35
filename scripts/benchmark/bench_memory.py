"""Peak memory per rank and phase of a training step at FLUX.1-dev's true widths, scaled to its 19 + 38 blocks.

    torchrun --nproc_per_node=2 scripts/benchmark/bench_memory.py --double 1 --single 1 --json outputs/bench_memory/d1s1.json
    torchrun --nproc_per_node=2 scripts/benchmark/bench_memory.py --double 2 --single 1 --json outputs/bench_memory/d2s1.json
    torchrun --nproc_per_node=2 scripts/benchmark/bench_memory.py --double 1 --single 2 --json outputs/bench_memory/d1s2.json
    python scripts/benchmark/bench_memory.py --scale outputs/bench_memory/d1s1.json outputs/bench_memory/d2s1.json \
        outputs/bench_memory/d1s2.json
    torchrun --nproc_per_node=8 scripts/benchmark/bench_memory.py --device cuda --height 720 --text-tokens 512 ...
    torchrun --nproc_per_node=1 scripts/benchmark/bench_memory.py --device cuda --double 19 --single 38 \
        --config configs/g2rpo_hps_clip_1gpu_lora.yaml --height 720 --text-tokens 512 --group-size 12 \
        --num-steps 16 --warmup-steps 0 --json lora.json     # one step of the 1-GPU LoRA recipe at true size

Builds (once) a FLUX pipeline at FLUX.1-dev's true widths with ``--double`` + ``--single`` blocks
(``g2rpo.tiny.prepare_reduced_flux``: bf16 on disk, the real VAE) and random T5 / CLIP embeddings of
the true widths, then runs the real `Trainer` (FSDP2, bf16, gathered rollout weights; the tiny reward
models unless ``--models-config`` names others) and records, on every rank, the peak host RSS (and on
CUDA the peak device memory) of each phase: wrap, load, vae+rewards (start-up), then one whole step
unmeasured so that the optimiser state exists, then the next step's rollout, decode+reward, update
and checkpoint (DCP state + parallel bf16 export). Prints the largest value over ranks per phase.
``--config`` is the training config the overrides apply to (default: the tiny one; its sampling grid is
replaced by ``--num-steps`` / ``--branch-steps``); ``--warmup-steps 0`` measures the first step itself.

``--scale A B C`` reads three runs (1+1, 2+1 and 1+2 blocks, same world and settings): per phase, the
increase per double and per single block, measured and as the memory model predicts it (fp32 shard
+ AdamW = 12 B/param/world, + fp32 gradients 4 B/param/world in the update, + the bf16 gathered
weights 2 B/param during the rollout), and both extrapolated to FLUX.1-dev's 19 + 38 blocks.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STEP_PHASES = ("rollout", "decode+reward", "update", "checkpoint")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=1, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--height", type=int, default=64, help="image side in pixels (the recipe: 720)")
    p.add_argument("--text-tokens", type=int, default=32, help="T5 tokens per prompt (FLUX.1-dev: 512)")
    p.add_argument("--group-size", type=int, default=4, help="N (the recipe: 12)")
    p.add_argument("--num-steps", type=int, default=4, help="T, sampling steps (the recipe: 16)")
    p.add_argument("--branch-steps", type=int, nargs="+", default=[0], help="branching steps (the recipe: 0..7)")
    p.add_argument("--warmup-steps", type=int, default=1, choices=(0, 1),
                   help="whole steps before the measured one (1: the optimiser state exists, as in every later step)")
    p.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"), help="training config the overrides apply to")
    p.add_argument("--models-config", default=str(ROOT / "configs/models/tiny.yaml"),
                   help="reward model locations (default: the tiny ones, built if missing)")
    p.add_argument("--pipeline", default=None, help="reduced pipeline folder (default: ckpt/flux_reduced_d{D}s{S})")
    p.add_argument("--workdir", default=None, help="embeddings and the checkpoint go here (default: a temp folder)")
    p.add_argument("--json", default=None, help="write the per-rank figures here (for --scale)")
    p.add_argument("--scale", nargs=3, metavar=("D1S1", "D2S1", "D1S2"), help="extrapolate three runs' JSON files")
    p.add_argument("--startup-only", action="store_true", help="stop after start-up (wrap, load, vae+rewards), "
                   "e.g. to compare engine.load_strategy=slices|broadcast")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides of the training config")
    return p.parse_args()


def write_embeddings(folder: Path, pipeline: Path, prompts: list[str], tokens: int, seed: int = 0) -> Path:
    """Random conditioning at the transformer's widths (FLUX.1-dev: T5 4096, CLIP 768), as preprocessing writes it."""
    from diffusers import FluxTransformer2DModel

    from g2rpo.data import write_embedding

    config = FluxTransformer2DModel.load_config(pipeline / "transformer")
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i, prompt in enumerate(prompts):
        write_embedding(folder / "embeddings" / f"{i:05d}.safetensors",
                        torch.randn(tokens, config["joint_attention_dim"], generator=g).to(torch.bfloat16),
                        torch.randn(config["pooled_projection_dim"], generator=g).to(torch.bfloat16),
                        torch.zeros(tokens, 3, dtype=torch.bfloat16), caption=prompt)
        lines.append(json.dumps({"index": i, "caption": prompt, "file": f"embeddings/{i:05d}.safetensors"}))
    (folder / "index.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "index.jsonl"


def measure(args) -> None:
    from g2rpo.config import ModelsConfig, TrainConfig, load_config, to_dict
    from g2rpo.data import read_prompt_file
    from g2rpo.distributed import all_gather_object, barrier, broadcast_object, init_distributed, print0, teardown
    from g2rpo.memory import PhaseMeter
    from g2rpo.tiny import prepare_reduced_flux, prepare_tiny_checkpoints
    from g2rpo.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = init_distributed(args.device)
    prompts = read_prompt_file(ROOT / "data/example_prompts.txt")
    pipeline = Path(args.pipeline or ROOT / f"ckpt/flux_reduced_d{args.double}s{args.single}")
    workdir = Path(broadcast_object(args.workdir or tempfile.mkdtemp(prefix="bench_memory_")))
    models = load_config(ModelsConfig, args.models_config)
    if info.is_main:
        prepare_reduced_flux(pipeline, prompts, args.double, args.single)
        if models.hps.checkpoint.startswith("ckpt/tiny/"):
            prepare_tiny_checkpoints(ROOT / "ckpt/tiny", prompts)
        write_embeddings(workdir / "embeddings", pipeline, prompts[:8], args.text_tokens)
    barrier()
    def local(value):  # a ckpt/ path of the models config, under this checkout; anything else as YAML reads it
        if isinstance(value, str):
            return ROOT / value if value.startswith("ckpt/") else value
        return "null" if value is None else value

    sections = {name: fields for name, fields in to_dict(models).items() if isinstance(fields, dict)}  # not kind
    overrides = [f"models.{section}.{key}={local(value)}" for section, fields in sections.items()
                 for key, value in fields.items() if key not in ("arch", "dtype")]
    overrides += [f"models.{section}.dtype={fields['dtype']}" for section, fields in sections.items()]
    overrides += [f"models.hps.arch={models.hps.arch}", f"models.base.path={pipeline}",
                  f"data.index={workdir / 'embeddings/index.jsonl'}", f"output_dir={workdir / 'run'}",
                  "overwrite=true", f"engine.device={args.device}", "engine.mixed_precision=bf16", "models.base.dtype=bfloat16",
                  f"sampling.height={args.height}", f"sampling.width={args.height}", f"sampling.num_steps={args.num_steps}",
                  f"sampling.branch_steps=[{','.join(map(str, args.branch_steps))}]",
                  f"sampling.group_size={args.group_size}", "data.holdout=0",
                  "eval_every=0", "sample_every=0", "max_steps=2", *args.overrides]
    cfg = load_config(TrainConfig, args.config, overrides)
    meter = PhaseMeter(info.device)
    trainer = Trainer(cfg, info, meter)
    if not args.startup_only:
        step = args.warmup_steps
        if step:
            trainer.train_step(0)  # optimiser state exists from here on, as in every later step
            meter.mark("first step")
        groups = trainer.rollout(step)
        meter.mark("rollout")
        trainer.score(groups)
        meter.mark("decode+reward")
        trainer.update(groups, trainer.advantages(groups))
        meter.mark("update")
        trainer.save_checkpoint(step)
        meter.mark("checkpoint")
    ranks = all_gather_object(meter.phases)
    if info.is_main:
        params = sum(trainer.engine.param_sizes().values())
        result = {"double": args.double, "single": args.single, "world_size": info.world_size,
                  "device": info.device.type, "params": params, "height": args.height,
                  "text_tokens": args.text_tokens, "group_size": args.group_size, "num_steps": args.num_steps,
                  "branch_steps": args.branch_steps, "warmup_steps": args.warmup_steps,
                  "config": str(args.config), "lora_rank": cfg.lora.rank,
                  "load_strategy": cfg.engine.load_strategy, "ranks": ranks}
        print_table(result)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
            print0(f"wrote {args.json}")
    teardown(0)


def worst(result: dict, phase: str, key: str) -> float:
    return max(rank[phase].get(key, 0.0) for rank in result["ranks"])


def print_table(result: dict) -> None:
    cuda = result["device"] == "cuda"
    print(f"\n{result['world_size']} x {result['device']}, FLUX true widths with {result['double']} double + "
          f"{result['single']} single blocks ({result['params'] / 1e9:.3f} B parameters, fp32 "
          f"{result['params'] * 4 / 1e9:.2f} GB), {result['height']}^2 px, {result['text_tokens']} text tokens, "
          f"N = {result['group_size']}, load_strategy {result.get('load_strategy', 'slices')}; largest value over "
          f"ranks, GB = 1e9 bytes\n")
    columns = ["host RSS before", "host peak", "host peak increase"] + (["GPU peak", "GPU after"] if cuda else []) + ["s"]
    keys = ["rss_before_gb", "peak_rss_gb", "peak_rss_increase_gb"] + (["peak_cuda_gb", "cuda_after_gb"] if cuda else []) \
        + ["seconds"]
    print("| phase | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    for phase in result["ranks"][0]:
        print(f"| {phase} | " + " | ".join(f"{worst(result, phase, k):.2f}" for k in keys) + " |")


def predicted_bytes_per_param(phase: str, world: int) -> float:
    """The memory model's bytes per transformer parameter and rank, held at the peak of ``phase`` (FSDP2, bf16)."""
    persistent = 12 / world  # fp32 shard + two fp32 AdamW moments
    return {"rollout": persistent + 2, "decode+reward": persistent, "update": persistent + 4 / world,
            "checkpoint": persistent + 2 / world}[phase]  # checkpoint: + this rank's bf16 export shard


def scale(runs: list[dict], full_params: int) -> dict[str, dict[str, float]]:
    """Per step phase: the measured and modelled increase per double / single block, and both extrapolated to
    19 + 38 blocks (``full_params``). ``runs``: the 1+1, 2+1 and 1+2 block results, same world and settings."""
    base, double, single = runs
    if [(r["double"], r["single"]) for r in runs] != [(1, 1), (2, 1), (1, 2)]:
        raise SystemExit("--scale expects runs with 1+1, 2+1 and 1+2 blocks, in that order")
    world, key = base["world_size"], "peak_cuda_gb" if base["device"] == "cuda" else "peak_rss_gb"
    p_double, p_single = double["params"] - base["params"], single["params"] - base["params"]
    rows = {}
    for phase in STEP_PHASES:
        m_double = worst(double, phase, key) - worst(base, phase, key)
        m_single = worst(single, phase, key) - worst(base, phase, key)
        rate = predicted_bytes_per_param(phase, world) / 1e9
        rows[phase] = {"double": m_double, "double_model": rate * p_double, "single": m_single,
                       "single_model": rate * p_single,
                       "full": worst(base, phase, key) + 18 * m_double + 37 * m_single,
                       "full_model": worst(base, phase, key) + rate * (full_params - base["params"])}
    return rows


def print_scaled(paths: list[str]) -> None:
    from g2rpo.tiny import reduced_flux_config

    runs = [json.loads(Path(p).read_text()) for p in paths]
    full = sum(p.numel() for p in _meta_flux(reduced_flux_config(19, 38)).parameters())
    where = "GPU" if runs[0]["device"] == "cuda" else "host"
    print(f"\n{where} memory per rank, {runs[0]['world_size']} ranks: measured increase per block vs the memory "
          f"model; extrapolated to 19 + 38 blocks ({full / 1e9:.2f} B parameters). GB = 1e9 bytes.\n")
    print("| phase | per double block: measured / model | per single block: measured / model | "
          "19 + 38 blocks: measured / model |\n|---|---|---|---|")
    for phase, r in scale(runs, full).items():
        print(f"| {phase} | {r['double']:.2f} / {r['double_model']:.2f} | {r['single']:.2f} / {r['single_model']:.2f} "
              f"| {r['full']:.1f} / {r['full_model']:.1f} |")


def _meta_flux(config: dict):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def main():
    args = parse_args()
    if args.scale:
        print_scaled(args.scale)
    else:
        measure(args)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

"""Generate images with a base-model pipeline folder (FLUX, SD3), optionally with a trained transformer swapped in.

    python scripts/inference/infer.py --base ckpt/flux --transformer outputs/run/checkpoint-300/transformer \
        --prompt-file data/example_prompts.txt --limit 8 --out outputs/samples
    python scripts/inference/infer.py --base ckpt/flux --lora outputs/run_lora/checkpoint-300/lora --prompt "a fox"
    python scripts/inference/infer.py --base ckpt/tiny/flux --prompt "a red fox in snow" \
        --height 64 --width 64 --dtype float32 --out outputs/tiny/inference

Writes ``00000.png, 00001.png, ...`` (named by prompt index), ``settings.json`` and ``fingerprint.json`` (what the
images were made from: base, transformer / LoRA, prompts, sampling settings) into --out. An --out that holds
images made otherwise is refused, naming what changed (use a new --out, or --overwrite to delete its images
first), so a folder never mixes two runs' images.
Prompt i is sampled with seed ``--seed + i``, so an image does not depend on which other prompts
were generated with it. Files are written atomically; nothing is downloaded. A --transformer is
checked first (`g2rpo.checkpoint.verify_export`): a checkpoint export must match its COMMITTED
manifest, and one from a checkpoint that was never committed is refused.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from g2rpo.checkpoint import verify_export
from g2rpo.data import read_prompt_file
from g2rpo.fingerprint import FINGERPRINT, check_reuse, digest, weights_identity, write_fingerprint
from g2rpo.hybrid import hybrid
from g2rpo.io import atomic_write_text, write_png
from g2rpo.models import family_of, resolve_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=Path("ckpt/flux"), help="diffusers pipeline folder (FLUX, SD3)")
    p.add_argument("--transformer", type=Path, default=None, help="trained transformer folder (config.json + safetensors), or <output_dir>/best "
                   "(the checkpoint eval.best_by chose)")
    p.add_argument("--lora", type=Path, default=None, help="trained LoRA folder (a checkpoint's lora/ or lora_ema/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompt-file", type=Path, help="UTF-8 file, one prompt per line")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--base-after-step", type=int, default=None,
                   help="MixGRPO's hybrid sampling: the trained model for the first K steps, the base for the rest "
                        "(with --lora: the adapters off; with --transformer: the base's transformer beside it)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="FLUX: the distilled guidance scale (default 3.5); SD3: the CFG scale (default 4.5)")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=Path("outputs/inference"), help="output folder")
    p.add_argument("--overwrite", action="store_true", help="delete the images an earlier run left in --out first")
    args = p.parse_args(argv)
    from g2rpo.checkpoint import resolve_best

    args.transformer, args.lora = resolve_best(args.transformer), resolve_best(args.lora, "lora")  # <run>/best
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    if args.base_after_step is not None and (args.base_after_step < 0 or (args.transformer is None) == (args.lora is None)):
        p.error(f"--base-after-step {args.base_after_step}: needs K >= 0 and exactly one of --transformer, --lora "
                f"(the trained model to switch from)")
    if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
        p.error(f"--height/--width {args.height}x{args.width}: must be positive multiples of 16 (VAE x8, 2x2 packing)")
    return args


def check_transformer(folder: Path | None) -> None:
    """Verify ``--transformer`` / ``--lora`` before loading it and print what was checked; a bad export is refused
    (`g2rpo.checkpoint.verify_export` names the file; the CLI prints that one line and exits 2)."""
    if folder is None:
        return
    print(verify_export(folder), flush=True)


OUTPUTS = ("settings.json", FINGERPRINT)  # besides the PNGs, what a run writes into --out (what --overwrite deletes)


def claim_out(args, prompts: list[str]) -> None:
    """Refuse an --out holding images made from other inputs than now (or delete them with --overwrite), then record
    this run's fingerprint before the first image is written."""
    expected = {"base": weights_identity(args.base), "prompts": digest(prompts),
                "transformer": weights_identity(args.transformer) if args.transformer else None,
                "lora": weights_identity(args.lora) if args.lora else None,
                "sampling": {"steps": args.steps, "guidance": args.guidance, "height": args.height,
                             "width": args.width, "seed": args.seed, "dtype": args.dtype}}
    if args.base_after_step is not None:  # only then, so that the fingerprints of plain runs stay valid
        expected["sampling"]["base_after_step"] = args.base_after_step
    earlier = sorted(args.out.glob("*.png")) + [args.out / name for name in OUTPUTS if (args.out / name).is_file()]
    if args.overwrite:
        for path in earlier:
            path.unlink()
        if earlier:
            print(f"--overwrite: deleted {len(earlier)} file(s) of an earlier run in {args.out}")
    else:
        check_reuse(args.out, expected, "images", "--overwrite", has_outputs=any(p.suffix == ".png" for p in earlier))
    args.out.mkdir(parents=True, exist_ok=True)
    write_fingerprint(args.out, expected)


def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = args.prompt if args.prompt else read_prompt_file(args.prompt_file)
    prompts = prompts[: args.limit] if args.limit is not None else prompts
    check_transformer(args.transformer)
    check_transformer(args.lora)
    family = family_of(args.base)
    if args.guidance is None:
        args.guidance = family.default_guidance
    claim_out(args, prompts)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = family.load_pipeline(args.base, resolve_dtype(args.dtype), transformer_path=args.transformer,
                                lora_path=args.lora).to(device)
    pipe.set_progress_bar_config(disable=True)
    base = None
    if args.base_after_step is not None and args.transformer is not None:
        from g2rpo.models import load_transformer

        base = load_transformer(args.base, resolve_dtype(args.dtype), subfolder="transformer").to(device).eval()

    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device).manual_seed(args.seed + index)
        with hybrid(pipe, args.base_after_step, base) as switch:
            image = pipe(prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
                         generator=generator, **family.pipeline_kwargs(args.guidance), **switch).images[0]
        write_png(args.out / f"{index:05d}.png", image)
        print(f"[{index + 1}/{len(prompts)}] {args.out / f'{index:05d}.png'}  {prompt[:70]}")

    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    settings.update(prompts=prompts, device=str(device), seconds=round(time.perf_counter() - start, 3))
    atomic_write_text(args.out / "settings.json", json.dumps(settings, indent=2) + "\n")
    print(f"wrote {len(prompts)} image(s) and settings.json to {args.out}")


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

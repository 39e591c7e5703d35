"""Build the tiny, randomly initialised FLUX pipeline and reward models used by the tests and the demo.

    python scripts/prepare_tiny_checkpoints.py                 # writes ckpt/tiny/{flux,sd3,hps,clip_score,pickscore,imagereward,unifiedreward}
    python scripts/prepare_tiny_checkpoints.py --force --out /tmp/tiny --seed 1
    python scripts/prepare_tiny_checkpoints.py --only flux hps clip_score    # what training needs

Offline, seeded and deterministic (same seed -> byte-identical weights), ~32 MB, a few seconds on a
CPU. Parts that already exist are kept unless --force. The folders use the real formats, so
configs/models/tiny.yaml points the production loaders at them. See g2rpo/tiny.py.
"""

import argparse
from pathlib import Path

from g2rpo.data import read_prompt_file
from g2rpo.tiny import TINY_PARTS, prepare_tiny_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "ckpt" / "tiny", help="output folder")
    parser.add_argument("--prompts", type=Path, default=ROOT / "data" / "example_prompts.txt",
                        help="prompt file the tiny T5 tokenizer is trained on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild parts that already exist")
    parser.add_argument("--only", nargs="+", choices=TINY_PARTS, help="build just these parts (default: all)")
    args = parser.parse_args()
    written = prepare_tiny_checkpoints(args.out, read_prompt_file(args.prompts), seed=args.seed, force=args.force,
                                       only=tuple(args.only) if args.only else None)
    for name, path in written.items():
        print(f"{name:>10}: {path}")


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

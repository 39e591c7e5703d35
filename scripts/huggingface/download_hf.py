"""Download model weights (and the HPDv2 benchmark prompts) from the Hugging Face Hub into ckpt/ and data/.

    python scripts/huggingface/download_hf.py --all                        # every model README.md lists
    python scripts/huggingface/download_hf.py --repo_id xswu/HPSv2 --local_dir ckpt/hps --filename HPS_v2.1_compressed.pt
    python scripts/huggingface/download_hf.py --hpdv2-prompts data/hpdv2_test_prompts.txt

Needs network (and, for FLUX.1-dev, an accepted licence plus `huggingface-cli login`). This is the
only part of g2rpo that goes online, and only when you run it.
"""

import argparse
from pathlib import Path

# repo id -> (local folder, files to fetch or None for the whole repository)
MODELS = {
    "black-forest-labs/FLUX.1-dev": ("ckpt/flux", None),
    "xswu/HPSv2": ("ckpt/hps", ["HPS_v2.1_compressed.pt"]),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ("ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K", None),
    "apple/DFN5B-CLIP-ViT-H-14": ("ckpt/clip_score", None),
    "yuvalkirstain/PickScore_v1": ("ckpt/pickscore", None),
}
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def download(repo_id: str, local_dir: str, filenames: list[str] | None) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    if filenames:
        for name in filenames:
            print(hf_hub_download(repo_id, name, local_dir=local_dir))
    else:
        print(snapshot_download(repo_id, local_dir=local_dir))


def write_hpdv2_prompts(path: Path, per_style: int) -> None:
    """The HPDv2 benchmark prompts via hpsv2 (first `per_style` of each style; 4 x 100 = 400 by default)."""
    import hpsv2

    from g2rpo.io import atomic_write_text

    prompts = hpsv2.benchmark_prompts("all")
    lines = [p.replace("\n", " ").strip() for style in HPDV2_STYLES for p in prompts[style][:per_style]]
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", help="a Hub repository, e.g. xswu/HPSv2")
    parser.add_argument("--local_dir", help="where to put it (default: the folder README.md names)")
    parser.add_argument("--filename", action="append", help="fetch only these files (repeatable)")
    parser.add_argument("--all", action="store_true", help="fetch every model in the README's table")
    parser.add_argument("--hpdv2-prompts", type=Path, help="write the HPDv2 benchmark prompts to this file")
    parser.add_argument("--per-style", type=int, default=100, help="prompts per HPDv2 style (default 100 -> 400)")
    args = parser.parse_args()
    if not (args.repo_id or args.all or args.hpdv2_prompts):
        parser.error("give --repo_id, --all or --hpdv2-prompts")
    if args.repo_id:
        folder, files = MODELS.get(args.repo_id, (None, None))
        if not (args.local_dir or folder):
            parser.error(f"--local_dir is needed for {args.repo_id} (not one of {', '.join(MODELS)})")
        download(args.repo_id, args.local_dir or folder, args.filename or files)
    if args.all:
        for repo_id, (folder, files) in MODELS.items():
            download(repo_id, folder, files)
    if args.hpdv2_prompts:
        write_hpdv2_prompts(args.hpdv2_prompts, args.per_style)


if __name__ == "__main__":
    main()

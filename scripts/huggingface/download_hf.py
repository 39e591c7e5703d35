"""Download model weights (and the HPDv2 benchmark prompts) from the Hugging Face Hub into ckpt/ and data/.

    python scripts/huggingface/download_hf.py --all                        # every model README.md lists
    python scripts/huggingface/download_hf.py --repo_id xswu/HPSv2 --local_dir ckpt/hps --filename HPS_v2.1_compressed.pt
    python scripts/huggingface/download_hf.py --hpdv2-prompts data/hpdv2_test_prompts.txt
    python scripts/huggingface/download_hf.py --hpdv2-train-prompts data/prompts.txt   # what training encodes

Needs network (and, for FLUX.1-dev, an accepted licence plus `hf auth login`). This is the only part
of g2rpo that goes online, and only when you run it. Only the files g2rpo reads are fetched: FLUX.1-dev
without its original-format copies at the repository root (flux1-dev.safetensors, ae.safetensors:
24 GB), and from the laion ViT-H-14 repository only the configs and tokenizer files PickScore's
processor uses (HPS-v2.1's checkpoint holds every weight, so the 3.9 GB base weights are not needed).
"""

import argparse
from pathlib import Path

# repo id -> (local folder, files to fetch (glob patterns) or None for everything, patterns to skip)
MODELS = {
    "black-forest-labs/FLUX.1-dev": ("ckpt/flux", None, ["flux1-dev.safetensors", "ae.safetensors"]),
    "stabilityai/stable-diffusion-3.5-medium": ("ckpt/sd35m", None, ["sd3.5_medium.safetensors", "text_encoders/*"]),
    "xswu/HPSv2": ("ckpt/hps", ["HPS_v2.1_compressed.pt"], None),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ("ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K", ["*.json", "*.txt"], None),
    "apple/DFN5B-CLIP-ViT-H-14": ("ckpt/clip_score", None, None),
    "yuvalkirstain/PickScore_v1": ("ckpt/pickscore", None, None),
    "THUDM/ImageReward": ("ckpt/imagereward", ["ImageReward.pt", "med_config.json"], None),
    "google-bert/bert-base-uncased": ("ckpt/bert-base-uncased", ["vocab.txt", "tokenizer_config.json"], None),
    "CodeGoat24/UnifiedReward-qwen-7b": ("ckpt/unifiedreward", None, None),
}
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def download(repo_id: str, local_dir: str, include: list[str] | None, exclude: list[str] | None = None) -> None:
    from huggingface_hub import snapshot_download

    print(snapshot_download(repo_id, local_dir=local_dir, allow_patterns=include, ignore_patterns=exclude))


def write_hpdv2_prompts(path: Path, per_style: int) -> None:
    """The HPDv2 benchmark prompts via hpsv2 (first `per_style` of each style; 4 x 100 = 400 by default)."""
    import hpsv2

    from g2rpo.io import atomic_write_text

    prompts = hpsv2.benchmark_prompts("all")
    lines = [p.replace("\n", " ").strip() for style in HPDV2_STYLES for p in prompts[style][:per_style]]
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} prompts to {path}")


def hpdv2_train_prompts(train_json: Path) -> tuple[list[str], int]:
    """The HPDv2 training prompts from the dataset's ``train.json`` (a list of entries, each with its ``prompt`` and
    the images rated for it): one line per prompt, whitespace collapsed, in the file's order, each once. Returns
    ``(prompts, duplicates dropped)``. DanceGRPO and G2RPO train on these."""
    import json

    try:
        entries = json.loads(train_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{train_json}: not HPDv2's train.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("prompt"), str) for e in entries):
        raise ValueError(f"{train_json}: expected HPDv2's layout, a JSON list of objects with a 'prompt' string")
    lines = [" ".join(e["prompt"].split()) for e in entries]
    unique = list(dict.fromkeys(line for line in lines if line))
    return unique, len(lines) - len(unique)


def write_hpdv2_train_prompts(path: Path, train_json: Path | None) -> None:
    """Fetch ``train.json`` of the ymhao/HPDv2 dataset (unless ``train_json`` names a local copy) and write its
    prompts to ``path``; prints their count and the file's SHA-256 (what preprocessing's fingerprint records)."""
    import hashlib

    from g2rpo.io import atomic_write_text

    if train_json is None:
        from huggingface_hub import hf_hub_download

        train_json = Path(hf_hub_download("ymhao/HPDv2", "train.json", repo_type="dataset"))
    prompts, dropped = hpdv2_train_prompts(train_json)
    atomic_write_text(path, "\n".join(prompts) + "\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"wrote {len(prompts)} HPDv2 training prompts to {path} ({dropped} repeated ones dropped); sha256 {digest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", help="a Hub repository, e.g. xswu/HPSv2")
    parser.add_argument("--local_dir", help="where to put it (default: the folder README.md names)")
    parser.add_argument("--filename", action="append", help="fetch only these files or glob patterns (repeatable)")
    parser.add_argument("--all", action="store_true", help="fetch every model in the README's table")
    parser.add_argument("--hpdv2-prompts", type=Path, help="write the HPDv2 benchmark prompts to this file")
    parser.add_argument("--per-style", type=int, default=100, help="prompts per HPDv2 style (default 100 -> 400)")
    parser.add_argument("--hpdv2-train-prompts", type=Path, help="write the HPDv2 training prompts to this file "
                        "(data/prompts.txt: what the preprocessing launcher encodes by default)")
    parser.add_argument("--hpdv2-train-json", type=Path, help="a local copy of the dataset's train.json (no download)")
    args = parser.parse_args()
    if not (args.repo_id or args.all or args.hpdv2_prompts or args.hpdv2_train_prompts):
        parser.error("give --repo_id, --all, --hpdv2-prompts or --hpdv2-train-prompts")
    if args.repo_id:
        folder, files, skip = MODELS.get(args.repo_id, (None, None, None))
        if not (args.local_dir or folder):
            parser.error(f"--local_dir is needed for {args.repo_id} (not one of {', '.join(MODELS)})")
        download(args.repo_id, args.local_dir or folder, args.filename or files, None if args.filename else skip)
    if args.all:
        for repo_id, (folder, files, skip) in MODELS.items():
            download(repo_id, folder, files, skip)
    if args.hpdv2_prompts:
        write_hpdv2_prompts(args.hpdv2_prompts, args.per_style)
    if args.hpdv2_train_prompts:
        write_hpdv2_train_prompts(args.hpdv2_train_prompts, args.hpdv2_train_json)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

"""Generate images for a prompt set with a (trained) FLUX pipeline and score them with every metric.

    torchrun --nproc_per_node=8 scripts/evaluation/evaluate.py --base ckpt/flux \
        --transformer outputs/g2rpo_hps_clip/checkpoint-300/transformer \
        --prompts data/hpdv2_test_prompts.txt --out outputs/eval/g2rpo

See g2rpo/evaluation.py for the outputs (scores.jsonl, summary.md/.csv, grid.png) and the seed policy.
Images already in --out are reused only if its fingerprint.json matches this run (same base, transformer,
sampling settings and prompts); otherwise the run stops: pick a new --out or pass --overwrite.
"""

from g2rpo.cli import run_main
from g2rpo.evaluation import main

if __name__ == "__main__":
    run_main(main)

#!/usr/bin/env bash
# The main job on the tiny default, on a CPU (2 processes): the whole pipeline, end to end.
#
#   bash env_setup.sh && bash scripts/run_tiny.sh
#
# 1. build the tiny offline checkpoints training needs (ckpt/tiny: the FLUX pipeline, HPS, CLIP score)
# 2. encode data/example_prompts.txt with the tiny text encoders (data/tiny_embeddings; 64 T5 positions
#    instead of FLUX.1-dev's 512: the text tokens would otherwise be 97% of the tiny transformer's sequence)
# 3. train with G2RPO under FSDP on 2 CPU processes (outputs/tiny/train: metrics, reward logs,
#    sample grids, reward curve, diffusers checkpoints)
# 4. sample with the trained transformer (outputs/tiny/inference)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${G2RPO_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || { echo "no environment at $VENV; run: bash env_setup.sh" >&2; exit 1; }
export PATH="$VENV/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

python scripts/prepare_tiny_checkpoints.py --out ckpt/tiny --only flux hps clip_score pickscore imagereward  # the held-out evaluation scores pickscore and imagereward too (out-of-domain); run_eval.sh builds the rest
MODEL=ckpt/tiny/flux PROMPTS=data/example_prompts.txt OUT=data/tiny_embeddings GPUS=2 DTYPE=float32 \
  bash scripts/preprocess/preprocess_flux_rl_embeddings.sh --device cpu --max-sequence-length 64
OVERWRITE=1 bash scripts/finetune/finetune_g2rpo_tiny.sh  # the main job always starts afresh
last="$(ls -d outputs/tiny/train/checkpoint-* | sort -t- -k2 -n | tail -1)"
python scripts/inference/infer.py --base ckpt/tiny/flux --transformer "$last/transformer" \
  --prompt-file data/example_prompts.txt --limit 4 --height 64 --width 64 --steps 16 --dtype float32 \
  --device cpu --out outputs/tiny/inference --overwrite
echo "done: rewards in outputs/tiny/train/{hps,clip}_reward.txt, curve outputs/tiny/train/reward_curve.png," \
     "checkpoint $last, samples outputs/tiny/inference"

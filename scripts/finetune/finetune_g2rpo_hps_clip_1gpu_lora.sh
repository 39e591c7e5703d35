#!/usr/bin/env bash
# G2RPO on FLUX.1-dev: one GPU, HPS-v2.1 + CLIP score, LoRA rank 32 on the attention projections (the bf16 base
# frozen on the GPU, the adapters and their AdamW state in fp32; no host offload).
#
#   bash scripts/finetune/finetune_g2rpo_hps_clip_1gpu_lora.sh
#   DRY_RUN=1 bash scripts/finetune/finetune_g2rpo_hps_clip_1gpu_lora.sh   # print the plan
#
# Config: configs/g2rpo_hps_clip_1gpu_lora.yaml; extra section.field=value arguments override it (e.g. lora.rank=64,
# ema.decay=0.9 ema.update_every=8). Checkpoints export checkpoint-N/lora/, which
# scripts/inference/infer.py --lora and run_eval.sh LORA=... load. Needs ckpt/ and data/rl_embeddings.
set -euo pipefail
export CONFIG="${CONFIG:-configs/g2rpo_hps_clip_1gpu_lora.yaml}" NNODES="${NNODES:-1}" NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

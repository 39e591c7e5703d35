#!/usr/bin/env bash
# G2RPO on FLUX.1-dev: one GPU, HPS-v2.1 + CLIP score, FSDP2 with CPU offload (weights, gradients and AdamW
# states in ~200-220 GB of host memory; the gathered bf16 weights on the GPU during rollouts).
#
#   bash scripts/finetune/finetune_g2rpo_hps_clip_1gpu.sh
#   DRY_RUN=1 bash scripts/finetune/finetune_g2rpo_hps_clip_1gpu.sh   # print the plan
#
# Config: configs/g2rpo_hps_clip_1gpu.yaml (the reference hyper-parameters); extra section.field=value arguments
# override it. Needs ckpt/ (README "Real models") and data/rl_embeddings (preprocess script).
set -euo pipefail
export CONFIG="${CONFIG:-configs/g2rpo_hps_clip_1gpu.yaml}" NNODES="${NNODES:-1}" NPROC_PER_NODE="${NPROC_PER_NODE:-1}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

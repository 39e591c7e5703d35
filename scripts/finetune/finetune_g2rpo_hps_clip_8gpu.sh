#!/usr/bin/env bash
# G2RPO on FLUX.1-dev: one node of 8 GPUs, HPS-v2.1 + CLIP score (half the prompt groups per step of the 16-GPU run).
#
#   NODE_RANK=0 MASTER_ADDR=<node-0 address> bash scripts/finetune/finetune_g2rpo_hps_clip_8gpu.sh   # on every node
#   DRY_RUN=1 bash scripts/finetune/finetune_g2rpo_hps_clip_8gpu.sh                                  # print the plan
#
# Config: configs/g2rpo_hps_clip.yaml (the reference hyper-parameters); extra section.field=value arguments
# override it. Needs ckpt/ (README "Real models") and data/rl_embeddings (preprocess script).
set -euo pipefail
export CONFIG="${CONFIG:-configs/g2rpo_hps_clip.yaml}" NNODES="${NNODES:-1}" NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

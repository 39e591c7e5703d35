#!/usr/bin/env bash
# dancegrpo on FLUX.1-dev, HPS-v2.1: 2 nodes x 8 GPUs (configs/dancegrpo_hps.yaml), or one node of 8 GPUs with
# the 8-GPU config (the same prompt groups per step, two per GPU):
#
#   NODE_RANK=0 MASTER_ADDR=<node-0 address> bash scripts/finetune/finetune_dancegrpo_hps.sh   # on every node
#   NNODES=1 CONFIG=configs/dancegrpo_hps_8gpu.yaml bash scripts/finetune/finetune_dancegrpo_hps.sh  # 8 GPUs
#   DRY_RUN=1 bash scripts/finetune/finetune_dancegrpo_hps.sh                                   # print the plan
set -euo pipefail
export CONFIG="${CONFIG:-configs/dancegrpo_hps.yaml}" NNODES="${NNODES:-2}" NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

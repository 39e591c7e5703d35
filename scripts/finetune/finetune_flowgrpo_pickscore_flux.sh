#!/usr/bin/env bash
# Flow-GRPO's FLUX.1-dev recipe (configs/flowgrpo_pickscore_flux.yaml): one node of 8 GPUs, LoRA rank 32, 48 prompts
# of 24 generations per step at 512x512, PickScore as the reward.
#
#   bash scripts/finetune/finetune_flowgrpo_pickscore_flux.sh
#   DRY_RUN=1 bash scripts/finetune/finetune_flowgrpo_pickscore_flux.sh   # print the plan
#
# Extra section.field=value arguments override the config. Needs ckpt/ (README "Real models") and data/rl_embeddings.
set -euo pipefail
export CONFIG="${CONFIG:-configs/flowgrpo_pickscore_flux.yaml}" NNODES="${NNODES:-1}" NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

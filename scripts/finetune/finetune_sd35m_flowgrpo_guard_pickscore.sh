#!/usr/bin/env bash
# GRPO-Guard (Flow-GRPO's regulated clipping) on SD3.5-Medium with PickScore (configs/sd35m_flowgrpo_guard_pickscore.yaml;
# its header states the recipe and its sources): one node of 8 GPUs, LoRA rank 32, 512x512, classifier-free guidance 4.5.
#
#   bash scripts/finetune/finetune_sd35m_flowgrpo_guard_pickscore.sh
#   DRY_RUN=1 bash scripts/finetune/finetune_sd35m_flowgrpo_guard_pickscore.sh   # print the plan
#
# Extra section.field=value arguments override the config. Needs ckpt/sd35m and the reward models (README "Real
# models") and data/sd35m_embeddings (MODEL=ckpt/sd35m OUT=data/sd35m_embeddings
# bash scripts/preprocess/preprocess_flux_rl_embeddings.sh).
set -euo pipefail
export CONFIG="${CONFIG:-configs/sd35m_flowgrpo_guard_pickscore.yaml}" NNODES="${NNODES:-1}" NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

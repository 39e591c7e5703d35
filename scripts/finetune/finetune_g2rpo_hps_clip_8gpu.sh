#!/usr/bin/env bash
# G2RPO on FLUX.1-dev: one node of 8 GPUs, HPS-v2.1 + CLIP score (half the prompt groups per step of the 16-GPU run),
# into its own folder, outputs/g2rpo_hps_clip_8gpu (the 16-GPU run's is outputs/g2rpo_hps_clip).
#
#   bash scripts/finetune/finetune_g2rpo_hps_clip_8gpu.sh
#   DRY_RUN=1 bash scripts/finetune/finetune_g2rpo_hps_clip_8gpu.sh   # print the plan
#
# One node only (NNODES=1; for 2 nodes use finetune_g2rpo_hps_clip.sh). Config: configs/g2rpo_hps_clip.yaml (the
# reference hyper-parameters); extra section.field=value arguments override it, output_dir too. Needs ckpt/
# (README "Real models") and data/rl_embeddings (preprocess script).
set -euo pipefail
export CONFIG="${CONFIG:-configs/g2rpo_hps_clip.yaml}" NNODES=1 NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" output_dir=outputs/g2rpo_hps_clip_8gpu "$@"

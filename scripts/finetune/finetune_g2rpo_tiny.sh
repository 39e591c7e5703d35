#!/usr/bin/env bash
# G2RPO on the tiny offline models: CPU, 2 processes (FSDP over gloo), about 15 s of training. Any tiny config runs
# through it: CONFIG=configs/tiny_dancegrpo.yaml (flowgrpo, mixgrpo, densegrpo), each into its own outputs/tiny/<method>.
#
#   bash scripts/finetune/finetune_g2rpo_tiny.sh [section.field=value ...]
#
# Needs ckpt/tiny (scripts/prepare_tiny_checkpoints.py) and data/tiny_embeddings (scripts/run_tiny.sh
# builds both). Writes outputs/tiny/train.
set -euo pipefail
export CONFIG="${CONFIG:-configs/tiny.yaml}" NNODES=1 NPROC_PER_NODE="${NPROC_PER_NODE:-2}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

#!/usr/bin/env bash
# G2RPO on the tiny offline models: CPU, 2 processes (FSDP over gloo), about 15 s of training. Any tiny config runs
# through it: CONFIG=configs/tiny_dancegrpo.yaml (flowgrpo, mixgrpo, densegrpo), or --config
# configs/tiny_sd35m_densegrpo.yaml (the tiny SD3 pipeline), each into its own outputs/tiny/<name>.
#
#   bash scripts/finetune/finetune_g2rpo_tiny.sh [--config configs/tiny_<...>.yaml] [section.field=value ...]
#
# Needs ckpt/tiny (scripts/prepare_tiny_checkpoints.py) and data/tiny_embeddings (scripts/run_tiny.sh
# builds both). Writes outputs/tiny/train.
set -euo pipefail
given=0
for arg in "$@"; do case "$arg" in --config|--config=*) given=1;; esac; done
[ "$given" = "1" ] || export CONFIG="${CONFIG:-configs/tiny.yaml}"
export NNODES=1 NPROC_PER_NODE="${NPROC_PER_NODE:-2}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "$@"

#!/usr/bin/env bash
# Shared launcher of the finetune_*.sh scripts: starts `torchrun -m g2rpo.train` for one node.
#
#   CONFIG=configs/g2rpo_hps.yaml NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 \
#     bash scripts/finetune/launch.sh [section.field=value ...]
#   bash scripts/finetune/launch.sh --config configs/tiny_sd35m_densegrpo.yaml   # --config instead of CONFIG=
#
# Multi-node: run the same command on every node with its own NODE_RANK (0..NNODES-1) and the
# same MASTER_ADDR / MASTER_PORT. DRY_RUN=1 validates the config and prints the resolved world
# (nodes, ranks, groups, steps) without starting any process or needing a GPU.
#
# Re-running the same command continues the run in its output_dir (resume auto, the default: the
# newest committed checkpoint, or a fresh start in an empty folder); a folder holding another run
# is refused. RESUME=none starts afresh (refused where a run exists), RESUME=<checkpoint folder>
# resumes that one, OVERWRITE=1 deletes the run in output_dir and starts afresh. The overrides
# resume=... and overwrite=true mean the same; with one of them the default (auto) is not added, and
# RESUME= / OVERWRITE= that disagree with it are refused, naming both.
# Stops: SIGTERM/SIGINT give the workers G2RPO_STOP_TIMEOUT seconds (default 1800) to finish the
# running phase and write a checkpoint (g2rpo/launch.py); the exit code is then 128 + signal.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
export NNODES NPROC_PER_NODE TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
case "${OVERWRITE:-0}" in 0|1) ;; *) echo "error: OVERWRITE=${OVERWRITE}: expected 0 or 1" >&2; exit 2;; esac
source scripts/env_and_flags.sh
refuse_env_and_flag CONFIG --config "$@"
config=()
if [ -n "${CONFIG:-}" ]; then
  config=(--config "$CONFIG")
else
  given=0
  for arg in "$@"; do case "$arg" in --config|--config=*) given=1;; esac; done
  [ "$given" = "1" ] || { echo "error: no config: set CONFIG=<a YAML file under configs/> or pass --config <file>" >&2; exit 2; }
fi
refuse_env_and_flag RESUME --resume "$@"
start=()
[ "${OVERWRITE:-0}" = "1" ] && start+=(--overwrite)
overridden=0
for arg in "$@"; do case "$arg" in resume=*|overwrite=*|--resume|--resume=*|--overwrite) overridden=1;; esac; done
if [ -n "${RESUME+set}" ]; then
  start+=(--resume "$RESUME")
elif [ "${OVERWRITE:-0}" != "1" ] && [ "$overridden" = "0" ]; then
  start+=(--resume auto)  # re-running the command continues the run
fi

if [ "${DRY_RUN:-0}" = "1" ]; then
  exec python -m g2rpo.train ${config[@]+"${config[@]}"} --dry-run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    "${start[@]}" "$@"
fi
if [ "$NNODES" = "1" ]; then
  exec python -m g2rpo.launch --standalone --nproc_per_node="$NPROC_PER_NODE" -m g2rpo.train ${config[@]+"${config[@]}"} \
    "${start[@]}" "$@"
fi
exec python -m g2rpo.launch --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" -m g2rpo.train ${config[@]+"${config[@]}"} "${start[@]}" "$@"

#!/usr/bin/env bash
# Encode a prompt file once with the FLUX pipeline's text encoders (torchrun, prompts sharded by rank).
#
#   bash scripts/preprocess/preprocess_flux_rl_embeddings.sh
#   PROMPTS=data/my_prompts.txt OUT=data/rl_embeddings GPUS=8 bash scripts/preprocess/preprocess_flux_rl_embeddings.sh
#
# Settings (environment): PROMPTS (default data/prompts.txt), MODEL (ckpt/flux), OUT (data/rl_embeddings),
# GPUS (processes; default: the number of visible GPUs, or 1), DTYPE (bfloat16). Extra arguments are
# passed to `python -m g2rpo.preprocess`. Resumable: existing embedding files are kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
PROMPTS="${PROMPTS:-data/prompts.txt}"
MODEL="${MODEL:-ckpt/flux}"
OUT="${OUT:-data/rl_embeddings}"
DTYPE="${DTYPE:-bfloat16}"
if [ -z "${GPUS:-}" ]; then
  GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec torchrun --standalone --nproc_per_node="$GPUS" -m g2rpo.preprocess \
  --model "$MODEL" --prompts "$PROMPTS" --out "$OUT" --dtype "$DTYPE" "$@"

#!/usr/bin/env bash
# Encode a prompt file once with the FLUX pipeline's text encoders (torchrun, prompts sharded by rank).
#
#   bash scripts/preprocess/preprocess_flux_rl_embeddings.sh
#   PROMPTS=data/my_prompts.txt OUT=data/rl_embeddings GPUS=8 bash scripts/preprocess/preprocess_flux_rl_embeddings.sh
#
# Settings (environment): PROMPTS (default data/prompts.txt), MODEL (ckpt/flux), OUT (data/rl_embeddings),
# GPUS (processes; default: the number of visible GPUs, or 1), DTYPE (bfloat16), OVERWRITE (0; 1 passes
# --overwrite). Extra arguments are passed to `python -m g2rpo.preprocess`. Resumable: OUT/fingerprint.json
# records the prompt file's SHA-256, the text encoders, the T5 length and the dtype; a re-run with the same
# inputs keeps the existing embedding files, one with other inputs is refused (use a new OUT, or OVERWRITE=1
# to delete OUT's embeddings, index and fingerprint first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
source scripts/env_and_flags.sh
for pair in PROMPTS:--prompts MODEL:--model OUT:--out DTYPE:--dtype OVERWRITE:--overwrite; do
  refuse_env_and_flag "${pair%%:*}" "${pair#*:}" "$@"
done
PROMPTS="${PROMPTS:-data/prompts.txt}"
MODEL="${MODEL:-ckpt/flux}"
OUT="${OUT:-data/rl_embeddings}"
DTYPE="${DTYPE:-bfloat16}"
case "${OVERWRITE:-0}" in
  0) ;;
  1) set -- --overwrite "$@" ;;
  *) echo "error: OVERWRITE=${OVERWRITE}: expected 0 or 1" >&2; exit 2 ;;
esac
if [ -z "${GPUS:-}" ]; then
  GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec python -m g2rpo.launch --standalone --nproc_per_node="$GPUS" -m g2rpo.preprocess \
  --model "$MODEL" --prompts "$PROMPTS" --out "$OUT" --dtype "$DTYPE" "$@"

#!/usr/bin/env bash
# Evaluate a model on a prompt set (torchrun, prompts sharded across processes) and print the table.
#
#   bash scripts/evaluation/run_eval.sh                      # tiny models on CPU (builds what is missing)
#   BASE=ckpt/flux TRANSFORMER=outputs/g2rpo_hps_clip/checkpoint-300/transformer \
#     PROMPTS=data/hpdv2_test_prompts.txt MODELS=configs/models/flux_dev.yaml NPROC=8 \
#     OUT=outputs/eval/g2rpo bash scripts/evaluation/run_eval.sh --height 720 --width 720
#   LORA=outputs/g2rpo_lora_1gpu/checkpoint-300/lora ...   # a LoRA run's adapters on the base pipeline
#   BASE=ckpt/sd35m MODELS=configs/models/sd35m.yaml LORA=outputs/sd35m_densegrpo_pickscore/checkpoint-299/lora \
#     PROMPTS=<PickScore test prompts> NPROC=8 OUT=outputs/eval/sd35m_densegrpo bash scripts/evaluation/run_eval.sh \
#     --height 512 --width 512 --steps 40 --metrics pickscore   # SD3.5-M: printed beside DenseGRPO's paper rows
#
# Extra arguments go to scripts/evaluation/evaluate.py (--steps, --guidance, --seed, --metrics, --limit ...).
# OUT remembers what its images were made from (OUT/fingerprint.json); a run with another model, prompt
# set or sampling settings is refused. Use a new OUT, or OVERWRITE=1 to delete OUT's old results first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
[ -x .venv/bin/python ] && export PATH="$PWD/.venv/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
source scripts/env_and_flags.sh
for pair in BASE:--base PROMPTS:--prompts MODELS:--models-config OUT:--out TRANSFORMER:--transformer LORA:--lora \
            OVERWRITE:--overwrite; do
  refuse_env_and_flag "${pair%%:*}" "${pair#*:}" "$@"
done
BASE="${BASE:-ckpt/tiny/flux}"
MODELS="${MODELS:-configs/models/tiny.yaml}"
PROMPTS="${PROMPTS:-data/example_prompts.txt}"
OUT="${OUT:-outputs/tiny/eval}"
NPROC="${NPROC:-2}"
extra=()
if [ "${BASE#ckpt/tiny/}" != "$BASE" ]; then  # a tiny pipeline (ckpt/tiny/flux, ckpt/tiny/sd3): CPU-sized
  python scripts/prepare_tiny_checkpoints.py --out ckpt/tiny >/dev/null
  extra=(--height 64 --width 64 --steps 8 --dtype float32 --device cpu --limit 16)
fi
[ -n "${TRANSFORMER:-}" ] && extra+=(--transformer "$TRANSFORMER")
[ -n "${LORA:-}" ] && extra+=(--lora "$LORA")
case "${OVERWRITE:-0}" in
  0) ;;
  1) extra+=(--overwrite) ;;
  *) echo "error: OVERWRITE=${OVERWRITE}: expected 0 or 1" >&2; exit 2 ;;
esac
exec python -m g2rpo.launch --standalone --nproc_per_node="$NPROC" scripts/evaluation/evaluate.py \
  --base "$BASE" --prompts "$PROMPTS" --models-config "$MODELS" --out "$OUT" "${extra[@]}" "$@"

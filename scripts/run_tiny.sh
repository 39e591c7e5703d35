#!/usr/bin/env bash
# The main job on the tiny default, on a CPU: build the tiny offline checkpoints, then sample.
#
#   bash env_setup.sh && bash scripts/run_tiny.sh
#
# (The training pipeline will extend this same script: preprocess -> train -> checkpoint -> sample.)
# Output: outputs/tiny/inference/00000.png and settings.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${G2RPO_VENV:-$ROOT/.venv}/bin/python"
[ -x "$PY" ] || { echo "no environment at ${PY%/bin/python}; run: bash env_setup.sh" >&2; exit 1; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PY" scripts/prepare_tiny_checkpoints.py --out ckpt/tiny
"$PY" scripts/inference/infer.py --base ckpt/tiny/flux --prompt "A red fox curled up asleep in fresh snow at dawn" \
  --height 64 --width 64 --steps 16 --dtype float32 --device cpu --out outputs/tiny/inference

#!/usr/bin/env bash
# GPU first light: every GPU figure of the trainer in one short device lease (scripts/gpu/first_light.py has the phases).
#
#   bash scripts/gpu/first_light.sh --device cuda --out "$OUT"                # on the GPU machine, carrying gpu_carry
#   bash scripts/gpu/first_light.sh --device cpu --budget 120 --out outputs/first_light_cpu --phases env e2e
#
# Prepare on this machine first: `bash scripts/gpu/prepare.sh` fetches the wheels the GPU image lacks into
# gpu_carry/wheels and prints the device call (docs/benchmarks.md, "GPU"). Here they are installed with --no-deps
# into a temporary target that goes ahead of the installed packages on PYTHONPATH (nothing outside it changes);
# without gpu_carry/ the installed packages are used as they are. The budget (--budget, default 420 s) counts
# from this script's start, the install included. Other arguments go to first_light.py (--phases, --limit
# PHASE=SECONDS, --work DIR). Environment: PYTHON (default: .venv/bin/python if present, else python3),
# G2RPO_CARRY (default: gpu_carry next to scripts/).
set -euo pipefail
T0="$(date +%s.%N)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
CARRY="${G2RPO_CARRY:-$ROOT/gpu_carry}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
say() { printf '[first_light] %s\n' "$*"; }

if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
  want="$(sed -n 's/.*"python_version": "\([0-9.]*\)".*/\1/p' "$CARRY/manifest.json" 2>/dev/null || true)"
  have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ -n "$want" ] && [ "$want" != "$have" ]; then
    echo "error: $CARRY holds wheels for Python $want, but $PYTHON is $have; run: bash scripts/gpu/prepare.sh --python-version $have" >&2
    exit 2
  fi
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/g2rpo_site.XXXXXX")"
  say "installing $(ls "$CARRY"/wheels/*.whl | wc -l) carried wheels into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "$CARRY"/wheels/*.whl
  # hpsv2's wheel lacks its BPE vocabulary; open_clip ships the same file
  cp "$SITE/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SITE/hpsv2/src/open_clip/"
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  say "no wheels in $CARRY: using the installed packages"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu/first_light.py --t0 "$T0" "$@"

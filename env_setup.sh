#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything g2rpo needs.
#
#   bash env_setup.sh
#
# Idempotent: a second run only re-checks the imports, unless requirements.txt, pyproject.toml or
# this script changed. Picks the CUDA build of torch when an NVIDIA GPU is visible (nvidia-smi) and
# the CPU build otherwise. Settings (environment variables):
#   G2RPO_VENV        where the environment lives              (default: .venv next to this script)
#   PYTHON            interpreter that creates it, >= 3.10      (default: python3)
#   G2RPO_TORCH       force "cpu" or "cuda"                     (default: detected)
#   TORCH_INDEX_URL   extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu for a
#                     small CPU-only wheel, or .../whl/cu128 for a specific CUDA build
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${G2RPO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf '[env_setup] %s\n' "$*"; }
die() { printf '[env_setup] ERROR: %s\n' "$*" >&2; exit 1; }
# pip prints one warning per missing local index folder on these machines; keep the log readable.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }

command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set PYTHON=/path/to/python3.10+"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$PYTHON" --version 2>&1) is too old; g2rpo needs Python >= 3.10 (set PYTHON=...)"

if [ -z "${G2RPO_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then G2RPO_TORCH=cuda; else G2RPO_TORCH=cpu; fi
fi
case "$G2RPO_TORCH" in cpu|cuda) ;; *) die "G2RPO_TORCH=$G2RPO_TORCH: expected cpu or cuda";; esac

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STAMP="$VENV/.g2rpo-setup"
WANT="$(cat requirements.txt pyproject.toml env_setup.sh g2rpo/_torchvision_compat.py | sha256sum | cut -c1-16)-$G2RPO_TORCH"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "installing packages (torch: $G2RPO_TORCH build); the first time takes a few minutes"
  rm -f "$STAMP"
  quiet_pip install -q --upgrade pip
  torch_index=()
  [ -n "${TORCH_INDEX_URL:-}" ] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")
  # torch is pinned inside requirements.txt, so it is resolved in this same call: no other package
  # can pull a different (multi-GB) torch build. DeepSpeed's optional C++ ops are JIT-built on use.
  DS_BUILD_OPS=0 quiet_pip install -q "${torch_index[@]}" -r requirements.txt

  # hpsv2 pins pytest 7 and protobuf 3.20, which break the rest: install it without its dependencies
  # (requirements.txt carries the ones it needs), and add the BPE vocabulary its wheel forgets.
  quiet_pip install -q --no-deps hpsv2==1.2.0 clint==0.5.1
  # ImageReward's package pins timm 0.6 and fairscale and does not import on transformers 5: g2rpo scores it
  # on transformers' BLIP classes (g2rpo/image_reward.py); its own code, without its pins, is the tests' reference.
  quiet_pip install -q --no-deps image-reward==1.5
  cp -n "$SITE/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SITE/hpsv2/src/open_clip/" 2>/dev/null || true
  [ -f "$SITE/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz" ] || die "could not place hpsv2's BPE vocabulary"

  # torchvision's PyPI wheel cannot load its ops next to a CPU torch; see g2rpo/_torchvision_compat.py.
  cp g2rpo/_torchvision_compat.py "$SITE/_g2rpo_torchvision_compat.py"
  echo "import _g2rpo_torchvision_compat; _g2rpo_torchvision_compat.install()" > "$SITE/g2rpo_torchvision_compat.pth"

  quiet_pip install -q --no-deps -e .
  echo "$WANT" > "$STAMP"
else
  say "packages up to date ($VENV)"
fi

say "import check"
HF_HUB_OFFLINE=1 "$VENV/bin/python" - "$G2RPO_TORCH" <<'EOF' || die "import check failed (see above); remove $VENV/.g2rpo-setup and re-run"
import sys, warnings
warnings.filterwarnings("ignore")
import torch, torchvision, torchvision.transforms, diffusers, transformers, accelerate, open_clip, safetensors
import huggingface_hub, sentencepiece, yaml, tqdm, deepspeed
from hpsv2.src.open_clip import get_tokenizer
import g2rpo
assert get_tokenizer("ViT-H-14")(["a photo of a cat"]).shape == (1, 77), "hpsv2 tokenizer is broken"
want_cuda = sys.argv[1] == "cuda"
if want_cuda and not torch.cuda.is_available():
    raise SystemExit(f"a GPU was detected but torch {torch.__version__} cannot use it (torch.cuda.is_available() is False)")
print(f"  python {sys.version.split()[0]}, torch {torch.__version__} (cuda: {torch.cuda.is_available()}), "
      f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, open_clip {open_clip.__version__}, "
      f"deepspeed {deepspeed.__version__}, g2rpo {g2rpo.__version__}")
EOF
say "ready: source $VENV/bin/activate"

#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything g2rpo needs.
#
#   bash env_setup.sh
#   G2RPO_SETUP_PLAN=1 bash env_setup.sh     # print the torch build and the pip command it would run; install nothing
#
# Idempotent: a second run only re-checks the imports, unless requirements.txt, pyproject.toml or
# this script changed. Picks the torch build that fits the machine: the CUDA build when an NVIDIA GPU
# is visible (nvidia-smi -L), PyPI's default; the CPU build otherwise, from the PyTorch CPU wheel index
# (a ~200 MB wheel instead of PyPI's multi-GB CUDA build) when that index answers, else -- on machines
# that reach only the default package index -- whatever that index serves for the pin (a CPU build
# where it has one), said so. Settings (environment variables):
#   G2RPO_VENV        where the environment lives              (default: .venv next to this script)
#   PYTHON            interpreter that creates it, >= 3.10      (default: python3)
#   G2RPO_TORCH       force "cpu" or "cuda"                     (default: detected)
#   TORCH_INDEX_URL   the extra pip index for torch, instead of the choice above, e.g.
#                     https://download.pytorch.org/whl/cu128 for a specific CUDA build; empty: none
#   TORCH_CPU_INDEX   the CPU wheel index tried on a CPU machine (default https://download.pytorch.org/whl/cpu)
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

# the extra index torch comes from: the user's, or on a CPU machine the PyTorch CPU index if it answers
if [ -n "${TORCH_INDEX_URL+set}" ]; then
  torch_index="$TORCH_INDEX_URL"; torch_source="TORCH_INDEX_URL"
elif [ "$G2RPO_TORCH" = "cpu" ]; then
  cpu_index="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()' \
       "$cpu_index" 2>/dev/null; then
    torch_index="$cpu_index"; torch_source="the PyTorch CPU index $cpu_index"
  else
    torch_index=""; torch_source="the default index (the CPU index $cpu_index does not answer here)"
  fi
else
  torch_index=""; torch_source="the default index (its torch is the CUDA build)"
fi
torch_args=()
[ -n "$torch_index" ] && torch_args=(--extra-index-url "$torch_index")
pip_args=(install -q "${torch_args[@]}" -r requirements.txt)
if [ "${G2RPO_SETUP_PLAN:-0}" = "1" ]; then
  say "plan: torch $(sed -n 's/^torch==//p' requirements.txt), $G2RPO_TORCH build, from $torch_source"
  say "plan: DS_BUILD_OPS=0 $VENV/bin/python -m pip ${pip_args[*]}"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STAMP="$VENV/.g2rpo-setup"
WANT="$(cat requirements.txt pyproject.toml env_setup.sh g2rpo/_torchvision_compat.py | sha256sum | cut -c1-16)-$G2RPO_TORCH"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  say "installing packages (torch: $G2RPO_TORCH build, from $torch_source); the first time takes a few minutes"
  rm -f "$STAMP"
  quiet_pip install -q --upgrade pip
  # torch is pinned inside requirements.txt, so it is resolved in this same call: no other package
  # can pull a different (multi-GB) torch build. DeepSpeed's optional C++ ops are JIT-built on use.
  DS_BUILD_OPS=0 quiet_pip "${pip_args[@]}"

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

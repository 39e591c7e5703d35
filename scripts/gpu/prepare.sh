#!/usr/bin/env bash
# Prepare the GPU first-light run, on this machine (CPU): the wheels the GPU machine's image lacks, a size check,
# and the exact device call.
#
#   bash scripts/gpu/prepare.sh                          # for the GPU image: Python 3.12, manylinux x86-64
#   bash scripts/gpu/prepare.sh --python-version 3.11    # for another interpreter (the CPU dry run of first_light.sh)
#
# Fetches scripts/gpu/wheels.txt into gpu_carry/wheels (git-ignored; --dest DIR elsewhere) with pip download
# (binary wheels only, no dependencies: the image has the rest); a package published only as a source archive
# (marked "# build" there) gets its wheel built here, and must be pure Python. Writes gpu_carry/manifest.json
# (file, bytes, SHA-256 of each wheel). Then sums what travels with the device call -- the working tree's tracked
# and untracked-but-not-ignored files plus the carry -- and refuses if that exceeds --max-mib (default 48 of the
# device's 64 MiB), naming the sizes. Nothing else (the tiny models, embeddings) travels: first_light.sh builds
# them on the GPU machine in seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEST="$ROOT/gpu_carry"
PYVER=3.12
MAX_MIB=48
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift 2;;
    --python-version) PYVER="$2"; shift 2;;
    --max-mib) MAX_MIB="$2"; shift 2;;
    *) echo "error: unknown argument $1 (expected --dest DIR, --python-version X.Y, --max-mib N)" >&2; exit 2;;
  esac
done
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
say() { printf '[prepare] %s\n' "$*"; }
quiet() { "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'; }

mkdir -p "$DEST/wheels"
rm -f "$DEST"/wheels/*.whl
binary=(); build=()
while IFS= read -r line; do
  spec="${line%%#*}"; spec="${spec//[[:space:]]/}"
  [ -z "$spec" ] && continue
  if [[ "$line" == *"# build"* ]]; then build+=("$spec"); else binary+=("$spec"); fi
done < scripts/gpu/wheels.txt
abi="cp${PYVER/./}"
say "downloading ${#binary[@]} wheels for Python $PYVER (manylinux x86-64): ${binary[*]}"
quiet "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --abi "$abi" --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST/wheels" "${binary[@]}"
if [ ${#build[@]} -gt 0 ]; then
  say "building wheels of source-only packages: ${build[*]}"
  quiet "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST/wheels" "${build[@]}"
fi

"$PY" - "$ROOT" "$DEST" "$PYVER" "$MAX_MIB" "${binary[@]}" "${build[@]}" <<'PYEOF'
import hashlib, json, re, subprocess, sys
from pathlib import Path

root, dest, pyver, max_mib, specs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5:]
wheels = sorted((dest / "wheels").glob("*.whl"))
def norm(name): return re.sub(r"[-_.]+", "_", name).lower()
have = {norm(w.name.split("-")[0]): w for w in wheels}
missing = [s for s in specs if norm(s.split("==")[0]) not in have]
if missing:
    sys.exit(f"error: no wheel in {dest / 'wheels'} for {', '.join(missing)}")
tag = f"cp{pyver.replace('.', '')}"
foreign = [w.name for w in wheels if not (w.name.endswith("-none-any.whl") or f"-{tag}-" in w.name or "-abi3-" in w.name)]
if foreign:
    sys.exit(f"error: {', '.join(foreign)}: not a wheel for Python {pyver}")
manifest = {"python_version": pyver, "wheels": [
    {"file": w.name, "bytes": w.stat().st_size, "sha256": hashlib.sha256(w.read_bytes()).hexdigest()} for w in wheels]}
carry_bytes = sum(w["bytes"] for w in manifest["wheels"])
manifest["bytes"] = carry_bytes
(dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                        capture_output=True, check=True).stdout.split(b"\0")
tree_bytes = sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())
try:
    inside = dest.resolve().relative_to(root.resolve())
except ValueError:
    inside = None
total = tree_bytes + carry_bytes
mib = 2**20
print(f"[prepare] {len(wheels)} wheels, {carry_bytes / mib:.1f} MiB; working tree {tree_bytes / mib:.1f} MiB; "
      f"travels: {total / mib:.1f} MiB (limit {max_mib:g} MiB of the device's 64)")
if total > max_mib * mib:
    sys.exit(f"error: {total / mib:.1f} MiB would travel (working tree {tree_bytes / mib:.1f} + carry "
             f"{carry_bytes / mib:.1f}), over --max-mib {max_mib:g}; drop wheels from scripts/gpu/wheels.txt or "
             f"untracked files from the tree")
carry = str(inside) if inside is not None else str(dest)
print(f'[prepare] carry: ["{carry}"]')
print(f'[prepare] device call: run(command="bash scripts/gpu/first_light.sh --device cuda --out $OUT", '
      f'carry=["{carry}"], timeout_s=480)')
PYEOF

"""What a derived artefact was made from, and refusing to reuse it for anything else.

A folder of derived outputs (prompt embeddings, evaluation images) holds ``fingerprint.json``: a
JSON object naming its inputs (file hashes, model identities, settings). A later run into the same
folder reuses what is there only when its own fingerprint is exactly equal; otherwise it stops with
an error naming each field that changed and the two ways out (a new folder, or the overwrite flag).

    expected = {"prompts": sha256_file(prompt_file), "model": weights_identity(model_dir), "dtype": "bf16"}
    check_reuse(out, expected, "prompt embeddings", "--overwrite", has_outputs=any(out.glob("*.safetensors")))
    write_fingerprint(out, expected)   # before the first output is written, so a resumed run matches
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FINGERPRINT = "fingerprint.json"


class StaleOutputsError(ValueError):
    """A folder holds outputs made from other inputs than the ones asked for now."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest(obj) -> str:
    """SHA-256 of an object's canonical JSON (sorted keys): equal objects, equal digests."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


_ABSENT = "(absent)"


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``["field: was A, now B", ...]`` over the dotted fields of two nested dicts that differ."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += changes(a, b, name)
        elif a != b:
            lines.append(f"{name}: was {_short(a)}, now {_short(b)}")
    return lines


def read_fingerprint(folder: str | Path) -> dict | None:
    path = Path(folder) / FINGERPRINT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StaleOutputsError(f"{path}: unreadable ({exc}); delete the folder or pass the overwrite flag") from None


def check_reuse(folder: str | Path, expected: dict, what: str, overwrite_flag: str, has_outputs: bool) -> None:
    """Raise `StaleOutputsError` unless ``folder``'s outputs (if any) were made from ``expected``.

    A folder without outputs is fresh (no error, whatever fingerprint it holds). A folder with outputs
    but no fingerprint is refused: nothing says what made them.
    """
    folder = Path(folder)
    if not has_outputs:
        return
    recorded = read_fingerprint(folder)
    ways_out = f"write to a new folder, or pass {overwrite_flag} to delete them and start again"
    if recorded is None:
        if has_outputs:
            raise StaleOutputsError(f"{folder}: holds {what} of unknown origin (no {FINGERPRINT}: written by hand or "
                                    f"by an older g2rpo), so they cannot be reused safely; {ways_out}")
        return
    diff = changes(recorded, expected)
    if diff:
        raise StaleOutputsError(f"{folder}: holds {what} made from other inputs than asked for now:\n  "
                                + "\n  ".join(diff) + f"\n{ways_out}")


def write_fingerprint(folder: str | Path, fingerprint: dict) -> None:
    from g2rpo.io import atomic_write_text

    atomic_write_text(Path(folder) / FINGERPRINT, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


MARKER = "COMMITTED"  # a checkpoint folder's manifest: written last, so a checkpoint with one is complete


def export_manifest(folder: str | Path) -> dict | None:
    """``{relative path: {size, sha256}}`` of an exported transformer as its checkpoint's ``COMMITTED``
    records it (paths relative to ``folder``), or None when ``folder`` is not such an export."""
    folder = Path(folder)
    marker = folder.parent / MARKER
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{marker}: unreadable ({exc})") from None
    prefix = f"{folder.name}/"
    return {rel.removeprefix(prefix): entry for rel, entry in files.items() if rel.startswith(prefix)} or None



def weights_identity(folder: str | Path) -> dict:
    """A cheap identity of a model folder, for fingerprints (no file is read through).

    The export of a committed g2rpo checkpoint is named by the SHA-256 of its files recorded in the
    checkpoint's manifest; any other folder by the names, sizes and modification times of its
    weight and config files (so a copy without preserved times counts as a change).
    """
    folder = Path(folder)
    manifest = export_manifest(folder)
    if manifest is not None:
        return {"kind": "g2rpo checkpoint export", "sha256": digest({k: v["sha256"] for k, v in manifest.items()})}
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".bin", ".pt", ".model", ".txt"):
            stat = path.stat()
            files[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return {"kind": "folder", "files": digest(files), "count": len(files)}

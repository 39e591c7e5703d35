"""Full-state checkpoints: save, verify, find the latest, resume; the parallel transformer export.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds

* ``transformer/`` -- the exported diffusers weights (``save_dtype``, bf16 by default, as FLUX.1-dev
  ships), one safetensors shard per rank plus the index (for inference; never purged); with ``ema.decay``,
  ``transformer_ema/`` beside it holds the averaged weights the same way. With LoRA the exports are
  ``lora/`` (and ``lora_ema/``), diffusers' LoRA files, and ``transformer/`` (merged) only with
  ``lora.export_merged``;
* ``state/`` -- everything needed to continue: the engine's model + optimiser state (FSDP: a
  sharded torch.distributed.checkpoint; DeepSpeed: its own ZeRO checkpoint), the LR scheduler, and
  every rank's RNG states (python, numpy, torch CPU and CUDA);
* ``trainer_state.json`` -- the next step (which is also the data-schedule position), the world
  size, the engine, the config and a format version;
* ``COMMITTED`` -- written last, with the size and SHA-256 of every file.

`save` and `load` take the parts explicitly (`Parts`: engine, train state, config, data identity).
Every rank writes its own files into ``.checkpoint-<step>.tmp`` and hashes them (`file_owner`), all
at once; rank 0 gathers the hashes, writes ``COMMITTED`` and renames the folder into place. A failure
on any rank (a full disk included; free space is checked first) is raised on every rank and removes
the unfinished folder. Resuming verifies the same way, each rank its own files; `check_resume` says
beforehand, from ``trainer_state.json`` alone, whether the checkpoint fits the run. `purge` keeps the
exports and their part of the manifest, which `verify_export` checks before inference uses them. ``output_dir`` must be on a file system every rank
sees (one folder, written by all nodes). The collectives that wait on this I/O run in a gloo group
with their own time-out (``io_timeout_minutes``). A folder without a valid ``COMMITTED`` is ignored
by `find_latest`; a file whose size or hash disagrees with it is named in the error, never loaded.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from g2rpo.distributed import agreed, all_gather_object, barrier
from g2rpo.fingerprint import FINGERPRINT, MARKER, digest, export_manifest, sha256_file
from g2rpo.io import atomic_write_text, save_safetensors

FORMAT_VERSION = 2  # 2: FSDP2 state (the model's own parameter names), exports sharded per rank
# What a resumed run must share with the checkpoint besides the config: g2rpo.config.RESUME_MAY_CHANGE
# lists the config fields that may change; DeepSpeed ZeRO states also need the same world size.


# Files that name the rank that wrote them; everything else is rank 0's.
_RANKED_FILES = (re.compile(r"__(\d+)_\d+\.distcp$"), re.compile(r"rng_rank(\d+)\.json$"),
                 re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"-(\d+)-of-\d+\.safetensors$"))


def file_owner(relative: str, world_size: int) -> int:
    """The rank that hashes (and verifies) a checkpoint file: the one that wrote it where the name says so."""
    for index, pattern in enumerate(_RANKED_FILES):
        match = pattern.search(relative)
        if match:
            rank = int(match.group(1)) - (1 if index == 3 else 0)  # export shards count from 1
            return rank % world_size
    return 0


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("checkpoint-"):
        return None
    try:
        return int(name.removeprefix("checkpoint-"))
    except ValueError:
        return None


# ------------------------------------------------------------------------------------ RNG


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(internal) + [gauss],
        "python_version": version,
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    *internal, gauss = state["python"]
    random.setstate((state["python_version"], tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------------------ verify / find


def verify(path: str | Path, checksums: bool = True, rank: int = 0, world_size: int = 1) -> dict:
    """Check ``COMMITTED`` against the files; returns trainer_state.json. Errors name the bad file.

    With ``world_size > 1`` only the files `file_owner` gives to ``rank`` are checked, so that all
    ranks together check every file once, in parallel.
    """
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise ValueError(f"{path}: not a committed checkpoint (no {MARKER}; it was interrupted while being written)")
    try:
        committed = json.loads(marker.read_text())
        manifest = committed["files"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{marker}: unreadable ({exc})") from None
    if committed.get("resumable") is False:
        raise ValueError(f"{path}: its resumable state was deleted (keep_last keeps only the newest); only its "
                         f"exports (transformer/ or lora/) remain. Resume from a newer checkpoint")
    for relative, expected in manifest.items():
        if file_owner(relative, world_size) != rank:
            continue
        file = path / relative
        if not file.is_file():
            raise ValueError(f"{file}: missing from checkpoint {path}")
        size = file.stat().st_size
        if size != expected["size"]:
            raise ValueError(f"{file}: {size} bytes, expected {expected['size']} (truncated or corrupted)")
        if checksums and sha256_file(file) != expected["sha256"]:
            raise ValueError(f"{file}: SHA-256 mismatch (corrupted); delete the checkpoint or resume from another")
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format_version')}, this g2rpo reads {FORMAT_VERSION}")
    return state


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest checkpoint with a ``COMMITTED`` marker and a ``state/`` folder; None if there is none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = sorted((p for p in output_dir.iterdir() if step_of(p) is not None and p.is_dir()),
                        key=step_of, reverse=True)
    for path in candidates:
        if (path / MARKER).is_file() and (path / "state").is_dir():
            return path
    return None


def _is_checkpoint_name(name: str) -> bool:
    return re.fullmatch(r"\.?checkpoint-\d+(\.tmp)?", name) is not None


def verify_export(folder: str | Path) -> str:
    """Check an exported transformer before inference or evaluation uses it; returns what was checked.

    The export of a committed checkpoint must match its ``COMMITTED`` manifest (size and SHA-256 of
    every file, and no unlisted weights); the export of a checkpoint that was never committed is
    refused; any other diffusers folder (e.g. FLUX.1-dev itself) is accepted as it is.
    """
    from g2rpo.lora import WEIGHTS_NAME

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder}: no config.json or {WEIGHTS_NAME}; expected a diffusers transformer folder "
                                f"(e.g. outputs/<run>/checkpoint-<step>/transformer) or a LoRA one (.../lora)")
    manifest = export_manifest(folder)
    if manifest is None:
        parent = folder.parent
        if _is_checkpoint_name(parent.name) or (parent / "trainer_state.json").is_file():
            raise ValueError(f"{folder}: belongs to checkpoint {parent}, which was never committed (no {MARKER}: "
                             f"the run stopped while writing it); use another checkpoint, e.g. the newest one "
                             f"with a {MARKER} file")
        return f"{folder}: not a g2rpo checkpoint export; used as a plain diffusers folder (not verified)"
    for relative, expected in manifest.items():
        file = folder / relative
        if not file.is_file():
            raise ValueError(f"{file}: missing (listed in {folder.parent / MARKER})")
        if file.stat().st_size != expected["size"]:
            raise ValueError(f"{file}: {file.stat().st_size} bytes, expected {expected['size']} (truncated or "
                             f"corrupted); re-export it or use another checkpoint")
        if sha256_file(file) != expected["sha256"]:
            raise ValueError(f"{file}: SHA-256 mismatch with {folder.parent / MARKER} (corrupted); use another "
                             f"checkpoint")
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")
                      if p.relative_to(folder).as_posix() not in manifest)
    if unlisted:
        raise ValueError(f"{folder}: weights not in its checkpoint's {MARKER}: {unlisted[:5]} (added later?)")
    return f"{folder}: verified against {folder.parent / MARKER} ({len(manifest)} files)"


def data_identity(index: str | Path) -> dict:
    """The training data by content: the index file's SHA-256 and the fingerprint preprocessing wrote
    beside it (what the embeddings were made from), so a resumed run may read a moved copy but not
    other data under the same path."""
    index = Path(index)
    if not index.is_file():
        raise FileNotFoundError(f"embedding index not found: {index} (run the preprocessing step, or set data.index)")
    fingerprint = index.parent / FINGERPRINT
    return {"index_sha256": sha256_file(index),
            "embeddings": digest(json.loads(fingerprint.read_text())) if fingerprint.is_file() else None}


def check_resume(path: Path, config: dict, world_size: int, data: dict) -> tuple[dict, list[str]]:
    """Whether this run may continue checkpoint ``path``: ``(trainer_state, changed fields)``.

    Reads only ``trainer_state.json`` (cheap; the files are verified when they are loaded). Raises
    ValueError listing every field that must match and does not (`g2rpo.config.RESUME_MAY_CHANGE` names
    those that may change), a changed data content, and a world-size change under DeepSpeed.
    """
    from g2rpo.config import resume_differences

    state_file = path / "trainer_state.json"
    if not (path / MARKER).is_file():
        raise ValueError(f"{path}: not a committed checkpoint (no {MARKER}; it was interrupted while being written)")
    try:
        state = json.loads(state_file.read_text())
        saved_config, saved_world = state["config"], state["world_size"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{state_file}: unreadable or incomplete ({type(exc).__name__}: {exc}); resume from "
                         f"another checkpoint") from None
    refused, changed = resume_differences(saved_config, config)
    saved_data = state.get("data")
    if saved_data is None:  # written before data identities were recorded: the path stands for the content
        if saved_config["data"]["index"] != config["data"]["index"]:
            refused.append(f"data.index: checkpoint {saved_config['data']['index']!r} != now "
                           f"{config['data']['index']!r} (this checkpoint records no data content)")
    elif saved_data != data:
        what = [k for k in data if saved_data.get(k) != data[k]]
        refused.append(f"data content ({', '.join(what)} of {config['data']['index']}): differs from the data the "
                       f"checkpoint was trained on; point data.index at that data")
    if config["engine"]["kind"] == "deepspeed" and saved_world != world_size:
        refused.append(f"world size: checkpoint {saved_world} != now {world_size} (DeepSpeed ZeRO states are per rank)")
    if refused:
        raise ValueError(f"cannot resume {path} with a different setup:\n  " + "\n  ".join(refused)
                         + "\n(fields that may change on resume: g2rpo.config.RESUME_MAY_CHANGE; to start a new run "
                           "choose another output_dir or pass --overwrite)")
    return state, changed


# ------------------------------------------------------------------------------------ save / load


def plan_export(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """``{parameter: rank}``: contiguous runs of parameters (in model order) of about equal size per rank."""
    total = max(sum(sizes.values()), 1)
    owners, offset = {}, 0
    for name, numel in sizes.items():
        owners[name] = min(world_size - 1, offset * world_size // total)
        offset += numel
    return owners


@dataclass
class Parts:
    """What a checkpoint saves and restores, named explicitly.

    ``engine``: model + optimiser + LR scheduler (``save_state(folder, group)`` / ``load_state``, and
    ``gather_params`` / ``param_sizes`` / ``config`` for the diffusers export); ``train_state``: the
    loop's counters (``state_dict()`` / ``load_state_dict()``); ``config``: the run's config as a dict;
    ``data``: the training data's identity (`data_identity`).
    """

    engine: Any
    train_state: Any
    config: dict
    data: dict


def export_transformer(engine, folder: Path, dtype: torch.dtype, info, group=None, ema: bool = False) -> None:
    """The transformer in diffusers format (``ema``: with the averaged weights), written by every rank in
    parallel. Collective.

    Each rank gathers the full parameters the plan gives it and writes them as one safetensors
    shard; rank 0 adds ``config.json`` and, for several shards, the index diffusers reads. A write
    that fails on any rank fails on every rank (after the gathers, so no collective is left open).
    """
    sizes = engine.param_sizes()
    owners = plan_export(sizes, info.world_size)
    mine = engine.gather_params(dtype, owners, ema=ema)
    first = min(owners.values())
    buffers = engine.fixed_buffers()  # SD3's position table: written by the first writer, as stored
    owners.update({name: first for name in buffers})
    if info.rank == first:
        mine.update(buffers)
    writers = sorted(set(owners.values()))
    if len(writers) == 1:
        names = {writers[0]: "diffusion_pytorch_model.safetensors"}
    else:
        names = {r: f"diffusion_pytorch_model-{i + 1:05d}-of-{len(writers):05d}.safetensors" for i, r in enumerate(writers)}

    def write():
        folder.mkdir(parents=True, exist_ok=True)
        if mine:
            save_safetensors(mine, folder / names[info.rank], metadata={"format": "pt"})
        if info.is_main:
            with torch.device("meta"):
                engine.family.transformer_cls().from_config(engine.config).save_config(folder)
            if len(writers) > 1:
                element = torch.tensor([], dtype=dtype).element_size()
                index = {"metadata": {"total_size": sum(sizes.values()) * element},
                         "weight_map": {name: names[rank] for name, rank in owners.items()}}
                atomic_write_text(folder / "diffusion_pytorch_model.safetensors.index.json", json.dumps(index, indent=2))

    agreed(write, group)


def export_lora(engine, folder: Path, info, group=None, ema: bool = False) -> None:
    """The adapters (``ema``: averaged) as the family's diffusers LoRA file, written by rank 0. Collective."""
    from g2rpo.lora import write_lora_folder

    adapters = {name: t.cpu() for name, t in engine.lora_state(ema).items()}
    agreed(lambda: write_lora_folder(folder, adapters, engine.lora, engine.family) if info.is_main else None, group)


def export_all(engine, folder: Path, dtype: torch.dtype, info, group=None) -> None:
    """What a checkpoint exports for inference: ``transformer/`` (full fine-tuning), or ``lora/`` and, with
    ``lora.export_merged``, the merged ``transformer/``; ``transformer_ema/`` / ``lora_ema/`` beside them with an
    EMA. Collective."""
    lora = engine.lora
    if lora is None or lora.export_merged:
        export_transformer(engine, folder / "transformer", dtype, info, group)
    if lora is not None:
        export_lora(engine, folder / "lora", info, group)
    if engine.ema is not None:  # the averaged weights, for inference and evaluation alike
        if lora is None:
            export_transformer(engine, folder / "transformer_ema", dtype, info, group, ema=True)
        else:
            export_lora(engine, folder / "lora_ema", info, group, ema=True)


def space_needed(output_dir: Path, engine, save_dtype: torch.dtype) -> tuple[int, str]:
    """``(bytes, how it was estimated)`` a new checkpoint takes: the newest committed one's size, else the
    fp32 weights and two AdamW moments of what trains (12 bytes a parameter; + 4 with an EMA) plus the exports."""
    latest = find_latest(output_dir)
    if latest is not None:
        files = json.loads((latest / MARKER).read_text())["files"]
        return sum(entry["size"] for entry in files.values()), f"the size of {latest.name}"
    params, trained = sum(engine.param_sizes().values()), engine.trainable_numel()
    element = torch.tensor([], dtype=save_dtype).element_size()
    copies = 2 if engine.ema is not None else 1  # the EMA: its fp32 state and its export
    state = trained * (12 + 4 * (copies - 1))  # fp32 weights and two AdamW moments of what trains (+ the average)
    exported = copies * (trained * 4 if engine.lora is not None else params * element)
    if engine.lora is not None and engine.lora.export_merged:
        exported += params * element
    return state + exported, f"{trained:,} trained of {params:,} parameters: state {state / 1e9:.3g} GB, exports " \
                             f"{exported / 1e9:.3g} GB"


_NOTHING_WRITTEN = "Nothing was written."


def _check_space(output_dir: Path, needed: int, how: str, step: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{output_dir}: not enough disk space for checkpoint-{step}: {free / 1e9:.3g} GB "
                                    f"free, about {needed / 1e9:.3g} GB needed ({how}); free space there or set "
                                    f"output_dir to a larger file system. {_NOTHING_WRITTEN}")


def _disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "[Errno 28]" in str(exc) \
        or "No space left on device" in str(exc)


def save(output_dir: Path, step: int, parts: Parts, info, group=None, keep_last: int | None = 0,
         save_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a committed full-state checkpoint after ``step``. Collective: every rank calls it.

    Space is checked first (rank 0). A failure on any rank -- a full disk included -- fails on every
    rank, removes the unfinished folder and leaves the earlier checkpoints as they were.
    """
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    needed, how = space_needed(output_dir, parts.engine, save_dtype)

    def prepare():
        if info.is_main:
            _check_space(output_dir, needed, how, step)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "state").mkdir(parents=True)

    def write_mine():
        atomic_write_text(tmp / "state" / f"rng_rank{info.rank}.json", json.dumps(rng_state()))
        if info.is_main:
            atomic_write_text(tmp / "trainer_state.json", json.dumps({
                "format_version": FORMAT_VERSION, **parts.train_state.state_dict(), "world_size": info.world_size,
                "engine": parts.config["engine"]["kind"], "config": parts.config, "data": parts.data,
            }, indent=2))

    def hash_mine():  # every file is written; each rank hashes its own
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        return files, {rel: _file_entry(tmp / rel) for rel in files if file_owner(rel, info.world_size) == info.rank}

    def commit(files, entries):
        if not info.is_main:
            return
        manifest = {rel: entry for part in entries for rel, entry in part.items()}
        for rel in files:  # a file its owner did not list (e.g. not yet visible on its node): hash it here
            manifest.setdefault(rel, _file_entry(tmp / rel))
        atomic_write_text(tmp / MARKER, json.dumps({"files": dict(sorted(manifest.items()))}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            purge(output_dir, keep_last)

    try:
        agreed(prepare, group)
        barrier(group)
        parts.engine.save_state(tmp / "state", group)  # collective (DCP / DeepSpeed report failures on every rank)
        agreed(write_mine, group)
        export_all(parts.engine, tmp, save_dtype, info, group)
        barrier(group)
        files, mine = agreed(hash_mine, group)
        entries = all_gather_object(mine, group)
        agreed(lambda: commit(files, entries), group)
    except BaseException as exc:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc) and _NOTHING_WRITTEN not in str(exc):
            raise OSError(errno.ENOSPC, f"{output_dir}: the disk filled up while writing checkpoint-{step} (about "
                                        f"{needed / 1e9:.3g} GB needed, {how}); the unfinished folder was removed and "
                                        f"the earlier checkpoints are intact. Free space there or set output_dir to "
                                        f"a larger file system ({exc})") from exc
        raise
    barrier(group)
    return final


def purge(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete the resumable ``state/`` of all but the newest ``keep_last`` committed checkpoints.

    Their exports (``transformer/``, ``lora/``, their ``_ema`` twins) are kept for inference, and so is their part of the
    manifest (``COMMITTED`` is rewritten without the ``state/`` files, so the export stays verifiable).
    """
    committed = sorted((p for p in output_dir.iterdir() if step_of(p) is not None and (p / "state").is_dir()
                        and (p / MARKER).is_file()), key=step_of)
    removed = []
    for path in committed[:-keep_last]:
        marker = path / MARKER
        manifest = json.loads(marker.read_text())
        manifest["files"] = {rel: e for rel, e in manifest["files"].items() if not rel.startswith("state/")}
        manifest["resumable"] = False
        atomic_write_text(marker, json.dumps(manifest, indent=1))
        shutil.rmtree(path / "state")
        removed.append(path)
    return removed


BEST = "best.json"  # a run's pointer to its best checkpoint by eval.best_by (g2rpo.trainer, g2rpo.hacking)


def resolve_best(path: str | Path | None, part: str = "transformer") -> Path | None:
    """``<output_dir>/best`` -> the ``part`` (transformer, transformer_ema, lora, lora_ema) of the checkpoint that
    ``<output_dir>/best.json`` names; any other path as it is."""
    if path is None:
        return None
    path = Path(path)
    pointer = path.parent / BEST
    if path.name != "best" or path.exists() or not pointer.is_file():
        return path
    try:
        best = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{pointer}: not a best-checkpoint pointer ({exc})") from None
    return path.parent / best / part


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """``""`` -> fresh start; ``auto`` -> latest committed (None if none); a path -> that checkpoint (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint directory")
    return path


def load(path: Path, parts: Parts, info, group=None, checksums: bool = True) -> dict:
    """Restore the engine, RNG and train state from a committed checkpoint; returns trainer_state.json.
    Collective.

    Every rank verifies its own share of the files first (in parallel); any problem on any rank is
    raised on all of them. Whether the checkpoint fits this run is `check_resume`'s business (earlier).
    """
    state = agreed(lambda: verify(path, checksums, info.rank, info.world_size), group)
    parts.engine.load_state(path / "state", group)
    rng_file = path / "state" / f"rng_rank{info.rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    parts.train_state.load_state_dict(state)
    barrier(group)
    return state

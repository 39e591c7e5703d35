"""Full-state checkpoints: save, verify, find the latest, resume; the parallel transformer export.

A checkpoint ``<output_dir>/checkpoint-<step>/`` holds

* ``transformer/`` -- the exported diffusers weights (``save_dtype``, bf16 by default, as FLUX.1-dev
  ships), one safetensors shard per rank plus the index (for inference; never purged);
* ``state/`` -- everything needed to continue: the engine's model + optimiser state (FSDP: a
  sharded torch.distributed.checkpoint; DeepSpeed: its own ZeRO checkpoint), the LR scheduler, and
  every rank's RNG states (python, numpy, torch CPU and CUDA);
* ``trainer_state.json`` -- the next step (which is also the data-schedule position), the world
  size, the engine, the config and a format version;
* ``COMMITTED`` -- written last, with the size and SHA-256 of every file.

Every rank writes its own files into ``.checkpoint-<step>.tmp`` and hashes them (`file_owner`), all
at once; rank 0 gathers the hashes, writes ``COMMITTED`` and renames the folder into place. Resuming
verifies the same way, each rank its own files. ``output_dir`` must be on a file system every rank
sees (one folder, written by all nodes). The collectives that wait on this I/O run in a gloo group
with their own time-out (``io_timeout_minutes``). A folder without a valid ``COMMITTED`` is ignored
by `find_latest`; a file whose size or hash disagrees with it is named in the error, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from g2rpo.distributed import all_gather_object, barrier
from g2rpo.io import atomic_write_text, save_safetensors

FORMAT_VERSION = 2  # 2: FSDP2 state (the model's own parameter names), exports sharded per rank
MARKER = "COMMITTED"
# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_INVARIANTS = ("sampling.group_size", "sampling.height", "sampling.width", "sampling.num_steps",
                     "sampling.shift", "sampling.eta", "sampling.branch_steps", "sampling.granularities",
                     "data.index", "data.prompts_per_rank", "data.holdout", "seed", "engine.kind")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


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
        manifest = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{marker}: unreadable ({exc})") from None
    for relative, expected in manifest.items():
        if file_owner(relative, world_size) != rank:
            continue
        file = path / relative
        if not file.is_file():
            raise ValueError(f"{file}: missing from checkpoint {path}")
        size = file.stat().st_size
        if size != expected["size"]:
            raise ValueError(f"{file}: {size} bytes, expected {expected['size']} (truncated or corrupted)")
        if checksums and _sha256(file) != expected["sha256"]:
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


def check_compatible(saved_config: dict, config: dict, saved_world: int, world: int, engine: str) -> None:
    def get(d, dotted):
        for part in dotted.split("."):
            d = d[part]
        return d

    diffs = [f"{key}: checkpoint {get(saved_config, key)!r} != now {get(config, key)!r}"
             for key in RESUME_INVARIANTS if get(saved_config, key) != get(config, key)]
    if engine == "deepspeed" and saved_world != world:
        diffs.append(f"world size: checkpoint {saved_world} != now {world} (DeepSpeed ZeRO states are per rank)")
    if diffs:
        raise ValueError("cannot resume with a different setup:\n  " + "\n  ".join(diffs))


# ------------------------------------------------------------------------------------ save / load


def plan_export(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """``{parameter: rank}``: contiguous runs of parameters (in model order) of about equal size per rank."""
    total = max(sum(sizes.values()), 1)
    owners, offset = {}, 0
    for name, numel in sizes.items():
        owners[name] = min(world_size - 1, offset * world_size // total)
        offset += numel
    return owners


def export_transformer(engine, folder: Path, dtype: torch.dtype, info) -> None:
    """The transformer in diffusers format, written by every rank in parallel. Collective.

    Each rank gathers the full parameters the plan gives it and writes them as one safetensors
    shard; rank 0 adds ``config.json`` and, for several shards, the index diffusers reads.
    """
    from diffusers import FluxTransformer2DModel

    sizes = engine.param_sizes()
    owners = plan_export(sizes, info.world_size)
    mine = engine.gather_params(dtype, owners)
    writers = sorted(set(owners.values()))
    if len(writers) == 1:
        names = {writers[0]: "diffusion_pytorch_model.safetensors"}
    else:
        names = {r: f"diffusion_pytorch_model-{i + 1:05d}-of-{len(writers):05d}.safetensors" for i, r in enumerate(writers)}
    folder.mkdir(parents=True, exist_ok=True)
    if mine:
        save_safetensors(mine, folder / names[info.rank], metadata={"format": "pt"})
    if info.is_main:
        with torch.device("meta"):
            FluxTransformer2DModel.from_config(engine.config).save_config(folder)
        if len(writers) > 1:
            element = torch.tensor([], dtype=dtype).element_size()
            index = {"metadata": {"total_size": sum(sizes.values()) * element},
                     "weight_map": {name: names[rank] for name, rank in owners.items()}}
            atomic_write_text(folder / "diffusion_pytorch_model.safetensors.index.json", json.dumps(index, indent=2))


def save(trainer, step: int, keep_last: int | None) -> Path:
    """Write a committed full-state checkpoint after ``step``. Collective: every rank calls it."""
    from g2rpo.config import to_dict

    info, out, group = trainer.info, trainer.out_dir, trainer.io_group
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "state").mkdir(parents=True)
    barrier(group)
    trainer.engine.save_state(tmp / "state", group)
    atomic_write_text(tmp / "state" / f"rng_rank{info.rank}.json", json.dumps(rng_state()))
    save_dtype = torch.float32 if trainer.cfg.save_dtype == "float32" else torch.bfloat16
    export_transformer(trainer.engine, tmp / "transformer", save_dtype, info)
    if info.is_main:
        atomic_write_text(tmp / "trainer_state.json", json.dumps({
            "format_version": FORMAT_VERSION, "step": step + 1, "world_size": info.world_size,
            "engine": trainer.cfg.engine.kind, "skipped": trainer.state.skipped, "config": to_dict(trainer.cfg),
        }, indent=2))
    barrier(group)  # every file is written; each rank hashes its own
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    mine = {rel: _file_entry(tmp / rel) for rel in files if file_owner(rel, info.world_size) == info.rank}
    entries = all_gather_object(mine, group)
    if info.is_main:
        manifest = {rel: entry for part in entries for rel, entry in part.items()}
        for rel in files:  # a file its owner did not list (e.g. not yet visible on its node): hash it here
            manifest.setdefault(rel, _file_entry(tmp / rel))
        atomic_write_text(tmp / MARKER, json.dumps({"files": dict(sorted(manifest.items()))}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last:
            purge(out, keep_last)
    barrier(group)
    return final


def purge(output_dir: Path, keep_last: int) -> list[Path]:
    """Delete the resumable ``state/`` of all but the newest ``keep_last`` committed checkpoints.

    Their exported ``transformer/`` folders are kept for inference.
    """
    committed = sorted((p for p in output_dir.iterdir() if step_of(p) is not None and (p / "state").is_dir()
                        and (p / MARKER).is_file()), key=step_of)
    removed = []
    for path in committed[:-keep_last]:
        shutil.rmtree(path / "state")
        (path / MARKER).unlink()
        removed.append(path)
    return removed


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


def load(trainer, path: Path) -> None:
    """Restore the engine, scheduler, RNG and step from a committed checkpoint. Collective.

    Every rank verifies its own share of the files first (in parallel); any problem on any rank is
    raised on all of them.
    """
    from g2rpo.config import to_dict

    info, group = trainer.info, trainer.io_group
    problem, state = None, None
    try:
        state = verify(path, trainer.cfg.verify_checksums, info.rank, info.world_size)
        if info.is_main:
            check_compatible(state["config"], to_dict(trainer.cfg), state["world_size"], info.world_size,
                             trainer.cfg.engine.kind)
    except (ValueError, FileNotFoundError) as exc:
        problem = str(exc)
    problems = [p for p in all_gather_object(problem, group) if p]
    if problems:
        raise ValueError(problems[0])
    trainer.engine.load_state(path / "state", group)
    rng_file = path / "state" / f"rng_rank{info.rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    trainer.state.step = state["step"]
    trainer.state.skipped = state.get("skipped", 0)
    barrier(group)

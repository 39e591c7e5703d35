"""Base-model families and the loaders they share, from local diffusers folders.

One module per family (`g2rpo.models.flux`, `g2rpo.models.sd3`) holds everything model-specific
(g2rpo.models.base); `family` names one, `family_of` reads a pipeline folder's ``model_index.json``. The same
functions load the real weights and the tiny stand-ins. Nothing is fetched from the network: every call passes
``local_files_only=True``, and a missing folder or file is reported by name.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Construct modules directly in ``dtype`` (for weights that a load or a random init fills in anyway)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def require_folder(path: Path, marker: str, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {path}")
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{what}: {path} has no {marker}; expected a diffusers folder")
    return path


class SafetensorsFolder:
    """The tensors of a diffusers weights folder, read one tensor (or one row range) at a time.

    Reads ``<prefix>.safetensors`` or the shards named by ``<prefix>.safetensors.index.json`` (how
    FLUX.1-dev ships its transformer). Each read opens the file on its own, so the memory map -- and
    the pages it made resident -- is gone when the read returns: loading a model shard by shard never
    holds more of the file than the tensor being read.
    """

    def __init__(self, folder: str | Path, prefix: str = "diffusion_pytorch_model"):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        index, single = self.folder / f"{prefix}.safetensors.index.json", self.folder / f"{prefix}.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{index}: not a safetensors index (expected a 'weight_map'): {exc}") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            raise FileNotFoundError(f"{self.folder}: no {single.name} or {index.name}; expected a diffusers weights folder")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (listed in {index.name})")
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self.files[key] = path
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except SafetensorError as exc:
                raise ValueError(f"{path}: cannot read the safetensors header ({exc}); is the file complete?") from exc

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, or only its rows ``[start, end)`` along dim 0."""
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the weights")
        with safe_open(self.files[name], framework="pt") as f:
            if rows is None or not self.shapes[name]:
                return f.get_tensor(name)
            return f.get_slice(name)[rows[0]:rows[1]]

    def check_names(self, expected: list[str], what: str) -> None:
        """Raise naming the differences if the folder's tensors are not exactly ``expected``."""
        missing = [n for n in expected if n not in self.files]
        unexpected = sorted(set(self.files) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{what}: the weights in {self.folder} do not match the model: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})")


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers weights folder (single file or sharded), e.g. an exported transformer."""
    weights = SafetensorsFolder(folder)
    return {name: weights.read(name) for name in weights.files}


def release_memory() -> None:
    """Hand memory freed by loading back: Python's garbage, glibc's free lists (to the OS), CUDA's cache."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


def families() -> dict:
    """``{kind: ModelFamily}`` of every module of this package that defines ``FAMILY``."""
    global _FAMILIES
    if _FAMILIES is None:
        import importlib
        import pkgutil

        found = {}
        for module in pkgutil.iter_modules(__path__):
            if module.name != "base":
                family = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FAMILY", None)
                if family is not None:
                    found[family.kind] = family
        _FAMILIES = dict(sorted(found.items()))
    return _FAMILIES


_FAMILIES = None


def family(kind: str):
    """The family ``models.kind`` names."""
    known = families()
    if kind not in known:
        raise ValueError(f"models.kind={kind!r}: expected auto or one of {', '.join(known)}")
    return known[kind]


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc})") from None


def family_of(pipeline: str | Path, kind: str = "auto"):
    """The family of a diffusers pipeline folder: ``kind``, or with ``auto`` its ``model_index.json``'s class.
    A folder of another family than the one named is refused."""
    index = require_folder(Path(pipeline), "model_index.json", "base-model pipeline") / "model_index.json"
    name = read_json(index, "pipeline index").get("_class_name")
    by_class = {f.pipeline_class: f for f in families().values()}
    if kind == "auto":
        if name not in by_class:
            raise ValueError(f"{index}: pipeline class {name!r} is not a supported base model (supported: "
                             f"{', '.join(by_class)}); set models.kind or add a family (docs/models.md)")
        return by_class[name]
    chosen = family(kind)
    if name != chosen.pipeline_class:
        raise ValueError(f"{index}: a {name} folder, but models.kind={kind} expects a {chosen.pipeline_class}")
    return chosen


def transformer_family(folder: str | Path):
    """The family of a transformer folder (a pipeline's ``transformer/`` or an exported one), from its config."""
    config = require_folder(Path(folder), "config.json", "transformer") / "config.json"
    name = read_json(config, "transformer config").get("_class_name")
    for f in families().values():
        if f.transformer_class == name:
            return f
    raise ValueError(f"{config}: transformer class {name!r} is not a supported base model "
                     f"({', '.join(f.transformer_class for f in families().values())})")


def model_family(model):
    """The family of a transformer module (its class)."""
    for f in families().values():
        if type(model).__name__ == f.transformer_class:
            return f
    raise ValueError(f"{type(model).__name__}: not the transformer of a supported base model")


def load_transformer(path: str | Path, dtype: str | torch.dtype = torch.float32, subfolder: str | None = None):
    """Load a transformer (its family's diffusers class) from a pipeline folder (``subfolder="transformer"``) or
    its own folder."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    cls = transformer_family(folder).transformer_cls()
    return cls.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)


def transformer_config(pipeline: str | Path) -> dict:
    """A pipeline's ``transformer/config.json``, read alone (no weights)."""
    folder = require_folder(Path(pipeline) / "transformer", "config.json", "transformer")
    return read_json(folder / "config.json", "transformer config")


def transformer_dims(pipeline: str | Path) -> tuple[int, int]:
    """``(joint_attention_dim, pooled_projection_dim)`` of a pipeline's transformer, from its config.json alone."""
    config = transformer_config(pipeline)
    return config["joint_attention_dim"], config["pooled_projection_dim"]


def load_vae(path: str | Path, dtype: str | torch.dtype = torch.float32):
    """Load a pipeline's VAE (``AutoencoderKL``)."""
    from diffusers import AutoencoderKL

    folder = require_folder(Path(path) / "vae", "config.json", "VAE")
    return AutoencoderKL.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)


def load_pipeline(path: str | Path, dtype: str | torch.dtype = torch.float32, transformer_path=None, lora_path=None,
                  kind: str = "auto"):
    """The pipeline of the folder's family (`ModelFamily.load_pipeline`)."""
    return family_of(path, kind).load_pipeline(path, dtype, transformer_path, lora_path)

"""Loading the FLUX pipeline and its parts from local diffusers folders.

The same functions load ``ckpt/flux`` (FLUX.1-dev, downloaded) and ``ckpt/tiny/flux`` (built by
``scripts/prepare_tiny_checkpoints.py``). Nothing is fetched from the network: every call passes
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


def _require(path: Path, marker: str, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {path}")
    if not (path / marker).is_file():
        raise FileNotFoundError(f"{what}: {path} has no {marker}; expected a diffusers folder")
    return path


def load_transformer(path: str | Path, dtype: str | torch.dtype = torch.float32, subfolder: str | None = None):
    """Load a ``FluxTransformer2DModel`` from a pipeline folder (``subfolder="transformer"``) or its own folder."""
    from diffusers import FluxTransformer2DModel

    folder = Path(path) / subfolder if subfolder else Path(path)
    _require(folder, "config.json", "FLUX transformer")
    return FluxTransformer2DModel.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)


def transformer_dims(pipeline: str | Path) -> tuple[int, int]:
    """``(joint_attention_dim, pooled_projection_dim)`` of a pipeline's transformer, from its config.json alone."""
    folder = _require(Path(pipeline) / "transformer", "config.json", "FLUX transformer")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config["joint_attention_dim"], config["pooled_projection_dim"]


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


def load_vae(path: str | Path, dtype: str | torch.dtype = torch.float32):
    """Load the FLUX VAE (``AutoencoderKL``) from a pipeline folder."""
    from diffusers import AutoencoderKL

    folder = _require(Path(path) / "vae", "config.json", "FLUX VAE")
    return AutoencoderKL.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)


def load_flux_pipeline(path: str | Path, dtype: str | torch.dtype = torch.float32, transformer_path: str | Path | None = None,
                       lora_path: str | Path | None = None):
    """Load a ``FluxPipeline``; ``transformer_path`` swaps in a trained transformer folder, ``lora_path`` adds a
    trained LoRA (a checkpoint's ``lora/``: diffusers' ``load_lora_weights``, unfused)."""
    from diffusers import FluxPipeline

    folder = _require(Path(path), "model_index.json", "FLUX pipeline")
    kwargs = {}
    if transformer_path is not None:
        kwargs["transformer"] = load_transformer(transformer_path, dtype)
    pipe = FluxPipeline.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True, **kwargs)
    if lora_path is not None:
        from g2rpo.lora import WEIGHTS_NAME

        _require(Path(lora_path), WEIGHTS_NAME, "LoRA")
        pipe.load_lora_weights(str(lora_path), weight_name=WEIGHTS_NAME, local_files_only=True)
    return pipe


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


def load_text_encoders(path: str | Path, dtype: str | torch.dtype = torch.float32):
    """A ``FluxPipeline`` holding only the CLIP and T5 text encoders and their tokenizers (no transformer,
    no VAE): what ``encode_prompt`` needs, without reading the 23.8 GB transformer."""
    from diffusers import FluxPipeline

    folder = _require(Path(path), "model_index.json", "FLUX pipeline")
    return FluxPipeline.from_pretrained(folder, transformer=None, vae=None, dtype=resolve_dtype(dtype),
                                        local_files_only=True)


def decode_latents(vae, packed: torch.Tensor, height: int, width: int, batch_size: int = 16) -> torch.Tensor:
    """Packed FLUX latents ``[M, tokens, 64]`` -> images ``[M, 3, height, width]``, float32 in [0, 1].

    The latent normalisation comes from the VAE config (``z / scaling_factor + shift_factor``;
    0.3611 and 0.1159 for FLUX.1-dev). Decodes in chunks of ``batch_size`` in the VAE's dtype.
    """
    from g2rpo.flow import unpack_latents

    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    images = []
    with torch.no_grad():
        for chunk in packed.split(batch_size):
            latents = unpack_latents(chunk.float(), height // 8, width // 8) / scale + shift
            decoded = vae.decode(latents.to(device, dtype), return_dict=False)[0]
            images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)

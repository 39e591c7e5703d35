"""Loading the FLUX pipeline and its parts from local diffusers folders.

The same functions load ``ckpt/flux`` (FLUX.1-dev, downloaded) and ``ckpt/tiny/flux`` (built by
``scripts/prepare_tiny_checkpoints.py``). Nothing is fetched from the network: every call passes
``local_files_only=True``, and a missing folder or file is reported by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


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


def load_vae(path: str | Path, dtype: str | torch.dtype = torch.float32):
    """Load the FLUX VAE (``AutoencoderKL``) from a pipeline folder."""
    from diffusers import AutoencoderKL

    folder = _require(Path(path) / "vae", "config.json", "FLUX VAE")
    return AutoencoderKL.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True)


def load_flux_pipeline(path: str | Path, dtype: str | torch.dtype = torch.float32, transformer_path: str | Path | None = None):
    """Load a ``FluxPipeline``; ``transformer_path`` swaps in a trained transformer folder."""
    from diffusers import FluxPipeline

    folder = _require(Path(path), "model_index.json", "FLUX pipeline")
    kwargs = {}
    if transformer_path is not None:
        kwargs["transformer"] = load_transformer(transformer_path, dtype)
    return FluxPipeline.from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True, **kwargs)


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

"""LoRA on the base model's transformer (``lora.rank > 0``): peft's adapters, trained under FSDP2, exported for diffusers.

* The adapters are peft's (``<transformer>.add_adapter(peft.LoraConfig)``), added on the meta device
  before sharding, so the base weights are read once from the diffusers safetensors as before
  (`LoraSource` maps ``<layer>.base_layer.weight`` to ``<layer>.weight``). Only the adapters train; the frozen
  base is stored in the compute dtype (bf16 under ``mixed_precision: bf16``), the adapters in fp32 with their
  AdamW state.
* Initialisation is peft's default, made independent of the sharding: ``lora_A`` uniform in ±1/sqrt(fan_in)
  (``kaiming_uniform_(a=√5)``), drawn per tensor from ``seed`` and its name; ``lora_B`` zeros, so at step 0
  the model is exactly the base.
* The forward is ``W x + (alpha / rank) · B A x`` for every targeted linear layer (`merged_weight`); rollouts
  run the adapter model itself (gathered like the full model; no merged copy).
* A checkpoint holds the adapters and their optimiser state only (the base is the pipeline's), and exports
  them as ``lora/pytorch_lora_weights.safetensors`` in diffusers' format with their rank and alpha
  (the family pipeline's ``load_lora_weights`` reads it; `write_lora_folder`); ``lora.export_merged`` also writes the
  merged ``transformer/``.
* The frozen reference of ``ppo.kl_beta`` is the same model with its adapters disabled: no second model.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from pathlib import Path

import torch

ADAPTER = "default"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def peft_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0,
                      init_lora_weights=True)


def add_lora(model: torch.nn.Module, cfg) -> None:
    """peft's adapters on ``model`` (meta or real); only they require gradients. Raises naming the targets if none
    matched."""
    try:
        model.add_adapter(peft_config(cfg), adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        from g2rpo.models import model_family

        raise ValueError(f"lora.target_modules={list(cfg.target_modules)}: no layer of the "
                         f"{model_family(model).title} transformer matched "
                         f"({exc})") from None
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora(name))


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model: every adapter layer skipped while inside. Only peft's flag is set -- its own
    ``disable_adapters()`` also clears the adapters' ``requires_grad``, which FSDP2 copies once into the unsharded
    parameters (a unit first gathered inside would train no more)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._disable_adapters = False


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The diffusers name of a parameter of the adapter model (``to_q.base_layer.weight`` -> ``to_q.weight``)."""
    return name.replace(".base_layer.", ".")


def diffusers_name(name: str) -> str:
    """peft's ``...to_q.lora_A.default.weight`` as diffusers' LoRA files name it (``...to_q.lora_A.weight``)."""
    return name.replace(f".{ADAPTER}.", ".")


def initial_value(name: str, shape: tuple[int, ...], seed: int, init: str = "kaiming") -> torch.Tensor:
    """peft's initialisation of an adapter tensor, the same on every rank and for any sharding: ``lora_B`` zeros;
    ``lora_A`` peft's default (``kaiming``: uniform in ±1/sqrt(fan_in)) or ``gaussian`` (N(0, 1/rank²), peft's
    ``init_lora_weights="gaussian"``, what Flow-GRPO's SD3 trainer uses)."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if init == "gaussian":
        return torch.empty(shape).normal_(0.0, 1.0 / shape[0], generator=generator)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) x sqrt(3 / fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class LoraSource:
    """What `g2rpo.engine`'s fill reads for the adapter model: the base tensors from the diffusers weights under
    their own names, the adapters from `initial_value`."""

    def __init__(self, weights, shapes: dict[str, tuple[int, ...]], seed: int, init: str = "kaiming"):
        self.weights, self.seed, self.init = weights, seed, init
        self.adapter_shapes = {n: s for n, s in shapes.items() if is_lora(n)}
        self.files = {n: weights.files.get(base_name(n), "(LoRA initialisation)") for n in shapes}
        self.shapes = {n: weights.shapes.get(base_name(n), s) for n, s in shapes.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.adapter_shapes:
            value = initial_value(name, self.adapter_shapes[name], self.seed, self.init)
            return value if rows is None else value[rows[0]:rows[1]]
        return self.weights.read(base_name(name), rows)

    def check_names(self, expected: list[str], what: str) -> None:
        self.weights.check_names([base_name(n) for n in expected if not is_lora(n)], what)


def scale(cfg) -> float:
    return cfg.alpha / cfg.rank


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, factor: float) -> torch.Tensor:
    """``W + factor · B A`` (in fp32, returned in W's dtype)."""
    return (weight.float() + factor * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def adapter_metadata(cfg) -> dict:
    """What diffusers needs besides the tensors to rebuild the adapters (rank, alpha, targets)."""
    return {"r": cfg.rank, "lora_alpha": cfg.alpha, "target_modules": sorted(cfg.target_modules),
            "lora_dropout": 0.0, "bias": "none"}


def write_lora_folder(folder: Path, adapters: dict[str, torch.Tensor], cfg, family) -> None:
    """``adapters`` (peft names, full tensors) as the ``family`` pipeline's diffusers LoRA file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    family.pipeline_cls().save_lora_weights(folder, transformer_lora_layers={diffusers_name(n): t for n, t in adapters.items()},
                                   weight_name=WEIGHTS_NAME, transformer_lora_adapter_metadata=adapter_metadata(cfg))

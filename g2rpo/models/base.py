"""What a base-model family is to the trainer: `ModelFamily` (one instance per module of this package) and
`Conditioning` (one prompt's precomputed text conditioning, which knows its family).

The sampler math (g2rpo.flow) works on latents of any shape ``[B, ...]``; everything that depends on the model
lives behind this interface:

| the trainer needs | `ModelFamily` member |
|---|---|
| the pipeline folder and its classes | ``pipeline_class``, ``transformer_class``, `load_pipeline`, `load_text_encoders` |
| the embedding files | `encode`, ``embedding_keys``, `check_layout`, `conditioning`, ``negative`` |
| one velocity evaluation | `velocity` (with classifier-free guidance where the family needs it) |
| the latent layout | `latent_shape`, `start_noise` (drawn as the family's own pipeline draws it), `decode` |
| the engine | ``block_classes`` (the FSDP units), ``lora_targets`` |
| the tiny stand-in | `build_tiny` |
| inference | `pipeline_kwargs` |

A family's module defines ``FAMILY = <its ModelFamily>``; g2rpo.models finds every such module of this package
(docs/models.md, "Adding a model family").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass
class Conditioning:
    """One prompt's text conditioning: a dataclass of tensors, the fields of its family's embedding file. The
    subclass of each family sets ``family``."""

    family = None  # the ModelFamily these tensors condition

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device) -> "Conditioning":
        return type(self)(**{name: t.to(device) for name, t in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def validate(self, policy=None) -> None:
        """Shapes against each other and, given the ``policy``, against its config; raises naming the tensor."""
        config = getattr(policy, "config", None)
        shapes = {name: tuple(t.shape) for name, t in self.tensors().items()}
        floats = {name: t.is_floating_point() for name, t in self.tensors().items()}
        self.family.check_layout(shapes, floats, "conditioning", dict(config) if config is not None else None)


class ModelFamily:
    """The model-specific half of the trainer for one family of diffusers pipelines (see the module table)."""

    kind: str = ""  # models.kind
    title: str = ""  # for messages: "FLUX.1", "SD3.5"
    pipeline_class: str = ""  # model_index.json's _class_name
    transformer_class: str = ""  # transformer/config.json's _class_name
    block_classes: tuple[str, ...] = ()  # "diffusers.module:Class" of each FSDP unit
    lora_targets: tuple[str, ...] = ()  # peft name suffixes of the default adapted layers
    text_parts: tuple[str, ...] = ()  # the pipeline subfolders that decide the embeddings
    embedding_keys: tuple[str, ...] = ()  # the tensors of one embedding file
    negative: bool = False  # the embeddings come with the empty prompt's (negative.safetensors)
    max_sequence_length: int = 512  # T5 tokens of an embedding file
    default_guidance: float = 1.0  # sampling.guidance of the family's recipes
    paper_table: str = "g2rpo"  # the paper whose table the evaluation prints beside ours (g2rpo.evaluation)
    conditioning_class: type = Conditioning

    # ---------------------------------------------------------------- classes and loaders

    def _diffusers(self, name: str):
        import diffusers

        return getattr(diffusers, name)

    def pipeline_cls(self):
        return self._diffusers(self.pipeline_class)

    def transformer_cls(self):
        return self._diffusers(self.transformer_class)

    def blocks(self) -> tuple[type, ...]:
        import importlib

        classes = []
        for spec in self.block_classes:
            module, name = spec.split(":")
            classes.append(getattr(importlib.import_module(module), name))
        return tuple(classes)

    def load_pipeline(self, path: str | Path, dtype=torch.float32, transformer_path: str | Path | None = None,
                      lora_path: str | Path | None = None):
        """The family's diffusers pipeline; ``transformer_path`` swaps in a trained transformer folder, ``lora_path``
        adds a trained LoRA (a checkpoint's ``lora/``: diffusers' ``load_lora_weights``, unfused)."""
        from g2rpo.models import load_transformer, require_folder, resolve_dtype

        folder = require_folder(Path(path), "model_index.json", f"{self.title} pipeline")
        kwargs = {}
        if transformer_path is not None:
            kwargs["transformer"] = load_transformer(transformer_path, dtype)
        pipe = self.pipeline_cls().from_pretrained(folder, dtype=resolve_dtype(dtype), local_files_only=True, **kwargs)
        if lora_path is not None:
            from g2rpo.lora import WEIGHTS_NAME

            require_folder(Path(lora_path), WEIGHTS_NAME, "LoRA")
            pipe.load_lora_weights(str(lora_path), weight_name=WEIGHTS_NAME, local_files_only=True)
        return pipe

    def load_text_encoders(self, path: str | Path, dtype=torch.float32):
        """The pipeline holding only its text encoders and tokenizers: what `encode` needs, without reading the
        transformer or the VAE."""
        from g2rpo.models import require_folder, resolve_dtype

        folder = require_folder(Path(path), "model_index.json", f"{self.title} pipeline")
        return self.pipeline_cls().from_pretrained(folder, transformer=None, vae=None, dtype=resolve_dtype(dtype),
                                                   local_files_only=True)

    # ---------------------------------------------------------------- embeddings

    def encode(self, pipe, prompts: list[str], device, max_sequence_length: int) -> list[dict[str, torch.Tensor]]:
        """One dict of ``embedding_keys`` tensors (on the CPU) per prompt."""
        raise NotImplementedError

    def sequence_length(self, max_sequence_length: int) -> int:
        """Text positions of an embedding file encoded with ``max_sequence_length`` T5 tokens."""
        return max_sequence_length

    def token_counters(self, pipe) -> dict:
        """``{encoder name: (tokenizer, its token limit or None for max_sequence_length)}`` for the truncation
        report of preprocessing."""
        raise NotImplementedError

    def check_layout(self, shapes: dict, floats: dict, where: str, config: dict | None) -> None:
        """Keys, ranks, matching lengths, floating dtypes and (given the transformer ``config``) the model's widths of
        one embedding, from its tensors' shapes; raises naming ``where``."""
        raise NotImplementedError

    def conditioning(self, tensors: dict, negative: dict | None = None) -> Conditioning:
        """A prompt's conditioning from its embedding file's tensors (and the empty prompt's, where ``negative``)."""
        return self.conditioning_class(**{k: tensors[k] for k in self.embedding_keys})

    # ---------------------------------------------------------------- sampling

    def latent_shape(self, config: dict, height: int, width: int) -> tuple[int, ...]:
        """The shape of one sample's latent as the sampler carries it (no batch dim)."""
        raise NotImplementedError

    def start_noise(self, generator: torch.Generator, config: dict, height: int, width: int) -> torch.Tensor:
        """One start latent ``[1, *latent_shape]`` in float32, drawn as the family's pipeline draws it."""
        raise NotImplementedError

    def sampling_inputs(self, height: int, width: int, device) -> dict:
        """What every `velocity` call at one resolution reads besides the latents (FLUX: its image position ids),
        made once per sampler."""
        return {}

    def velocity(self, policy, cond: Conditioning, latents: torch.Tensor, timestep: torch.Tensor, guidance: float,
                 dtype: torch.dtype, inputs: dict) -> torch.Tensor:
        """The model output ``[B, *latent_shape]`` the sampler steps with, at ``timestep`` (0-d or ``[B]``: σ, or its
        quantised value, in [0, 1]), computed in ``dtype``: one forward of ``policy`` (two rows per sample under
        classifier-free guidance). ``inputs``: `sampling_inputs`."""
        raise NotImplementedError

    def rows_per_sample(self, guidance: float) -> int:
        """Transformer rows per sample of one `velocity` call (2 under classifier-free guidance)."""
        return 1

    def decode(self, vae, latents: torch.Tensor, height: int, width: int, batch_size: int = 16) -> torch.Tensor:
        """Latents ``[M, *latent_shape]`` -> images ``[M, 3, height, width]``, float32 in [0, 1], decoded in chunks
        of ``batch_size`` in the VAE's dtype (``z / scaling_factor + shift_factor`` from the VAE config)."""
        scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
        dtype = next(vae.parameters()).dtype
        device = next(vae.parameters()).device
        images = []
        with torch.no_grad():
            for chunk in latents.split(batch_size):
                z = self.vae_latents(chunk.float(), height, width) / scale + shift
                decoded = vae.decode(z.to(device, dtype), return_dict=False)[0]
                images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The sampler's latents ``[M, *latent_shape]`` in the VAE's ``[M, C, H/8, W/8]`` layout."""
        return latents

    def pipeline_kwargs(self, guidance: float) -> dict:
        """The keyword arguments of the family's pipeline call for ``guidance`` (inference, evaluation)."""
        return {"guidance_scale": guidance}

    # ---------------------------------------------------------------- the tiny stand-in

    def build_tiny(self, directory: Path, prompts: list[str], seed: int) -> None:
        """Write a tiny random pipeline folder of this family, in the real layout, to ``directory``."""
        raise NotImplementedError


def check_sequence_and_pooled(shapes: dict, floats: dict, where: str, config: dict | None, keys: tuple[str, ...],
                              pairs: tuple[tuple[str, str], ...] = ()) -> None:
    """The layout rule FLUX and SD3 share: ``keys`` present; ``prompt_embeds``-like tensors ``[S, D]`` and pooled
    ones ``[P]`` (each pair in ``pairs``: a sequence and its pooled embedding), floating point, and their widths
    those of the transformer ``config`` (joint_attention_dim, pooled_projection_dim)."""
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing)}; expected {', '.join(keys)}")
    for sequence, pooled in pairs:
        embeds, vector = tuple(shapes[sequence]), tuple(shapes[pooled])
        if len(embeds) != 2 or len(vector) != 1:
            raise ValueError(f"{where}: shapes {sequence} {embeds}, {pooled} {vector}; expected [S, D], [P]")
        if not (floats[sequence] and floats[pooled]):
            raise ValueError(f"{where}: embeddings must be floating point")
        if config is not None and "joint_attention_dim" in config and \
                (embeds[1], vector[0]) != (config["joint_attention_dim"], config["pooled_projection_dim"]):
            raise ValueError(f"{where}: embedding dims (D={embeds[1]}, P={vector[0]}) do not match the "
                             f"transformer (joint_attention_dim={config['joint_attention_dim']}, "
                             f"pooled_projection_dim={config['pooled_projection_dim']})")

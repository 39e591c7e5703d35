"""FLUX.1 (``FluxPipeline`` / ``FluxTransformer2DModel``): black-forest-labs/FLUX.1-dev and its tiny stand-in.

* Text: CLIP-L's pooled embedding ``[768]`` and T5-XXL's sequence ``[512, 4096]`` with its position ids
  ``text_ids [512, 3]`` (`PromptEmbedding`, one embedding file per prompt).
* Guidance is distilled: the scale is an input of the transformer (``guidance``), one forward per sample.
* Latents are "packed": 16 VAE channels x 2x2 patches per token, ``[tokens, 64]`` (`pack_latents`), with the
  image position ids ``(0, row, col)`` of each token (`latent_image_ids`); the start noise is drawn in the
  unpacked ``[1, 16, H/8, W/8]`` layout and packed, as ``FluxPipeline`` does.
* The timestep input is σ in [0, 1] (the transformer scales it by 1000 itself).
* FSDP units: the 19 double-stream and 38 single-stream blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from g2rpo.models.base import Conditioning, ModelFamily, check_sequence_and_pooled


# --------------------------------------------------------------------------------------------
# Latent layout
# --------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` VAE latents -> ``[B, (H/2)·(W/2), 4C]`` tokens of 2×2 patches (FLUX layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width {h}x{w} must be even to pack 2x2 patches")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`; ``height``/``width`` are the *latent* (VAE) sizes."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit latent size {height}x{width}")
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids ``[(H/2)·(W/2), 3]`` = ``(0, row, col)`` of each packed token; sizes are latent sizes."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


# --------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------


@dataclass
class PromptEmbedding(Conditioning):
    """One prompt's precomputed FLUX text conditioning."""

    prompt_embeds: torch.Tensor  # [S, D] T5 sequence (S = 512 for FLUX.1-dev)
    pooled_prompt_embeds: torch.Tensor  # [P] pooled CLIP embedding
    text_ids: torch.Tensor  # [S, 3]

    @classmethod
    def from_batched(cls, prompt_embeds, pooled_prompt_embeds, text_ids):
        """Accept the pipeline's batched shapes ``[1, S, D]``, ``[1, P]`` as well."""
        if prompt_embeds.dim() == 3 and prompt_embeds.shape[0] == 1:
            prompt_embeds = prompt_embeds[0]
        if pooled_prompt_embeds.dim() == 2 and pooled_prompt_embeds.shape[0] == 1:
            pooled_prompt_embeds = pooled_prompt_embeds[0]
        return cls(prompt_embeds, pooled_prompt_embeds, text_ids)

    def validate(self, policy=None) -> None:
        s = self.prompt_embeds.shape
        if self.prompt_embeds.dim() != 2:
            raise ValueError(f"prompt_embeds must be [seq, dim], got {tuple(s)}")
        if self.pooled_prompt_embeds.dim() != 1:
            raise ValueError(f"pooled_prompt_embeds must be [dim], got {tuple(self.pooled_prompt_embeds.shape)}")
        if self.text_ids.shape != (s[0], 3):
            raise ValueError(f"text_ids must be [{s[0]}, 3] to match prompt_embeds {tuple(s)}, "
                             f"got {tuple(self.text_ids.shape)}")
        config = getattr(policy, "config", None)
        if config is not None:
            if "joint_attention_dim" in config and s[1] != config["joint_attention_dim"]:
                raise ValueError(f"prompt_embeds dim {s[1]} != transformer joint_attention_dim "
                                 f"{config['joint_attention_dim']}")
            pooled = self.pooled_prompt_embeds.shape[0]
            if "pooled_projection_dim" in config and pooled != config["pooled_projection_dim"]:
                raise ValueError(f"pooled_prompt_embeds dim {pooled} != transformer pooled_projection_dim "
                                 f"{config['pooled_projection_dim']}")


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


class FluxFamily(ModelFamily):
    kind = "flux"
    title = "FLUX"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    block_classes = ("diffusers.models.transformers.transformer_flux:FluxTransformerBlock",
                     "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock")
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")
    text_parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    embedding_keys = ("prompt_embeds", "pooled_prompt_embeds", "text_ids")
    max_sequence_length = 512
    default_guidance = 3.5
    conditioning_class = PromptEmbedding

    def encode(self, pipe, prompts, device, max_sequence_length):
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device=device,
                                                      max_sequence_length=max_sequence_length)
        return [{"prompt_embeds": embeds[row].cpu(), "pooled_prompt_embeds": pooled[row].cpu(),
                 "text_ids": text_ids.cpu()} for row in range(len(prompts))]

    def token_counters(self, pipe):
        return {"CLIP": (pipe.tokenizer, pipe.tokenizer_max_length), "T5": (pipe.tokenizer_2, None)}

    def check_layout(self, shapes, floats, where, config):
        missing = [k for k in self.embedding_keys if k not in shapes]
        if missing:
            raise ValueError(f"{where}: missing tensor(s) {', '.join(missing)}; expected {', '.join(self.embedding_keys)}")
        embeds, pooled, ids = (tuple(shapes[k]) for k in self.embedding_keys)
        if len(embeds) != 2 or len(pooled) != 1 or len(ids) != 2 or ids != (embeds[0], 3):
            raise ValueError(f"{where}: shapes prompt_embeds {embeds}, pooled_prompt_embeds {pooled}, text_ids {ids}; "
                             f"expected [S, D], [P], [S, 3]")
        check_sequence_and_pooled(shapes, floats, where, config, self.embedding_keys,
                                  (("prompt_embeds", "pooled_prompt_embeds"),))

    def latent_shape(self, config, height, width):
        return ((height // 16) * (width // 16), config.get("in_channels", 64))

    def start_noise(self, generator, config, height, width):
        channels = config.get("in_channels", 64)
        return pack_latents(torch.randn((1, channels // 4, height // 8, width // 8), generator=generator,
                                        dtype=torch.float32))

    def sampling_inputs(self, height, width, device):
        return {"img_ids": latent_image_ids(height // 8, width // 8, device=device)}

    def velocity(self, policy, cond, latents, timestep, guidance, dtype, inputs):
        b = latents.shape[0]
        return policy(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype).expand(b, -1, -1),
            pooled_projections=cond.pooled_prompt_embeds.to(dtype).expand(b, -1),
            timestep=timestep.to(latents.device, dtype).expand(b),
            img_ids=inputs["img_ids"],
            txt_ids=cond.text_ids,
            guidance=torch.full((b,), guidance, device=latents.device, dtype=dtype),
            return_dict=False,
        )[0]

    def vae_latents(self, latents, height, width):
        return unpack_latents(latents, height // 8, width // 8)

    def build_tiny(self, directory, prompts, seed):
        from g2rpo.tiny import build_tiny_flux_pipeline, write_pipeline

        write_pipeline(build_tiny_flux_pipeline(prompts, seed), directory)


FAMILY = FluxFamily()
PromptEmbedding.family = FAMILY


def load_flux_pipeline(path: str | Path, dtype=torch.float32, transformer_path=None, lora_path=None):
    """``FAMILY.load_pipeline``: a ``FluxPipeline``, optionally with a trained transformer folder or LoRA."""
    return FAMILY.load_pipeline(path, dtype, transformer_path, lora_path)

"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` / ``SD3Transformer2DModel``):
stabilityai/stable-diffusion-3.5-medium, the method family's shared benchmark model, and its tiny stand-in.

* Text: three encoders. CLIP-L's and CLIP-G's token states (their penultimate layer, 77 positions) side by side,
  zero-padded to T5's width and followed by T5-XXL's ``L`` positions: ``prompt_embeds [77 + L, 4096]``; their
  two pooled projections side by side: ``pooled_prompt_embeds [2048]`` (`SD3Embedding`). Flow-GRPO encodes with
  ``L = 128`` (diffusers' default is 256). The empty prompt's conditioning is stored once per embedding folder
  (``negative.safetensors``) and joins every prompt's.
* Classifier-free guidance, as Flow-GRPO trains SD3.5: the unconditional and the conditional rows in one batched
  forward, ``[empty prompt; prompt]``, ``v = v_u + g·(v_c − v_u)`` -- in sampling and in the training forward that
  gives the new log-prob. ``guidance <= 1`` (Flow-GRPO's later no-CFG recipes): one conditional forward.
* Latents stay in the VAE's layout ``[16, H/8, W/8]`` (the transformer patchifies them itself); the start noise
  is a plain Gaussian of that shape, as ``StableDiffusion3Pipeline.prepare_latents`` draws it.
* The timestep input is σ·1000 (the scheduler's timesteps), unrounded with ``sampling.timestep: exact``.
* FSDP units: the joint (MMDiT / MMDiT-X) blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g2rpo.models.base import Conditioning, ModelFamily, check_sequence_and_pooled

CLIP_TOKENS = 77


@dataclass
class SD3Embedding(Conditioning):
    """One prompt's SD3 conditioning, with the empty prompt's beside it (classifier-free guidance)."""

    prompt_embeds: torch.Tensor  # [77 + L, D]
    pooled_prompt_embeds: torch.Tensor  # [P]
    negative_prompt_embeds: torch.Tensor  # [77 + L, D]: the empty prompt's
    negative_pooled_prompt_embeds: torch.Tensor  # [P]


class SD3Family(ModelFamily):
    kind = "sd3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    block_classes = ("diffusers.models.attention:JointTransformerBlock",)
    # Flow-GRPO's SD3 LoRA targets: every projection of the joint attention (not attn2 of the MMDiT-X blocks)
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    embedding_keys = ("prompt_embeds", "pooled_prompt_embeds")
    negative = True
    max_sequence_length = 128  # Flow-GRPO's T5 length for SD3.5
    default_guidance = 4.5
    paper_table = "densegrpo"
    conditioning_class = SD3Embedding

    def encode(self, pipe, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
        return [{"prompt_embeds": embeds[row].cpu(), "pooled_prompt_embeds": pooled[row].cpu()}
                for row in range(len(prompts))]

    def sequence_length(self, max_sequence_length):
        return CLIP_TOKENS + max_sequence_length

    def token_counters(self, pipe):
        return {"CLIP": (pipe.tokenizer, pipe.tokenizer_max_length), "T5": (pipe.tokenizer_3, None)}

    def check_layout(self, shapes, floats, where, config):
        keys = tuple(shapes) if "negative_prompt_embeds" in shapes else self.embedding_keys
        pairs = [("prompt_embeds", "pooled_prompt_embeds")]
        if "negative_prompt_embeds" in shapes:
            pairs.append(("negative_prompt_embeds", "negative_pooled_prompt_embeds"))
        check_sequence_and_pooled(shapes, floats, where, config, keys, tuple(pairs))
        if len(pairs) == 2 and tuple(shapes["negative_prompt_embeds"]) != tuple(shapes["prompt_embeds"]):
            raise ValueError(f"{where}: negative_prompt_embeds {tuple(shapes['negative_prompt_embeds'])} and "
                             f"prompt_embeds {tuple(shapes['prompt_embeds'])} must have one length (one "
                             f"max_sequence_length)")

    def conditioning(self, tensors, negative=None):
        if negative is None:
            raise ValueError("SD3 conditioning needs the empty prompt's embedding (negative.safetensors)")
        return SD3Embedding(tensors["prompt_embeds"], tensors["pooled_prompt_embeds"], negative["prompt_embeds"],
                            negative["pooled_prompt_embeds"])

    def latent_shape(self, config, height, width):
        return (config.get("in_channels", 16), height // 8, width // 8)

    def start_noise(self, generator, config, height, width):
        return torch.randn((1, *self.latent_shape(config, height, width)), generator=generator, dtype=torch.float32)

    def rows_per_sample(self, guidance):
        return 2 if guidance > 1 else 1

    def velocity(self, policy, cond, latents, timestep, guidance, dtype, inputs):
        b = latents.shape[0]
        t = (timestep.float() * 1000).to(latents.device).expand(b)  # the scheduler's timesteps, σ·1000
        text, pooled = cond.prompt_embeds.to(dtype), cond.pooled_prompt_embeds.to(dtype)
        if guidance <= 1:
            return policy(hidden_states=latents.to(dtype), timestep=t, encoder_hidden_states=text.expand(b, -1, -1),
                          pooled_projections=pooled.expand(b, -1), return_dict=False)[0]
        x = latents.to(dtype)
        out = policy(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([cond.negative_prompt_embeds.to(dtype).expand(b, -1, -1),
                                             text.expand(b, -1, -1)]),
            pooled_projections=torch.cat([cond.negative_pooled_prompt_embeds.to(dtype).expand(b, -1),
                                          pooled.expand(b, -1)]),
            return_dict=False,
        )[0]
        unconditional, conditional = out.chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    def pipeline_kwargs(self, guidance):
        return {"guidance_scale": guidance, "max_sequence_length": self.max_sequence_length}

    def build_tiny(self, directory, prompts, seed):
        from g2rpo.tiny import build_tiny_sd3_pipeline, write_pipeline

        write_pipeline(build_tiny_sd3_pipeline(prompts, seed), directory)


FAMILY = SD3Family()
SD3Embedding.family = FAMILY

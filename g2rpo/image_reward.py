"""ImageReward v1.0 (THUDM; evaluation only) on transformers' BLIP classes, read from the released files.

The released ``ImageReward.pt`` is the state dict of BLIP's ViT (``blip.visual_encoder.*``, timm-style names),
its text encoder with cross-attention to the image (``blip.text_encoder.*``, BERT names, configured by
``med_config.json``) and a 5-layer linear head (``mlp.layers.*``). Its own package pins timm 0.6 and
fairscale and does not import on transformers 5, so the same weights are mapped onto `BlipVisionModel`
and `BlipTextModel` (names: `to_transformers_names`). Score of (prompt, image), as the package computes it:

1. the image: bicubic resize of the shorter side to the ViT's input (224), centre crop, RGB, CLIP mean/std;
2. the prompt: BERT's uncased tokenizer with BLIP's two extra tokens ([DEC], [ENC]), padded to 35;
3. ``h = text_encoder(prompt, cross-attending to ViT(image))[:, 0]``, ``r = mlp(h)``,
   ``(r − 0.16717362830052426) / 1.0333394966054072``.

The ViT's size is read from the checkpoint's shapes (BLIP's ViTs have 64-wide heads: ViT-L/16 at 224 for
v1.0), the text encoder's from ``med_config.json``. tests/test_reward_loaders.py checks the scores against
the package's own BLIP code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward v1.0's reward normalisation
MAX_LENGTH = 35  # the package pads and truncates prompts to 35 tokens
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
UNUSED = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections: in the file, not in the score

# (released ViT name, transformers' BlipVisionModel name); {i}: a block index
VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),
    ("norm.", "post_layernorm."),
]
MLP_LAYERS = (0, 2, 4, 6, 7)  # the Linear layers of the head's Sequential (dropouts between the first four)


def _rename(name: str, released_to_transformers: bool = True) -> str | None:
    """``name`` under `VISION_NAMES` (either way), or None where no entry matches. An entry ending in "." is a
    prefix (the rest of the name is kept), any other one a whole name."""
    for released, ours in VISION_NAMES:
        source, target = (released, ours) if released_to_transformers else (ours, released)
        pattern = re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)") + ("" if source.endswith(".") else "$")
        match = re.match(pattern, name)
        if match:
            return target.replace("{i}", match.groupdict().get("i") or "") + name[match.end():]
    return None


def to_transformers_names(state: dict[str, torch.Tensor], where: str = "ImageReward.pt"):
    """``(vision, text, mlp)`` state dicts in transformers' names from the released one; unknown keys are named."""
    vision, text, mlp, unknown = {}, {}, {}, []
    for name, tensor in state.items():
        if name.startswith("blip.visual_encoder."):
            renamed = _rename(name.removeprefix("blip.visual_encoder."))
            if renamed is None:
                unknown.append(name)
            else:
                vision[renamed] = tensor
        elif name.startswith("blip.text_encoder."):
            if not name.endswith("embeddings.position_ids"):  # a buffer: transformers rebuilds it
                text[name.removeprefix("blip.text_encoder.")] = tensor
        elif name.startswith("mlp.layers."):
            mlp[name.removeprefix("mlp.layers.")] = tensor
        elif not name.startswith(UNUSED):
            unknown.append(name)
    if unknown:
        raise ValueError(f"{where}: not an ImageReward state dict: unexpected keys {unknown[:5]} ({len(unknown)} in all)")
    return vision, text, mlp


def to_released_names(model: "ImageRewardModel") -> dict[str, torch.Tensor]:
    """The inverse of `to_transformers_names` (writes a file in the released layout, e.g. a tiny test one)."""
    state = {f"blip.visual_encoder.{_rename(n, released_to_transformers=False)}": t
             for n, t in model.vision.state_dict().items()}
    state.update({f"blip.text_encoder.{n}": t for n, t in model.text.state_dict().items()})
    positions = model.text.config.max_position_embeddings  # a persistent buffer in BLIP's BERT, so in the file
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(positions)[None]
    state.update({f"mlp.layers.{n}": t for n, t in model.mlp.state_dict().items()})
    return state


def blip_vision_config(width: int, depth: int, intermediate: int, patch: int, image_size: int):
    """BLIP's ViT as a `BlipVisionConfig`: 64-wide heads, LayerNorm eps 1e-6, exact GELU."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=depth,
                            num_attention_heads=width // 64, image_size=image_size, patch_size=patch,
                            layer_norm_eps=1e-6, hidden_act="gelu")


def vision_config(vision_state: dict[str, torch.Tensor]):
    """`blip_vision_config` sized from the weights (transformers' names): ViT-L/16 at 224 for ImageReward v1.0."""
    positions = vision_state["embeddings.position_embedding"]
    patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    depth = 1 + max(int(n.split(".")[2]) for n in vision_state if n.startswith("encoder.layers."))
    return blip_vision_config(positions.shape[-1], depth, vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                              patch, round((positions.shape[1] - 1) ** 0.5) * patch)


def text_config(med_config: dict, vision_width: int):
    """The text encoder as a `BlipTextConfig` from ``med_config.json`` (cross-attention to the ViT's width in every
    layer: ``is_decoder`` builds it; the forward stays bidirectional)."""
    from transformers import BlipTextConfig

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    return BlipTextConfig(**{k: med_config[k] for k in keys if k in med_config}, encoder_hidden_size=vision_width,
                          is_decoder=True, bos_token_id=None, eos_token_id=None, sep_token_id=None)  # unused here


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision_cfg, text_cfg, mlp_shapes: list[tuple[int, int]]):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        layers = []
        for i, (fan_out, fan_in) in enumerate(mlp_shapes):
            layers.append(torch.nn.Linear(fan_in, fan_out))
            if i < 3:
                layers.append(torch.nn.Dropout(0.0))  # positions 1, 3, 5: the released head's dropouts
        self.mlp = torch.nn.Sequential(*layers)
        self.image_size = vision_cfg.image_size

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixel_values).last_hidden_state
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device))
        return ((self.mlp(text.last_hidden_state[:, 0].float()) - MEAN) / STD)[:, 0]


def build_tokenizer(folder: str | Path):
    """BERT's uncased tokenizer from ``folder`` with BLIP's [DEC] and [ENC] tokens added (vocabulary + 2)."""
    from transformers import BertTokenizer

    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"ImageReward tokenizer: no vocab.txt in {folder} (google-bert/bert-base-uncased)")
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_image_reward(checkpoint: str | Path, med_config: str | Path, tokenizer: str | Path,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "ImageRewardScore":
    from g2rpo.io import load_state_dict_file

    checkpoint, med_config = Path(checkpoint), Path(med_config)
    for path, what in ((checkpoint, "ImageReward.pt"), (med_config, "med_config.json")):
        if not path.is_file():
            raise FileNotFoundError(f"ImageReward: {what} not found at {path}")
    vision, text, mlp = to_transformers_names(load_state_dict_file(checkpoint, "ImageReward checkpoint"), str(checkpoint))
    model = ImageRewardModel(vision_config(vision), text_config(json.loads(med_config.read_text()),
                                                                 vision["embeddings.position_embedding"].shape[-1]),
                             [tuple(mlp[f"{i}.weight"].shape) for i in MLP_LAYERS])
    for part, state in ((model.vision, vision), (model.text, text), (model.mlp, mlp)):
        try:
            part.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{checkpoint}: does not fit {med_config} ({exc})") from None
    return ImageRewardScore(model.to(device, dtype).eval().requires_grad_(False), build_tokenizer(tokenizer), device)


class ImageRewardScore:
    """``score(images [B, 3, H, W] in [0, 1], prompts) -> [B]``: the package's PIL preprocessing per image
    (the images quantised to uint8 first), batched forwards."""

    def __init__(self, model: ImageRewardModel, tokenizer, device, batch_size: int = 16):
        from torchvision import transforms as T

        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, torch.device(device), batch_size
        size = model.image_size
        self.transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                    lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        self.dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from g2rpo.rewards import check_batch, to_pil

        check_batch(images, prompts)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            pixels = torch.stack([self.transform(image) for image in to_pil(images[start:start + self.batch_size])])
            text = self.tokenizer(list(prompts[start:start + self.batch_size]), padding="max_length", truncation=True,
                                  max_length=MAX_LENGTH, return_tensors="pt").to(self.device)
            scores.append(self.model(pixels.to(self.device, self.dtype), text.input_ids, text.attention_mask).float())
        return torch.cat(scores)

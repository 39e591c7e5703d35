"""Reward-model loaders: HPS-v2.1 and the CLIP score, from local folders only.

* HPS-v2.1 is built by hpsv2's bundled open_clip (``create_model_and_transforms``) and given the
  HPS fine-tuned weights (``ckpt/hps/HPS_v2.1_compressed.pt``, ``{"state_dict": ...}``), loaded
  strictly: they hold every parameter, so the base weights hpsv2 starts from would be overwritten
  entirely and are not read.
* The CLIP score model (DFN5B-CLIP-ViT-H-14) is an open_clip Hub-style folder read with
  ``local-dir:`` (``open_clip_config.json`` + weights).

An architecture that hpsv2 does not bundle (the tiny test one) is taken from the
``open_clip_config.json`` in the base folder -- the file the real laion folder carries too -- so the
same loader serves ``ViT-H-14`` and the tiny model; only the config's ``arch`` differs.
Weights are read with safetensors or ``torch.load(weights_only=True)``; nothing is downloaded.
Every model is built directly in the dtype its config names (``models.<reward>.dtype``), so loading
holds that model plus one state dict, never an fp32 copy besides.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from g2rpo.io import load_state_dict_file

PREPROCESS_MODES = ("tensor", "faithful")
"""how OpenClipReward prepares images: tensor (resize on the float tensor, batched, on the device; fp32
features) | faithful (the official trainer's uint8 -> PIL -> model transform -> fp16 autocast sequence)."""

def check_batch(images: torch.Tensor, prompts) -> None:
    """One clear error for what every reward's ``score`` takes: ``[B, 3, H, W]`` floats and B prompts."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] floats in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")


def to_pil(images: torch.Tensor) -> list:
    """Float images in [0, 1] as the PIL images a decoded sample becomes (diffusers' postprocess: ×255, rounded,
    uint8), for the rewards whose own preprocessing starts from PIL."""
    from PIL import Image

    quantised = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in quantised]


# Base-weight files of an open_clip Hub folder, in order of preference (safetensors first).
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                          "open_clip_pytorch_model.bin")


@dataclass
class OpenClipBundle:
    """A loaded open_clip-style model with the image preprocessing and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> normalised tensor, the model's own transform
    tokenizer: Callable[[list[str]], torch.Tensor]
    arch: str


def _read_open_clip_config(folder: Path) -> dict | None:
    path = folder / "open_clip_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if "model_cfg" not in config:
        raise ValueError(f"{path}: missing the 'model_cfg' entry of an open_clip config")
    return config


def find_open_clip_weights(folder: str | Path, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {folder}")
    for name in OPEN_CLIP_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{what}: no weights in {folder}; expected one of {', '.join(OPEN_CLIP_WEIGHT_FILES)}")


def load_hps_model(arch: str, base_dir: str | Path, checkpoint: str | Path, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype = torch.float32) -> OpenClipBundle:
    """Load HPS-v2.1 as hpsv2 builds it, in ``dtype`` and eval mode.

    ``base_dir`` is read only for an architecture hpsv2 does not bundle (its ``open_clip_config.json``).
    """
    with warnings.catch_warnings():  # hpsv2's bundled open_clip imports a timm module timm has deprecated
        warnings.filterwarnings("ignore", message="Importing from timm.models.layers is deprecated",
                                category=FutureWarning)
        from hpsv2.src.open_clip import create_model_and_transforms, factory, get_tokenizer

    from g2rpo.models import default_dtype, resolve_dtype

    base_dir, checkpoint = Path(base_dir), Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"HPS checkpoint: file not found: {checkpoint} (HPS_v2.1_compressed.pt)")
    if factory.get_model_config(arch) is None:
        config = _read_open_clip_config(base_dir)
        if config is None:
            raise ValueError(f"HPS arch {arch!r} is not bundled with hpsv2 and {base_dir / 'open_clip_config.json'} "
                             f"does not exist to define it")
        factory._MODEL_CONFIGS[arch] = config["model_cfg"]

    with default_dtype(resolve_dtype(dtype)):
        model, _, preprocess_val = create_model_and_transforms(
            arch, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
            force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
            light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
            with_region_predictor=False)
    state = load_state_dict_file(checkpoint, "HPS checkpoint")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"HPS checkpoint: {checkpoint} does not match architecture {arch!r}: {exc}") from exc
    del state
    return OpenClipBundle(model.to(device).eval(), preprocess_val, get_tokenizer(arch), arch)


def load_clip_score_model(path: str | Path, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype = torch.float32) -> OpenClipBundle:
    """Load an open_clip folder (``open_clip_config.json`` + weights), e.g. DFN5B-CLIP-ViT-H-14, in ``dtype``."""
    import open_clip

    from g2rpo.models import default_dtype, resolve_dtype

    folder = Path(path)
    find_open_clip_weights(folder, "CLIP-score model")  # open_clip would silently random-init without
    if _read_open_clip_config(folder) is None:
        raise FileNotFoundError(f"CLIP-score model: {folder / 'open_clip_config.json'} not found")
    name = f"local-dir:{folder}"
    with default_dtype(resolve_dtype(dtype)):
        model, _, preprocess = open_clip.create_model_and_transforms(name, device="cpu", weights_only=True)
    return OpenClipBundle(model.to(device).eval(), preprocess, open_clip.get_tokenizer(name), name)


# --------------------------------------------------------------------------------------------
# Scoring: images in memory -> one score per image
# --------------------------------------------------------------------------------------------


class OpenClipReward:
    """Cosine similarity of the normalised image and text features, one score per (image, prompt).

    This is HPS-v2.1's score (the diagonal of ``image_features @ text_features.T``; no logit scale)
    and the reference's CLIP score. ``score`` takes float images in [0, 1], shaped ``[B, 3, H, W]``,
    on any device, and preprocesses them as tensors with the same steps as the model's own PIL
    preprocessing, without a PIL or disk round trip:

    * ``resize_mode="longest_pad"`` (hpsv2's evaluation transform): bicubic resize of the *longer*
      side to the input size, then zero padding to a square;
    * ``resize_mode="shortest_crop"`` (open_clip's): bicubic resize of the shorter side, centre crop.

    Both are the identity on the aspect ratio for square images (the training resolution).

    ``preprocess="faithful"`` scores as the official trainer does instead: the image quantised to uint8 (its
    ``VaeImageProcessor.postprocess`` to PIL), the model's own transform on that PIL image (hpsv2's
    ``preprocess_val``, open_clip's), features and the cosine computed under fp16 autocast (``image_features @
    text_features.T``, its diagonal). With fp32 weights (``models.<reward>.dtype: float32``, the official
    ``precision='amp'``) it equals the official sequence; it costs a host round trip per image.
    """

    def __init__(self, bundle: OpenClipBundle, device: str | torch.device = "cpu", batch_size: int = 32,
                 resize_mode: str = "shortest_crop", preprocess: str = "tensor"):
        if resize_mode not in ("shortest_crop", "longest_pad"):
            raise ValueError(f"resize_mode={resize_mode!r}: expected 'shortest_crop' or 'longest_pad'")
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess={preprocess!r}: expected one of {', '.join(PREPROCESS_MODES)}")
        self.resize_mode, self.faithful = resize_mode, preprocess == "faithful"
        self.transform = bundle.preprocess
        self.model = bundle.model.to(device).eval().requires_grad_(False)
        self.dtype = next(self.model.parameters()).dtype  # the pixels are cast to it; features compared in fp32
        self.tokenizer = bundle.tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        visual = self.model.visual
        size = visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        images = images.to(self.device, torch.float32)
        bicubic = TF.InterpolationMode.BICUBIC
        if self.resize_mode == "shortest_crop":
            images = TF.resize(images, [min(self.image_size)], interpolation=bicubic, antialias=True)
            images = TF.center_crop(images, list(self.image_size))
        else:
            size = max(self.image_size)
            height, width = images.shape[-2:]
            scale = size / max(height, width)
            if scale != 1.0:
                new_h, new_w = round(height * scale), round(width * scale)
                images = TF.resize(images, [new_h, new_w], interpolation=bicubic, antialias=True)
                pad_h, pad_w = size - new_h, size - new_w
                images = TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start:start + self.batch_size])).to(self.device)
            if self.faithful:
                scores.append(self._score_faithfully(images[start:start + self.batch_size], tokens))
                continue
            pixels = self.preprocess(images[start:start + self.batch_size])
            image_features = F.normalize(self.model.encode_image(pixels.to(self.dtype)).float(), dim=-1)
            text_features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            scores.append((image_features * text_features).sum(dim=-1))
        return torch.cat(scores)

    def _score_faithfully(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        pixels = torch.stack([self.transform(image) for image in to_pil(images)])
        with torch.autocast(self.device.type, dtype=torch.float16):
            image_features = self.model.encode_image(pixels.to(self.device), normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
            return (image_features @ text_features.T).diagonal().float()


class PickScoreReward:
    """PickScore: ``logit_scale.exp() · cos(image, text)`` of a transformers CLIPModel.

    Images go through the model's own ``CLIPProcessor`` (uint8 PIL images, in memory), exactly as its authors and
    Flow-GRPO's trainer score them. Typical values are ~20-23; a training run optimises (and logs) the score / 26,
    as Flow-GRPO does (``train_scale`` in g2rpo.reward_registry).
    """

    def __init__(self, model_dir: str | Path, processor_dir: str | Path, device: str | torch.device = "cpu",
                 batch_size: int = 32, dtype: str | torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPProcessor

        from g2rpo.models import resolve_dtype

        for path, what in ((model_dir, "PickScore model"), (processor_dir, "PickScore processor")):
            if not Path(path).is_dir():
                raise FileNotFoundError(f"{what}: directory not found: {path}")
        self.dtype = resolve_dtype(dtype)
        self.model = CLIPModel.from_pretrained(model_dir, dtype=self.dtype, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor_dir, local_files_only=True)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            pil = to_pil(images[start:start + self.batch_size])
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            text = self.processor(text=list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                                  max_length=77, return_tensors="pt").to(self.device)
            image_features = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
            text_features = F.normalize(_features(self.model.get_text_features(**text)), dim=-1)
            scores.append(self.model.logit_scale.float().exp() * (image_features.float() * text_features.float()).sum(-1))
        return torch.cat(scores).float()


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output

"""Where the models live: the base model's pipeline folder and family, and each reward model's files (the
``models:`` section of a training config, or a file of configs/models/ on its own, which evaluation reads too).

Every field has a default equal to the real weights' folders (configs/models/flux_dev.yaml restates them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


def _check_dtype(where: str, value: str) -> None:
    if value not in DTYPES:
        raise ValueError(f"{where}={value!r}: expected one of {', '.join(DTYPES)}")


@dataclass
class BaseModelConfig:
    path: str = "ckpt/flux"
    """diffusers pipeline folder of the base model (FLUX.1-dev: ckpt/flux; SD3.5-Medium: ckpt/sd35m; tiny:
    ckpt/tiny/flux, ckpt/tiny/sd3)."""
    dtype: str = "bfloat16"
    """dtype the frozen parts (VAE, text encoders) and inference run in: float32 | bfloat16 | float16."""

    def __post_init__(self):
        _check_dtype("base.dtype", self.dtype)


@dataclass
class HPSModelConfig:
    arch: str = "ViT-H-14"
    """open_clip architecture name; one hpsv2 does not bundle is read from base_dir/open_clip_config.json."""
    base_dir: str = "ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """open_clip folder with the base weights (open_clip_model.safetensors or open_clip_pytorch_model.bin)."""
    checkpoint: str = "ckpt/hps/HPS_v2.1_compressed.pt"
    """HPS-v2.1 fine-tuned weights, {"state_dict": ...}: every parameter of the model (the base weights are
    not read; base_dir only defines an architecture hpsv2 does not bundle)."""
    dtype: str = "float32"
    """dtype the model is built in: float32 (the reference's precision='amp': fp32 weights, scored under fp16
    autocast by preprocess=faithful) | bfloat16 | float16 (half the memory, not the reference's numerics)."""
    preprocess: str = "faithful"
    """faithful (the official trainer's sequence: uint8 -> PIL -> hpsv2's preprocess_val -> fp16 autocast;
    with dtype float32 it equals it) | tensor (batched resize of the float images on the device, fp32 features:
    ~3x faster on CPU, ~1e-3 from faithful per image)."""

    def __post_init__(self):
        _check_dtype("hps.dtype", self.dtype)
        _check_preprocess("hps.preprocess", self.preprocess)


def _check_preprocess(field_name: str, value: str) -> None:
    if value not in ("tensor", "faithful"):
        raise ValueError(f"models.{field_name}={value!r}: expected tensor or faithful")


@dataclass
class ClipScoreModelConfig:
    path: str = "ckpt/clip_score"
    """open_clip folder (open_clip_config.json + weights) of DFN5B-CLIP-ViT-H-14."""
    dtype: str = "float32"
    """dtype the model is built in: float32 (the reference's) | bfloat16 | float16."""
    preprocess: str = "faithful"
    """faithful (the official sequence: uint8 -> PIL -> open_clip's transform -> fp16 autocast) | tensor."""

    def __post_init__(self):
        _check_dtype("clip_score.dtype", self.dtype)
        _check_preprocess("clip_score.preprocess", self.preprocess)


@dataclass
class PickScoreModelConfig:
    model: str = "ckpt/pickscore"
    """transformers CLIPModel folder of yuvalkirstain/PickScore_v1."""
    processor: str = "ckpt/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """folder with the CLIPProcessor files PickScore uses (the laion ViT-H-14 repo carries them)."""
    dtype: str = "float16"
    """dtype the model is loaded and scored in: float32 | bfloat16 | float16."""

    def __post_init__(self):
        _check_dtype("pickscore.dtype", self.dtype)


@dataclass
class ImageRewardModelConfig:
    checkpoint: str = "ckpt/imagereward/ImageReward.pt"
    """THUDM/ImageReward's released state dict (evaluation only; g2rpo.image_reward)."""
    med_config: str = "ckpt/imagereward/med_config.json"
    """its text encoder's BERT config."""
    tokenizer: str = "ckpt/bert-base-uncased"
    """folder with google-bert/bert-base-uncased's vocab.txt (BLIP adds its two tokens)."""
    dtype: str = "float32"
    """dtype the model is built in (the package scores in fp32)."""

    def __post_init__(self):
        _check_dtype("imagereward.dtype", self.dtype)


@dataclass
class UnifiedRewardModelConfig:
    path: str = "ckpt/unifiedreward"
    """transformers folder of CodeGoat24/UnifiedReward-qwen-7b, a Qwen2.5-VL judge (evaluation only, GPU in
    practice; g2rpo.unified_reward)."""
    dtype: str = "bfloat16"
    """dtype the judge is loaded in (its released weights are bf16)."""
    question: str = "semantic"
    """semantic (the reference evaluation's: the number after "Alignment Score (1-5):") | score ("Final Score:")."""
    max_new_tokens: int = 4096
    """the reference's max_tokens; the judge stops earlier, at its end-of-turn token."""
    jpeg_quality: int | None = 95
    """the image reaches the judge as a JPEG of this quality, as the reference sends it (null: the PNG's pixels)."""
    batch_size: int = 8
    """images per generate call."""

    def __post_init__(self):
        _check_dtype("unifiedreward.dtype", self.dtype)
        from g2rpo.unified_reward import QUESTIONS

        if self.question not in QUESTIONS:
            raise ValueError(f"models.unifiedreward.question={self.question!r}: expected one of {', '.join(QUESTIONS)}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"models.unifiedreward.jpeg_quality={self.jpeg_quality}: expected 1..100 or null")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("models.unifiedreward.max_new_tokens and batch_size must be >= 1")


@dataclass
class ModelsConfig:
    kind: str = "auto"
    """the base model's family (g2rpo.models): flux | sd3 | auto (read from base.path's model_index.json)."""
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    hps: HPSModelConfig = field(default_factory=HPSModelConfig)
    clip_score: ClipScoreModelConfig = field(default_factory=ClipScoreModelConfig)
    pickscore: PickScoreModelConfig = field(default_factory=PickScoreModelConfig)
    imagereward: ImageRewardModelConfig = field(default_factory=ImageRewardModelConfig)
    unifiedreward: UnifiedRewardModelConfig = field(default_factory=UnifiedRewardModelConfig)

    def __post_init__(self):
        from g2rpo.models import families

        if self.kind != "auto" and self.kind not in families():
            raise ValueError(f"kind={self.kind!r}: expected auto or one of {', '.join(families())}")

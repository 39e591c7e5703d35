"""The one table of reward models: every place that names a reward reads it from here.

| name | evaluation column | training | per-step log (the reference's) | model config |
|---|---|---|---|---|
| ``hps`` | HPS-v2.1 | yes | ``hps_reward.txt`` | ``models.hps`` |
| ``clip_score`` | CLIP Score | yes | ``clip_reward.txt`` | ``models.clip_score`` |
| ``pickscore`` | PickScore | yes (trained as Flow-GRPO trains it: its score / 26, from uint8 PIL images) | ``pickscore_reward.txt`` | ``models.pickscore`` |
| ``imagereward`` | ImageReward | no (evaluation only) | ``imagereward_reward.txt`` | ``models.imagereward`` |
| ``unifiedreward`` | UnifiedReward | no (evaluation only: a VLM judge that writes its score) | ``unifiedreward_reward.txt`` | ``models.unifiedreward`` |

A reward is anything with ``score(images [B, 3, H, W] in [0, 1], prompts) -> Tensor[B]`` (`Reward`); `build_reward`
builds one by name. To add one to the package: a loader in g2rpo.rewards, its paths in ``ModelsConfig``, and a row
here; to bring your own without editing the package, a factory by import path or a reward server
(g2rpo.reward_plugins, README "Add a reward"). This
module imports no model library (the loaders import theirs when called), so the config can check names without
loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


class Reward(Protocol):
    def score(self, images, prompts: list[str]):  # images: Tensor [B, 3, H, W] in [0, 1] -> Tensor [B]
        ...


@dataclass(frozen=True)
class RewardEntry:
    name: str
    column: str
    """header of the evaluation table (the paper's)."""
    trains: bool
    """scored on tensors, batched: usable inside the training step (otherwise evaluation only)."""
    log_file: str
    """the reference's per-step text log of the anchor sample's reward, under output_dir."""
    build: Callable[..., Reward]
    """``build(models: ModelsConfig, device) -> Reward``."""
    inputs: Callable[..., dict[str, str]] = lambda models: {}
    """``inputs(models) -> {config field: path}``: the files and folders ``build`` reads, checked before long work."""
    default_weight: float = 1.0
    """its weight in the MGAI / advantage sum when a config names it without one."""
    paper_scale: float = 1.0
    """factor from our score to the G²RPO paper's table units (PickScore: the paper prints logit_scale·cos / 100)."""
    train_scale: float = 1.0
    """factor from our score to the reward a training run optimises and logs (PickScore: / 26, Flow-GRPO's)."""
    check: Callable[[], str | None] = lambda: None
    """``check() -> problem or None``: what must answer before long work starts (a reward server's health)."""


def _hps(models, device):
    from g2rpo.rewards import OpenClipReward, load_hps_model

    bundle = load_hps_model(models.hps.arch, models.hps.base_dir, models.hps.checkpoint, dtype=models.hps.dtype)
    return OpenClipReward(bundle, device, resize_mode="longest_pad", preprocess=models.hps.preprocess)


def _clip_score(models, device):
    from g2rpo.rewards import OpenClipReward, load_clip_score_model

    return OpenClipReward(load_clip_score_model(models.clip_score.path, dtype=models.clip_score.dtype), device,
                          preprocess=models.clip_score.preprocess)


def _pickscore(models, device):
    from g2rpo.rewards import PickScoreReward

    return PickScoreReward(models.pickscore.model, models.pickscore.processor, device, dtype=models.pickscore.dtype)


def _imagereward(models, device):
    from g2rpo.image_reward import load_image_reward
    from g2rpo.models import resolve_dtype

    m = models.imagereward
    return load_image_reward(m.checkpoint, m.med_config, m.tokenizer, device, resolve_dtype(m.dtype))


def _unifiedreward(models, device):
    from g2rpo.models import resolve_dtype
    from g2rpo.unified_reward import load_unified_reward

    m = models.unifiedreward
    return load_unified_reward(m.path, device, resolve_dtype(m.dtype), m.question, m.max_new_tokens, m.jpeg_quality,
                               m.batch_size)


REWARDS: dict[str, RewardEntry] = {entry.name: entry for entry in (
    RewardEntry("hps", "HPS-v2.1", trains=True, log_file="hps_reward.txt", build=_hps,
                inputs=lambda m: {"models.hps.checkpoint": m.hps.checkpoint}),
    RewardEntry("clip_score", "CLIP Score", trains=True, log_file="clip_reward.txt", build=_clip_score,
                inputs=lambda m: {"models.clip_score.path": m.clip_score.path}),
    RewardEntry("pickscore", "PickScore", trains=True, log_file="pickscore_reward.txt", build=_pickscore,
                paper_scale=0.01, train_scale=1 / 26, inputs=lambda m: {"models.pickscore.model": m.pickscore.model,
                                                    "models.pickscore.processor": m.pickscore.processor}),
    RewardEntry("imagereward", "ImageReward", trains=False, log_file="imagereward_reward.txt", build=_imagereward,
                inputs=lambda m: {"models.imagereward.checkpoint": m.imagereward.checkpoint,
                                  "models.imagereward.med_config": m.imagereward.med_config,
                                  "models.imagereward.tokenizer": m.imagereward.tokenizer}),
    RewardEntry("unifiedreward", "UnifiedReward", trains=False, log_file="unifiedreward_reward.txt",
                build=_unifiedreward, inputs=lambda m: {"models.unifiedreward.path": m.unifiedreward.path}),
)}


def reward_entry(name: str, training: bool = False) -> RewardEntry:
    """The entry of ``name``; a clear error naming the choices (``training``: only rewards that can train)."""
    entry = REWARDS.get(name)
    if entry is None or (training and not entry.trains):
        choices = [n for n, e in REWARDS.items() if e.trains or not training]
        why = f" (evaluation only: {name} cannot score inside the training step)" if entry is not None else ""
        raise ValueError(f"reward {name!r}{why}: expected one of {', '.join(choices)}")
    return entry


def missing_inputs(names, models) -> list[str]:
    """``["field=path (the Column model)", ...]`` for every file or folder the rewards ``names`` read that does not
    exist: checked before generating or training, so a missing download is not found after hours of work."""
    from pathlib import Path

    return [f"{field}={path} (the {REWARDS[name].column} model)" for name in names
            for field, path in REWARDS[name].inputs(models).items() if not Path(path).exists()]


def build_reward(name: str, models, device="cpu") -> Reward:
    """The reward ``name`` (`REWARDS`), built from ``models`` (a `ModelsConfig`) on ``device``."""
    return reward_entry(name).build(models, device)


def training_rewards() -> list[str]:
    return [name for name, entry in REWARDS.items() if entry.trains]

"""Rewards that are not rows of the registry: a factory named by import path, and a reward served over HTTP.

A config's reward entry names one of three things (`resolve`):

* a registry name (``hps``, ``clip_score``, ``pickscore``; g2rpo.reward_registry);
* ``package.module:factory`` -- a function importable from the working directory or an installed package, called
  as ``factory(device=..., **args)``; it returns an object with ``score(images [B, 3, H, W] in [0, 1], prompts)
  -> Tensor [B]``, and may say ``trains = False`` (evaluation only) and its log ``name`` (default: the module's
  last part). The import and the factory's signature are checked when the config is;
* ``http`` -- a reward server (g2rpo.http_reward; ``scripts/reward_server.py`` serves any reward).

Each resolves to a `RewardEntry` like the registry's, so training, the held-out evaluation, the evaluation
harness and the logs treat them all alike.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from g2rpo.reward_registry import REWARDS, RewardEntry, reward_entry

HTTP = "http"


def is_import_path(name: str) -> bool:
    return ":" in name


def default_label(name: str, factory=None) -> str:
    """The log name of a reward entry: the registry name, ``http``, or a factory's ``name`` attribute, else its
    module's last part."""
    if is_import_path(name):
        return getattr(factory, "name", None) or name.partition(":")[0].rpartition(".")[2]
    return name


def load_factory(path: str):
    """The callable ``package.module:factory`` names, imported from the working directory or an installed package;
    a clear error naming what did not resolve."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or not all(part.isidentifier() for part in (*module_name.split("."),
                                                                                   *attribute.split("."))):
        raise ValueError(f"{path!r}: expected package.module:factory (a Python import path and a function in it)")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # the working directory's modules, as `python -m` sees them
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{path!r}: cannot import {module_name} ({exc}); it must be importable from the working "
                         f"directory ({cwd}) or an installed package") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"{path!r}: {module_name} ({getattr(module, '__file__', '?')}) has no {attribute}")
    if not callable(factory):
        raise ValueError(f"{path!r}: {attribute} is a {type(factory).__name__}, not a function")
    return factory


def check_signature(factory, args: dict, where: str) -> None:
    """Raise naming the mismatch unless ``factory(device=..., **args)`` binds."""
    try:
        inspect.signature(factory).bind(device="cpu", **args)
    except TypeError as exc:
        raise ValueError(f"{where}: factory{inspect.signature(factory)} cannot be called as factory(device=..., "
                         f"**args) with args {sorted(args)}: {exc}") from None


class CustomReward:
    """A factory's reward, its output checked: one finite or NaN float per image, on the CPU as float32."""

    def __init__(self, reward, path: str):
        if not callable(getattr(reward, "score", None)):
            raise ValueError(f"{path!r}: the factory returned {type(reward).__name__}, which has no score(images, "
                             f"prompts)")
        self.reward, self.path = reward, path

    def score(self, images, prompts):
        import torch

        scores = torch.as_tensor(self.reward.score(images, prompts))
        if scores.shape != (len(images),):
            raise ValueError(f"{self.path!r}: score() returned shape {tuple(scores.shape)} for {len(images)} images; "
                             f"expected [{len(images)}]")
        return scores.float()


def _custom_entry(name: str, args: dict, label: str | None, training: bool) -> RewardEntry:
    factory = load_factory(name)
    label = _checked_label(label or default_label(name, factory))
    check_signature(factory, args, repr(name))
    if training and getattr(factory, "trains", True) is False:
        raise ValueError(f"{name!r}: the factory says trains = False (an evaluation-only reward)")

    def build(models, device):
        reward = factory(device=device, **args)
        if training and getattr(reward, "trains", True) is False:
            raise ValueError(f"{name!r}: its reward says trains = False (an evaluation-only reward); it cannot train")
        return CustomReward(reward, name)

    return RewardEntry(label, label, trains=getattr(factory, "trains", True), log_file=f"{label}_reward.txt",
                       build=build)


def _http_entry(args: dict, label: str) -> RewardEntry:
    from g2rpo.http_reward import HttpReward, HttpRewardSettings

    settings = HttpRewardSettings.from_args(args)

    def build(models, device):  # the health check (``check``) ran before the models loaded; failures from here on
        return HttpReward(settings, check=False)  # are agreed between the ranks and stop the run with a checkpoint

    return RewardEntry(label, label, trains=True, log_file=f"{label}_reward.txt", build=build,
                       check=lambda: settings.health_problem())


def resolve(name: str, args: dict | None = None, label: str | None = None, training: bool = False) -> RewardEntry:
    """The `RewardEntry` of a config's reward entry (see the module docstring); ``training``: only rewards that can
    train are accepted. Errors name the entry and the choices."""
    args = dict(args or {})
    if is_import_path(name):
        return _custom_entry(name, args, label, training)
    if name == HTTP:
        return _http_entry(args, _checked_label(label or name))
    try:
        entry = reward_entry(name, training=training)
    except ValueError as exc:
        if name in REWARDS:  # an evaluation-only one asked to train
            raise
        raise ValueError(f"{exc}, {HTTP} (a reward server) or package.module:factory (your own)") from None
    if args:
        raise ValueError(f"args {sorted(args)}: the registry's {name} reward takes none (its files are models.{name})")
    if label not in (None, name):
        raise ValueError(f"label={label!r}: the registry's {name} reward keeps its name (its logs are {entry.log_file})")
    return entry


def _checked_label(label: str) -> str:
    if label == "heldout":
        raise ValueError("label='heldout': taken by the held-out evaluation's log (heldout_reward.txt); choose another")
    if not label or not label.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"label={label!r}: a reward's log name is letters, digits, '_' and '-' (it names its files)")
    return label


def known_rewards() -> str:
    """The choices, for messages."""
    return ", ".join([*REWARDS, HTTP, "package.module:factory"])

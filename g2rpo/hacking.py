"""Reward hacking, seen from the held-out history (``heldout.jsonl``): the rule that flags it and the criterion that
picks the best checkpoint.

Each held-out evaluation logs, per reward, its mean over the held-out prompts and its standard deviation across
them: ``heldout/<name>`` for a trained (in-domain) reward, ``heldout/ood/<name>`` for one the run is not trained on
(out-of-domain), ``heldout/std/...`` beside them. A reward's **z-score** at an evaluation is its change since the
first evaluation in units of that first evaluation's spread across prompts, ``z = (mean_t − mean_0) / std_0``, so
rewards of any scale compare.

**The rule** (`flags`): at an evaluation, the out-of-domain rewards whose z-score has been below ``−margin`` at each
of the last ``window`` evaluations, provided every in-domain reward's z-score is above 0 there -- the trained
reward going up while a reward it was not trained on goes down. The flag names those rewards.

**Best** (`criterion`): ``ood`` -- the mean of the out-of-domain z-scores (the checkpoint that the rewards not
trained on like most); or a reward's name -- its held-out mean (``hps``, ``ood/pickscore``).
"""

from __future__ import annotations

import math

PREFIX = "heldout/"


def _rewards(record: dict) -> dict[str, float]:
    """``{name or "ood/<name>": mean}`` of one held-out record (no std, no EMA, no flags)."""
    return {k[len(PREFIX):]: v for k, v in record.items() if k.startswith(PREFIX) and isinstance(v, (int, float))
            and not k.startswith((f"{PREFIX}std/", f"{PREFIX}ema_"))}


def z_scores(history: list[dict], record: dict | None = None) -> dict[str, float]:
    """Each reward's z-score at ``record`` (default: the last of ``history``) against ``history[0]``."""
    if not history:
        return {}
    first, record = history[0], record or history[-1]
    out = {}
    for name, value in _rewards(record).items():
        start, spread = first.get(PREFIX + name), first.get(f"{PREFIX}std/{name}")
        if start is None or spread is None or not math.isfinite(value):
            continue
        out[name] = (value - start) / spread if spread > 0 else 0.0
    return out


def flags(history: list[dict], window: int, margin: float) -> list[str]:
    """The out-of-domain rewards the rule flags at the last record of ``history`` (see the module docstring)."""
    if len(history) < 1 + window:  # the first evaluation is the baseline
        return []
    recent = [z_scores(history, record) for record in history[-window:]]
    if not all(z[name] > 0 for z in recent for name in z if not name.startswith("ood/")):
        return []
    names = [name for name in recent[-1] if name.startswith("ood/")]
    return [name for name in names if all(z.get(name, 0.0) < -margin for z in recent)]


def criterion(history: list[dict], record: dict, by: str) -> float | None:
    """The best-checkpoint criterion ``by`` at ``record``: ``ood`` (mean out-of-domain z-score) or a reward's mean;
    None when the record lacks it."""
    if by == "ood":
        z = [v for k, v in z_scores(history, record).items() if k.startswith("ood/")]
        return sum(z) / len(z) if z else None
    value = record.get(PREFIX + by)
    return float(value) if isinstance(value, (int, float)) else None

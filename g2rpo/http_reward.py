"""A reward served over HTTP (``rewards: [{name: http, args: {url: ..., ...}}]``): for judges whose dependencies clash
with the trainer's, or that run on another machine. ``scripts/reward_server.py`` serves any reward this way.

The protocol is JSON over HTTP, never pickle:

* ``GET  <url>/health`` -> ``{"status": "ok", "reward": <name>}``;
* ``POST <url>/score`` with ``{"prompts": [...], "images": [base64 PNG or JPEG, ...], "format": "png" | "jpeg"}``
  -> ``{"scores": [float | null, ...]}`` (null: the server could not score that image, NaN here).

Images go as 8-bit PNG (lossless: the server sees exactly the uint8 image) or JPEG at ``jpeg_quality``, in batches
of ``batch_size``. A request that fails (refused, timed out, a 5xx) is retried ``retries`` times with exponential
backoff (``backoff_s``·2^i); then `RewardServerError` -- which the trainer answers by writing a checkpoint of the
last completed step and stopping in one line (g2rpo.trainer), so nothing is lost and ``--resume auto`` continues
exactly once the server is back.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from g2rpo.cli import Refusal


class RewardServerError(Refusal, RuntimeError):
    """A reward server that does not answer: one line naming the URL."""


@dataclass(frozen=True)
class HttpRewardSettings:
    url: str
    timeout_s: float = 60.0
    batch_size: int = 16
    retries: int = 3
    backoff_s: float = 1.0
    format: str = "png"
    jpeg_quality: int = 95

    @classmethod
    def from_args(cls, args: dict) -> "HttpRewardSettings":
        allowed = {"url", "timeout_s", "batch_size", "retries", "backoff_s", "format", "jpeg_quality"}
        unknown = sorted(set(args) - allowed)
        if unknown or "url" not in args:
            raise ValueError(f"http reward args {sorted(args)}: " + (f"unknown {unknown}; " if unknown else "")
                             + f"expected url (required) and any of {', '.join(sorted(allowed - {'url'}))}")
        settings = cls(**args)
        if not str(settings.url).startswith(("http://", "https://")):
            raise ValueError(f"http reward url={settings.url!r}: expected http://host:port")
        if settings.format not in ("png", "jpeg") or not 1 <= settings.jpeg_quality <= 100:
            raise ValueError(f"http reward format={settings.format!r}, jpeg_quality={settings.jpeg_quality}: expected "
                             f"png or jpeg, quality 1..100")
        if settings.batch_size < 1 or settings.retries < 0 or settings.timeout_s <= 0 or settings.backoff_s < 0:
            raise ValueError("http reward batch_size >= 1, retries >= 0, timeout_s > 0 and backoff_s >= 0 expected")
        return settings

    @property
    def base(self) -> str:
        return self.url.rstrip("/")

    def health_problem(self) -> str | None:
        """None when ``<url>/health`` answers ok within ``timeout_s``, else what went wrong (one line)."""
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except (OSError, ValueError) as exc:
            return f"reward server {self.base} does not answer ({_reason(exc)}); start it (scripts/reward_server.py)"
        if not isinstance(answer, dict) or answer.get("status") != "ok":
            return f"reward server {self.base}: /health answered {answer!r}, not {{'status': 'ok'}}"
        return None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}: {reason or exc}"


def encode_images(images, image_format: str = "png", quality: int = 95) -> list[str]:
    """``[B, 3, H, W]`` in [0, 1] -> base64 PNG / JPEG strings (rounded to 8 bits, as every image file is)."""
    import numpy as np
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to("cpu").byte().permute(0, 2, 3, 1).numpy()
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        if image_format == "png":
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
        else:
            Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: list[str]):
    """Inverse of `encode_images`: ``[B, 3, H, W]`` float32 in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for text in encoded:
        with Image.open(io.BytesIO(base64.b64decode(text))) as image:
            arrays.append(np.asarray(image.convert("RGB")).copy())
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


class HttpReward:
    """``score(images, prompts)`` answered by a reward server (see the module docstring)."""

    def __init__(self, settings: HttpRewardSettings, check: bool = True):
        self.settings = settings
        if check:
            problem = settings.health_problem()
            if problem:
                raise RewardServerError(problem)

    def _post(self, payload: bytes) -> dict:
        s = self.settings
        last = None
        for attempt in range(s.retries + 1):
            if attempt:
                time.sleep(s.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(f"{s.base}/score", data=payload, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=s.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code < 500:  # the request itself is wrong: retrying will not help
                    raise RewardServerError(f"reward server {s.base}/score refused the request: HTTP {exc.code} "
                                            f"{exc.read()[:200]!r}") from None
                last = exc
            except (OSError, ValueError) as exc:
                last = exc
        raise RewardServerError(f"reward server {s.base} failed {s.retries + 1} time(s) ({_reason(last)})")

    def score(self, images, prompts: list[str]):
        import torch

        s = self.settings
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = []
        for start in range(0, len(prompts), s.batch_size):
            chunk = slice(start, start + s.batch_size)
            payload = json.dumps({"prompts": list(prompts[chunk]), "format": s.format,
                                  "images": encode_images(images[chunk], s.format, s.jpeg_quality)}).encode()
            answer = self._post(payload).get("scores")
            count = len(prompts[chunk])
            if not isinstance(answer, list) or len(answer) != count:
                raise RewardServerError(f"reward server {s.base}/score answered {str(answer)[:100]} for {count} images; "
                                        f"expected a list of {count} scores")
            scores += [math.nan if v is None else float(v) for v in answer]
        return torch.tensor(scores, dtype=torch.float32)

"""Shared fixtures: the tiny checkpoints are built once per test session, in a temporary folder."""

import os

# No test may touch the network: open_clip pretrained tags and hub lookups fail fast offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from g2rpo.config import ModelsConfig, load_config  # noqa: E402
from g2rpo.data import read_prompt_file  # noqa: E402
from g2rpo.tiny import prepare_tiny_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPTS = ROOT / "data" / "example_prompts.txt"


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return read_prompt_file(EXAMPLE_PROMPTS)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, prompts) -> Path:
    """``ckpt/tiny`` as scripts/prepare_tiny_checkpoints.py builds it (seed 0), in a session temp dir."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    prepare_tiny_checkpoints(out, prompts, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpt) -> ModelsConfig:
    """configs/models/tiny.yaml with its ``ckpt/tiny`` paths pointed at the session's build."""
    config = load_config(ModelsConfig, ROOT / "configs" / "models" / "tiny.yaml")
    overrides = []
    for section, key in (("flux", "path"), ("hps", "base_dir"), ("hps", "checkpoint"), ("clip_score", "path"),
                         ("pickscore", "model"), ("pickscore", "processor")):
        value = getattr(getattr(config, section), key)
        assert value.startswith("ckpt/tiny/"), f"tiny.yaml {section}.{key} should live under ckpt/tiny/"
        overrides.append(f"{section}.{key}={tiny_ckpt / value.removeprefix('ckpt/tiny/')}")
    return load_config(ModelsConfig, ROOT / "configs" / "models" / "tiny.yaml", overrides)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    from g2rpo.models import load_flux_pipeline

    pipe = load_flux_pipeline(tiny_models.flux.path, tiny_models.flux.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe

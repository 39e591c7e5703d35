"""Shared fixtures: the tiny checkpoints are built once per test session, in a temporary folder."""

import os

# No test may touch the network: open_clip pretrained tags and hub lookups fail fast offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from g2rpo.config import ModelsConfig, load_config  # noqa: E402
from g2rpo.data import read_prompt_file  # noqa: E402
from g2rpo.tiny import prepare_tiny_checkpoints  # noqa: E402

# In-process tests use one thread, as the torchrun subprocesses do (OMP_NUM_THREADS=1 in ENV): on a busy
# 2-core machine more threads only contend.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
EXAMPLE_PROMPTS = ROOT / "data" / "example_prompts.txt"
TINY_T5_LENGTH = 64  # T5 positions of the tiny default's embeddings (scripts/run_tiny.sh)


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return read_prompt_file(EXAMPLE_PROMPTS)


# The longest files first (measured on 2 cores; the rest keep their order). pytest-xdist's loadfile hands out whole
# files in collection order, so with alphabetical order the two longest (test_reliability.py, test_train.py) came
# near the end and one worker ran them alone while the other idled: longest-first shortens the run.
LONGEST_FILES = ("test_newcomer.py", "test_reliability.py", "test_train.py", "test_methods.py", "test_rollout_weights.py",
                 "test_evaluation.py", "test_refusals.py", "test_gpu_first_light.py", "test_engine.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: in-file order kept


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` fills once per test run. Under pytest-xdist the workers share one copy: the
    first to get here builds it under a file lock, the others wait for it (they never modify it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this run's folder, shared by its workers
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.write_text("")
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, prompts) -> Path:
    """``ckpt/tiny`` as scripts/prepare_tiny_checkpoints.py builds it (seed 0), in a session temp dir."""
    return built_once(tmp_path_factory, "ckpt", lambda folder: prepare_tiny_checkpoints(folder / "tiny", prompts,
                                                                                          seed=0)) / "tiny"


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpt) -> ModelsConfig:
    """configs/models/tiny.yaml with its ``ckpt/tiny`` paths pointed at the session's build."""
    config = load_config(ModelsConfig, ROOT / "configs" / "models" / "tiny.yaml")
    overrides = []
    for section, key in (("base", "path"), ("hps", "base_dir"), ("hps", "checkpoint"), ("clip_score", "path"),
                         ("pickscore", "model"), ("pickscore", "processor"), ("imagereward", "checkpoint"),
                         ("imagereward", "med_config"), ("imagereward", "tokenizer"), ("unifiedreward", "path")):
        value = getattr(getattr(config, section), key)
        assert value.startswith("ckpt/tiny/"), f"tiny.yaml {section}.{key} should live under ckpt/tiny/"
        overrides.append(f"{section}.{key}={tiny_ckpt / value.removeprefix('ckpt/tiny/')}")
    return load_config(ModelsConfig, ROOT / "configs" / "models" / "tiny.yaml", overrides)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    from g2rpo.models.flux import load_flux_pipeline

    pipe = load_flux_pipeline(tiny_models.base.path, tiny_models.base.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_overrides(models: ModelsConfig) -> list[str]:
    """Dotted overrides pointing a training config's models at the session's tiny checkpoints."""
    return [f"models.base.path={models.base.path}", f"models.hps.base_dir={models.hps.base_dir}",
            f"models.hps.checkpoint={models.hps.checkpoint}", f"models.clip_score.path={models.clip_score.path}",
            # the held-out evaluation's out-of-domain rewards (eval.rewards: every one whose files are present)
            f"models.pickscore.model={models.pickscore.model}", f"models.pickscore.processor={models.pickscore.processor}",
            f"models.imagereward.checkpoint={models.imagereward.checkpoint}",
            f"models.imagereward.med_config={models.imagereward.med_config}",
            f"models.imagereward.tokenizer={models.imagereward.tokenizer}"]


# A 2-update step of the tiny config (T = 4, K = 2, N = 4), no samples or held-out evaluation, exact checkpoints.
SMALL_STEP = ("sample_every=0", "eval_every=0", "data.holdout=0", "save_dtype=float32", "keep_last=0",
              "sampling.num_steps=4", "sampling.branch_steps=[0,1]", "sampling.group_size=4")


def small_trainer(tiny_models, tiny_embeddings, out, *overrides):
    """An in-process `Trainer` (one rank, CPU) of configs/tiny.yaml at `SMALL_STEP` into ``out``."""
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer

    cfg = load_config(TrainConfig, ROOT / "configs/tiny.yaml", [
        *model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={out}",
        *SMALL_STEP, *overrides])
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


@pytest.fixture(scope="session")
def tiny_embeddings(tiny_models, tmp_path_factory) -> Path:
    """data/example_prompts.txt encoded by the 2-process preprocessing job, at the tiny default's 64 T5 positions
    (scripts/run_tiny.sh; FLUX.1-dev uses 512)."""

    def build(folder):
        cmd = [*TORCHRUN, "-m", "g2rpo.preprocess", "--model", tiny_models.base.path, "--prompts",
               str(EXAMPLE_PROMPTS), "--out", str(folder / "tiny_embeddings"), "--dtype", "float32", "--device", "cpu",
               "--max-sequence-length", str(TINY_T5_LENGTH)]
        result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    return built_once(tmp_path_factory, "emb", build) / "tiny_embeddings"


# ------------------------------------------------------------------------------------ SD3 (tiny)

TINY_SD3_T5_LENGTH = 16  # T5 positions of the tiny SD3 embeddings (configs/tiny_sd35m_densegrpo.yaml's header)


@pytest.fixture(scope="session")
def tiny_sd3_models(tiny_ckpt) -> ModelsConfig:
    """configs/models/tiny_sd3.yaml with its ``ckpt/tiny`` paths pointed at the session's build."""
    path = ROOT / "configs" / "models" / "tiny_sd3.yaml"
    config = load_config(ModelsConfig, path)
    overrides = []
    for section, key in (("base", "path"), ("hps", "base_dir"), ("hps", "checkpoint"), ("clip_score", "path"),
                         ("pickscore", "model"), ("pickscore", "processor"), ("imagereward", "checkpoint"),
                         ("imagereward", "med_config"), ("imagereward", "tokenizer")):
        value = getattr(getattr(config, section), key)
        overrides.append(f"{section}.{key}={tiny_ckpt / value.removeprefix('ckpt/tiny/')}")
    return load_config(ModelsConfig, path, overrides)


def sd3_model_overrides(models: ModelsConfig) -> list[str]:
    """`model_overrides` of the tiny SD3 models, PickScore's folders included."""
    return [*model_overrides(models), f"models.pickscore.model={models.pickscore.model}",
            f"models.pickscore.processor={models.pickscore.processor}"]


@pytest.fixture(scope="session")
def tiny_sd3_embeddings(tiny_sd3_models, tmp_path_factory) -> Path:
    """data/example_prompts.txt encoded by the tiny SD3 pipeline's three text encoders (one process), with the empty
    prompt's embedding beside the index."""

    def build(folder):
        cmd = [sys.executable, "-m", "g2rpo.preprocess", "--model", tiny_sd3_models.base.path, "--prompts",
               str(EXAMPLE_PROMPTS), "--out", str(folder / "emb"), "--dtype", "float32", "--device", "cpu",
               "--max-sequence-length", str(TINY_SD3_T5_LENGTH)]
        result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    return built_once(tmp_path_factory, "sd3_emb", build) / "emb"

"""Never lose or mix a run, in one process: the output folder's lock, fresh vs resumed starts, what may
change on resume, data compared by content, embedding files checked up front, full disks, and the
held-out evaluation a stop pre-empted."""

import json
import os
import shutil
import signal

import pytest
import torch

from conftest import ROOT, model_overrides
from g2rpo import checkpoint
from g2rpo.config import TrainConfig, load_config, resume_differences
from g2rpo.distributed import DistInfo
from g2rpo.rundir import RunInUseError, RunLock
from g2rpo.trainer import Interrupted, Trainer

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
SMALL = ("max_steps=1", "sampling.branch_steps=[0, 1]", "sampling.group_size=4", "sample_every=0", "eval_every=0",
         "data.holdout=0", "checkpoint_start=0", "checkpoint_every=1", "keep_last=0", "save_dtype=float32")


def _cfg(tiny_models, index, out, *overrides):
    return load_config(TrainConfig, ROOT / "configs" / "tiny.yaml", [
        *model_overrides(tiny_models), f"data.index={index}", f"output_dir={out}", *SMALL, *overrides])


def _history(out):
    return [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def index(tiny_embeddings):
    return tiny_embeddings / "index.jsonl"


def test_a_locked_folder_is_refused_naming_the_holder(tiny_models, index, tmp_path):
    holder = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(RunInUseError, match=rf"another run is writing to this folder .*\"pid\": {os.getpid()}"):
            Trainer(_cfg(tiny_models, index, tmp_path / "run"), CPU)
    finally:
        holder.release()
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_fresh_start_over_a_run_is_refused_overwrite_replaces_it_auto_continues(tiny_models, index, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_models, index, out), CPU).fit()
    config = (out / "config.yaml").read_bytes()
    with pytest.raises(FileExistsError, match="holds an earlier run .*--resume auto.*--overwrite"):
        Trainer(_cfg(tiny_models, index, out, "seed=7"), CPU)
    assert (out / "config.yaml").read_bytes() == config and len(_history(out)) == 1

    before = checkpoint.verify(out / "checkpoint-0")
    Trainer(_cfg(tiny_models, index, out, "seed=7", "overwrite=true"), CPU).fit()
    assert _steps(out) == [0] and len(_history(out)) == 1  # the earlier run's lines are gone, not appended to
    assert checkpoint.verify(out / "checkpoint-0")["config"]["seed"] == 7 != before["config"]["seed"]

    Trainer(_cfg(tiny_models, index, out, "seed=7", "max_steps=2", "resume=auto"), CPU).fit()
    assert _steps(out) == [0, 1]
    history = _history(out)
    assert [h["step"] for h in history] == [0, 1] and history[1]["resumed_from"].endswith("checkpoint-0")
    assert history[1]["changes"] == ["max_steps: checkpoint 1 != now 2"]


def test_auto_does_not_start_afresh_over_exports_it_cannot_resume(tiny_models, index, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_models, index, out, "max_steps=2", "keep_last=1"), CPU).fit()
    shutil.rmtree(out / "checkpoint-1")  # only checkpoint-0's export (its state purged) is left
    with pytest.raises(FileExistsError, match=r"no resumable checkpoint, but the folder holds exports .*checkpoint-0"):
        Trainer(_cfg(tiny_models, index, out, "max_steps=2", "resume=auto"), CPU)


def test_resume_applies_what_may_change_and_refuses_the_rest(tiny_models, index, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(_cfg(tiny_models, index, out), CPU).fit()
    config = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"(?s)with a different setup.*ppo.clip_range: checkpoint 0.05 != now 0.1.*"
                                         r"sampling.eta: checkpoint 0.7 != now 0.5"):
        Trainer(_cfg(tiny_models, index, out, "max_steps=2", "resume=auto", "sampling.eta=0.5", "ppo.clip_range=0.1"),
                CPU)
    assert (out / "config.yaml").read_text() == config, "a refused resume rewrote config.yaml"

    trainer = Trainer(_cfg(tiny_models, index, out, "max_steps=2", "resume=auto", "optim.lr=2e-4"), CPU)
    trainer.fit()
    assert trainer.engine.optimizer.param_groups[0]["lr"] == 2e-4  # not the checkpoint's 1e-3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == [1e-3, 2e-4]
    assert "changed on resume, applied from step 1: optim.lr: checkpoint 0.001 != now 0.0002" in capsys.readouterr().out
    assert "optim.lr: checkpoint 0.001 != now 0.0002" in _history(out)[1]["changes"]
    assert "lr: 0.0002" in (out / "config.yaml").read_text()


def test_every_field_is_must_match_unless_listed():
    saved = {"optim": {"lr": 1.0, "eps": 1e-8}, "models": {"pickscore": {"dtype": "a"}}, "seed": 1}
    now = {"optim": {"lr": 2.0, "eps": 1e-6}, "models": {"pickscore": {"dtype": "b"}}, "seed": 2}
    refused, changed = resume_differences(saved, now)
    assert refused == ["optim.eps: checkpoint 1e-08 != now 1e-06", "seed: checkpoint 1 != now 2"]
    assert changed == ["models.pickscore.dtype: checkpoint 'a' != now 'b'", "optim.lr: checkpoint 1.0 != now 2.0"]


def test_resume_compares_the_data_by_content_not_by_path(tiny_models, index, tmp_path):
    out, moved = tmp_path / "run", tmp_path / "moved"
    Trainer(_cfg(tiny_models, index, out), CPU).fit()
    shutil.copytree(index.parent, moved)
    Trainer(_cfg(tiny_models, moved / "index.jsonl", out, "max_steps=2", "resume=auto"), CPU).fit()
    assert _steps(out) == [0, 1]
    lines = (moved / "index.jsonl").read_text().splitlines()
    entry = json.loads(lines[3])
    entry["caption"] = "a different caption"
    lines[3] = json.dumps(entry)
    (moved / "index.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"data content \(index_sha256 of .*moved/index.jsonl\): differs"):
        Trainer(_cfg(tiny_models, moved / "index.jsonl", out, "max_steps=3", "resume=auto"), CPU)


def test_a_bad_embedding_file_is_found_before_any_model_loads(tiny_models, index, tmp_path, monkeypatch):
    import g2rpo.trainer

    data = shutil.copytree(index.parent, tmp_path / "data")
    entries = [json.loads(line) for line in (data / "index.jsonl").read_text().splitlines()]
    last = data / entries[-1]["file"]  # the schedule would reach it late, if ever
    last.write_bytes(last.read_bytes()[:1000])
    monkeypatch.setattr(g2rpo.trainer, "build_engine", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(ValueError, match=rf"{last}: cannot read embedding file"):
        Trainer(_cfg(tiny_models, data / "index.jsonl", tmp_path / "run"), CPU)
    from g2rpo.io import save_safetensors

    save_safetensors({"prompt_embeds": torch.zeros(512, 8), "pooled_prompt_embeds": torch.zeros(32),
                      "text_ids": torch.zeros(512, 3)}, last)
    with pytest.raises(ValueError, match=rf"{last}: embedding dims \(D=8, P=32\) do not match"):
        Trainer(_cfg(tiny_models, data / "index.jsonl", tmp_path / "run"), CPU)


def test_full_disk_names_the_folder_and_the_space_and_keeps_earlier_checkpoints(tiny_models, index, tmp_path,
                                                                               monkeypatch):
    import errno
    from collections import namedtuple

    out = tmp_path / "run"
    trainer = Trainer(_cfg(tiny_models, index, out, "max_steps=2"), CPU)
    trainer.fit()
    size = sum(e["size"] for e in json.loads((out / "checkpoint-1" / checkpoint.MARKER).read_text())["files"].values())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=rf"{out}: not enough disk space for checkpoint-2: 1e-06 GB free, about "
                                      rf"{size / 1e9:.3g} GB needed \(the size of checkpoint-1\)"):
        trainer.save_checkpoint(2)
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_safetensors", full)
    with pytest.raises(OSError, match=rf"{out}: the disk filled up while writing checkpoint-2 .*earlier checkpoints "
                                      rf"are intact"):
        trainer.save_checkpoint(2)
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-2").exists()
    checkpoint.verify(out / "checkpoint-1")


def test_heldout_evaluation_pre_empted_by_a_stop_runs_on_resume(tiny_models, index, tmp_path, monkeypatch):
    """A SIGTERM during step 0's update: the step completes, checkpoint-0 is committed without the held-out
    evaluation due after it, and the resumed run evaluates first, so every due evaluation is logged once."""
    out = tmp_path / "run"
    cfg = ("max_steps=2", "data.holdout=2", "eval_every=1", "checkpoint_start=100")
    original = Trainer.update

    def update(self, groups, advantages):
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the run stops at its next check
        return original(self, groups, advantages)

    monkeypatch.setattr(Trainer, "update", update)
    with pytest.raises(Interrupted, match=r"SIGTERM \(after step 0; checkpoint-0\)") as stop:
        Trainer(_cfg(tiny_models, index, out, *cfg), CPU).fit()
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint.verify(out / "checkpoint-0")["step"] == 1
    held = lambda: [json.loads(line)["step"] for line in (out / "heldout.jsonl").read_text().splitlines()]  # noqa: E731
    assert held() == [0]
    monkeypatch.undo()
    Trainer(_cfg(tiny_models, index, out, *cfg, "resume=auto"), CPU).fit()
    assert held() == [0, 1, 2] and _steps(out) == [0, 1]

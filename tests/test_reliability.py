"""Exact resume, committed checkpoints, fault handling (2 FSDP ranks on the tiny models)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, ROOT
from conftest import model_overrides as _model_overrides
from g2rpo import checkpoint
from g2rpo.models import read_weights


def _cmd(tiny_models, embeddings, out, *overrides, script=("-m", "g2rpo.train"), torchrun_args=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun_args,
            *script, "--config", str(ROOT / "configs/tiny.yaml"), *_model_overrides(tiny_models),
            f"data.index={embeddings / 'index.jsonl'}", f"output_dir={out}", *SMALL, *overrides]


# The tiny config made cheaper still (T=4, K=2, N=4): these tests are about the loop, not the numbers.
SMALL = ("sample_every=0", "eval_every=0", "data.holdout=0", "save_dtype=float32", "keep_last=0",
         "sampling.num_steps=4", "sampling.branch_steps=[0,1]", "sampling.group_size=4")
K = 2  # updates per step under SMALL


def _run(cmd, expect=0):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if expect is not None and result.returncode != expect:
        raise AssertionError(f"exit {result.returncode} (expected {expect}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def _metrics(out):
    return {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def _same_weights(a, b):
    wa, wb = read_weights(a / "transformer"), read_weights(b / "transformer")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


DETERMINISTIC = ("loss", "reward/hps", "reward/clip_score", "eval_reward/hps", "clip_frac", "grad_norm")


@pytest.fixture(scope="module")
def straight(tiny_models, tiny_embeddings, tmp_path_factory):
    """4 steps without interruption, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("straight") / "run"
    _run(_cmd(tiny_models, tiny_embeddings, out, "max_steps=4", "checkpoint_start=0", "checkpoint_every=1"))
    return out


def _wait_for(path, lines, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and not (path.is_file() and path.read_text().count("\n") >= lines):
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_preemption_in_a_step_longer_than_torchruns_grace_keeps_the_last_step(straight, tiny_models,
                                                                             tiny_embeddings, tmp_path):
    """SIGTERM to the whole job (as a scheduler sends it) while step 1's rollout takes 35 s, more than
    torchrun's default 30 s before it kills the workers: through g2rpo.launch the workers abandon step 1,
    commit checkpoint-0 (the last completed step) and the job exits 128 + SIGTERM; the resumed run equals
    the uninterrupted one. Meanwhile a second run into the same output_dir is refused by the lock."""
    out = tmp_path / "run"
    cmd = _cmd(tiny_models, tiny_embeddings, out, "max_steps=4", "checkpoint_start=100",
               script=("tests/helpers/train_with_faults.py", "slow@*:1:35"))
    cmd[1:3] = ["-m", "g2rpo.launch"]  # instead of torch.distributed.run
    process = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    _wait_for(out / "metrics.jsonl", 1, process)  # step 0 is done; step 1's rollout is sleeping
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import DistInfo
    from g2rpo.rundir import RunInUseError
    from g2rpo.trainer import Trainer

    second = load_config(TrainConfig, ROOT / "configs/tiny.yaml", [  # in process: the lock is the folder's, not the job's
        *_model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={out}", *SMALL,
        "max_steps=4", "resume=auto"])
    with pytest.raises(RunInUseError, match=r'another run is writing to this folder \(lock .* held by .*"pid": '):
        Trainer(second, DistInfo(0, 1, 0, torch.device("cpu")))
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "step 1 abandoned before its update; checkpoint-0" in output
    latest = checkpoint.find_latest(out)
    assert latest.name == "checkpoint-0" and checkpoint.verify(latest)["step"] == 1
    assert sorted(_metrics(out)) == [0]
    _run(_cmd(tiny_models, tiny_embeddings, out, "max_steps=4", "checkpoint_start=100", "--resume", "auto"))
    assert _same_weights(out / "checkpoint-3", straight / "checkpoint-3")
    resumed, reference = _metrics(out), _metrics(straight)
    assert [resumed[s]["loss"] for s in range(4)] == [reference[s]["loss"] for s in range(4)]
    assert (out / "metrics.jsonl").read_text().count("\n") == 4  # nothing logged twice


def test_crash_under_max_restarts_resumes_bit_identically(straight, tiny_models, tiny_embeddings, tmp_path):
    """Rank 1 dies at the start of step 2; torchrun (--max-restarts=1) restarts both ranks, which resume from
    checkpoint-1: every logged value and every checkpoint equals the uninterrupted run's, logged once."""
    out = tmp_path / "run"
    result = _run(_cmd(tiny_models, tiny_embeddings, out, "max_steps=4", "checkpoint_start=0", "checkpoint_every=1",
                       "resume=auto", script=("tests/helpers/train_with_faults.py", "crash@1:2"),
                       torchrun_args=("--max-restarts=1",)))
    assert "injected crash of rank 1 at step 2" in result.stdout + result.stderr
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    resumed, reference = _metrics(out), _metrics(straight)
    assert sorted(resumed) == [0, 1, 2, 3]  # the log continues without duplicates
    assert (out / "metrics.jsonl").read_text().count("\n") == 4
    for step in range(4):
        for key in DETERMINISTIC:
            assert resumed[step][key] == reference[step][key], (step, key)
        assert _same_weights(out / f"checkpoint-{step}", straight / f"checkpoint-{step}"), step
    state = checkpoint.verify(out / "checkpoint-3")
    assert state["step"] == 4 and state["world_size"] == 2


def test_non_finite_values_and_a_full_disk_on_one_rank(straight, tiny_models, tiny_embeddings, tmp_path):
    """One run, three faults of rank 1: its rewards are NaN at step 1 (the whole step is skipped on both ranks),
    its PPO loss at step 2 (each of that step's updates is skipped on both ranks), step 3 trains again; then
    its disk is full while writing checkpoint-4: every rank fails with one message naming the folder and the
    space, no partial checkpoint is left and the earlier ones stay committed."""
    out = tmp_path / "run"
    faults = "nan-reward@1:1,nan-loss@1:2,enospc@1:4"
    result = _run(_cmd(tiny_models, tiny_embeddings, out, "max_steps=5", "checkpoint_start=0", "checkpoint_every=1",
                       "max_consecutive_skips=10", script=("tests/helpers/train_with_faults.py", faults)), expect=None)
    metrics = _metrics(out)
    assert [metrics[s]["skipped_updates"] for s in range(5)] == [0, K, K, 0, 0]
    assert _same_weights(out / "checkpoint-0", straight / "checkpoint-0")
    assert _same_weights(out / "checkpoint-1", out / "checkpoint-0"), "a skipped step changed parameters"
    assert _same_weights(out / "checkpoint-2", out / "checkpoint-1"), "a skipped update changed parameters"
    assert not _same_weights(out / "checkpoint-3", out / "checkpoint-2")
    assert checkpoint.verify(out / "checkpoint-3")["skipped"] == 2 * K

    assert result.returncode != 0
    assert "the disk filled up while writing checkpoint-4" in result.stderr and str(out) in result.stderr
    assert "GB needed" in result.stderr and "Traceback" not in result.stderr.split("the disk filled up")[1][:400]
    assert not list(out.glob(".checkpoint-*")) and not (out / "checkpoint-4").exists()
    assert checkpoint.find_latest(out).name == "checkpoint-3"


def test_too_many_consecutive_skips_stop_the_run(tiny_models, tiny_embeddings, tmp_path):
    """In process (one rank; that the ranks agree on a skip is the test above): rewards NaN from step 1 on."""
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import NonFiniteError, Trainer

    out = tmp_path / "run"
    cfg = load_config(TrainConfig, ROOT / "configs/tiny.yaml", [
        *_model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={out}", *SMALL,
        "max_steps=4", "max_consecutive_skips=2", "checkpoint_start=100"])
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    score = trainer.score

    def nan_from_step_1(groups):
        score(groups)
        for group in groups:
            if trainer.state.step >= 1:
                group.rewards = torch.full_like(group.rewards, float("nan"))

    trainer.score = nan_from_step_1
    with pytest.raises(NonFiniteError, match=r"3 skips in a row \(last: non-finite reward\), more than "
                                             r"max_consecutive_skips=2"):
        trainer.fit()
    assert len(_metrics(out)) == 3  # steps 0, 1 and 2 logged; the run stopped in step 3


def test_resume_errors(straight, tiny_models, tiny_embeddings, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight / "checkpoint-1", out / "checkpoint-1")
    saved = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    other = {**saved["config"], "sampling": {**saved["config"]["sampling"], "group_size": 2, "branch_steps": [0]}}
    with pytest.raises(ValueError, match=r"(?s)with a different setup.*sampling.branch_steps: checkpoint \[0, 1\] != "
                                         r"now \[0\].*sampling.group_size: checkpoint 4 != now 2"):
        checkpoint.check_resume(out / "checkpoint-1", other, 2, saved["data"])
    with pytest.raises(FileNotFoundError, match="checkpoint-7: no such checkpoint directory"):
        checkpoint.resolve_resume(str(out / "checkpoint-7"), out)
    # an error on rank 0 alone (its trainer_state.json is incomplete) reaches rank 1: both end, promptly
    state_file = out / "checkpoint-1" / "trainer_state.json"
    del saved["config"]
    state_file.write_text(json.dumps(saved))
    started = time.time()
    broken = _run(_cmd(tiny_models, tiny_embeddings, out, "max_steps=4", "--resume", "auto"), expect=None)
    assert broken.returncode != 0 and "trainer_state.json: unreadable or incomplete (KeyError" in broken.stderr
    assert time.time() - started < 120
    assert not (out / "config.yaml").exists(), "a refused resume wrote its config"
    with pytest.raises(ValueError, match="not a committed checkpoint"):
        checkpoint.verify(tmp_path)


def test_auto_resume_in_an_empty_directory_starts_fresh(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path / "nothing-here") is None
    assert checkpoint.resolve_resume("", tmp_path) is None


def _fake_checkpoint(root, step, committed=True):
    path = root / f"checkpoint-{step}"
    (path / "state").mkdir(parents=True)
    (path / "transformer").mkdir()
    (path / "state" / "model.bin").write_bytes(b"x" * step)
    if committed:
        (path / checkpoint.MARKER).write_text('{"files": {}}')
    return path


def test_uncommitted_checkpoints_are_ignored_and_purge_keeps_k(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 8, committed=False)  # interrupted while being written
    (tmp_path / ".checkpoint-10.tmp").mkdir()
    assert checkpoint.find_latest(tmp_path).name == "checkpoint-6"
    removed = checkpoint.purge(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert not (tmp_path / "checkpoint-2" / "state").exists() and (tmp_path / "checkpoint-2" / "transformer").is_dir()
    with pytest.raises(ValueError, match="its resumable state was deleted"):
        checkpoint.verify(tmp_path / "checkpoint-2")  # its manifest stays, for the export
    assert (tmp_path / "checkpoint-4" / "state").is_dir() and (tmp_path / "checkpoint-6" / "state").is_dir()
    assert checkpoint.find_latest(tmp_path).name == "checkpoint-6"


def test_corrupted_or_truncated_files_are_named(straight, tmp_path):
    copy = shutil.copytree(straight / "checkpoint-2", tmp_path / "checkpoint-2")
    shard = next(p for p in sorted((copy / "state").rglob("*")) if p.is_file() and p.stat().st_size > 100)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}: SHA-256 mismatch"):
        checkpoint.verify(copy)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(ValueError, match=f"{shard.name}: .* bytes, expected .* \\(truncated or corrupted\\)"):
        checkpoint.verify(copy)
    checkpoint.verify(straight / "checkpoint-2")  # the original is intact


@pytest.mark.slow
def test_deepspeed_trains_like_fsdp_exports_and_resumes_bit_identically(straight, tiny_models, tiny_embeddings,
                                                                          tmp_path):
    """ZeRO-2 on 2 ranks: the same losses and rewards as the FSDP run (same seeds, same data), an export that
    reloads into diffusers with every parameter trained, and a resume of its checkpoint-0 in a new folder equal
    to the uninterrupted run (torchrun's restart path is the FSDP crash test's). DeepSpeed's shared-memory comm
    op is not compiled (engine._skip_cpu_shm_comm_op): the losses equal FSDP's without it."""
    from diffusers import FluxTransformer2DModel

    ds = ("engine.kind=deepspeed", "engine.zero_stage=2", "checkpoint_start=0", "checkpoint_every=1")
    straight_out, out = tmp_path / "straight", tmp_path / "resumed"
    first = _run(_cmd(tiny_models, tiny_embeddings, straight_out, "max_steps=2", *ds))
    assert "shm_comm" not in first.stdout + first.stderr  # no g++ build of DeepSpeed's CPU inference all-reduce
    for noise in ("FutureWarning", "DeprecationWarning", "[WARNING]"):  # as quiet as an FSDP run
        assert noise not in first.stdout + first.stderr, noise
    for step in (0, 1):
        for key in ("loss", "reward/hps", "eval_reward/clip_score"):
            assert _metrics(straight_out)[step][key] == pytest.approx(_metrics(straight)[step][key], rel=1e-3,
                                                                      abs=1e-6), (step, key)
    trained = FluxTransformer2DModel.from_pretrained(straight_out / "checkpoint-1" / "transformer",
                                                     local_files_only=True)
    base = FluxTransformer2DModel.from_pretrained(tiny_models.base.path, subfolder="transformer", local_files_only=True)
    unchanged = [n for n, p in trained.named_parameters() if torch.equal(p, base.get_parameter(n))]
    assert not unchanged, unchanged[:5]
    result = _run(_cmd(tiny_models, tiny_embeddings, out, "max_steps=2", *ds,
                       f"resume={straight_out / 'checkpoint-0'}"))
    assert "resumed from" in result.stdout and "at step 1" in result.stdout
    assert _same_weights(out / "checkpoint-1", straight_out / "checkpoint-1")
    assert _metrics(out)[1]["loss"] == _metrics(straight_out)[1]["loss"]


def test_rng_state_round_trip():
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    saved = json.loads(json.dumps(checkpoint.rng_state()))  # as written to rng_rank*.json
    first = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3).tolist())
    checkpoint.set_rng_state(saved)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3).tolist()) == first

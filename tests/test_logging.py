"""Rank 0's logs besides metrics.jsonl: Weights & Biases (``logging.wandb``) in its offline mode, read back from the
run file it writes, against the JSONL logs of the same run -- a fresh start and a resumed one."""

import json
import math
import struct

import pytest

from tests.conftest import small_trainer

wandb = pytest.importorskip("wandb")

OFFLINE = ("logging.wandb=true", "logging.wandb_mode=offline", "logging.tensorboard=false", "data.holdout=2",
           "eval_every=1", "eval.rewards=[]", "eval.strip=2", "checkpoint_every=1", "checkpoint_start=0")


def wandb_history(run_file) -> dict[int, dict]:
    """The history rows of an offline W&B run file (``run-<id>.wandb``), merged by the training step they carry:
    ``{step: {key: value}}``. The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks: crc32,
    length, type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, rows, buffer = run_file.read_bytes(), 32768, {}, b""
    assert data[:4] == b":W&B", run_file
    pos = 7
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buffer = chunk if kind in (1, 2) else buffer + chunk  # FULL / FIRST start a record; MIDDLE / LAST go on
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.setdefault(int(items.pop("step")), {}).update(items)
    return rows


def jsonl_scalars(out) -> dict[int, dict]:
    """What metrics.jsonl and heldout.jsonl hold, per step, as the scalars W&B should hold."""
    rows: dict[int, dict] = {}
    for name in ("metrics.jsonl", "heldout.jsonl"):
        for line in (out / name).read_text().splitlines():
            record = json.loads(line)
            step = record.pop("step")
            if "hacking" in record:
                record["heldout/hacking_flags"] = len(record.pop("hacking"))
            rows.setdefault(step, {}).update(record)
    return rows


def assert_holds(history: dict[int, dict], expected: dict[int, dict]) -> None:
    assert sorted(history) == sorted(expected)
    for step, values in expected.items():
        for key, value in values.items():
            got = history[step][key]
            assert got == value or (math.isnan(value) and math.isnan(got)), (step, key, got, value)


def test_an_offline_wandb_run_holds_the_scalars_and_strips_of_the_jsonl_logs(tiny_models, tiny_embeddings, tmp_path):
    """2 steps with a held-out evaluation after each (and before the first): every scalar of metrics.jsonl and
    heldout.jsonl is in the W&B history at its step, with the same value; each evaluation's strip is an image there,
    the same bytes as samples/heldout/; the config is the run's. logging.tensorboard=false writes no TensorBoard."""
    out = tmp_path / "run"
    small_trainer(tiny_models, tiny_embeddings, out, *OFFLINE, "max_steps=2").fit()
    saved = json.loads((out / "wandb_run.json").read_text())
    [folder] = list((out / "wandb").glob("offline-run-*"))
    assert folder.name.endswith(saved["id"]) and saved["project"] == "g2rpo"
    history, expected = wandb_history(folder / f"run-{saved['id']}.wandb"), jsonl_scalars(out)
    assert_holds(history, expected)
    assert {"loss", "reward/hps", "heldout/hps"} <= set(history[1])
    for step in (0, 1, 2):
        image = folder / "files" / history[step]["heldout/strip/path"]
        assert image.read_bytes() == (out / f"samples/heldout/step-{step:05d}.png").read_bytes()
    assert not (out / "tensorboard").exists()


def test_a_resumed_run_logs_into_the_same_wandb_run(tiny_models, tiny_embeddings, tmp_path):
    """Stopped after 1 step (its checkpoint-0), resumed to 2: the second start takes the id of wandb_run.json, so
    both starts log to one W&B run; together they hold what the JSONL logs hold, the second from the resumed step."""
    out = tmp_path / "run"
    small_trainer(tiny_models, tiny_embeddings, out, *OFFLINE, "max_steps=1").fit()
    first = json.loads((out / "wandb_run.json").read_text())
    small_trainer(tiny_models, tiny_embeddings, out, *OFFLINE, "max_steps=2", "resume=auto").fit()
    assert json.loads((out / "wandb_run.json").read_text()) == first
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(first["id"]) for f in folders)
    starts = [wandb_history(f / f"run-{first['id']}.wandb") for f in folders]
    # step 1: the first start's last evaluation (kept on resume), the second's first training step
    assert sorted(starts[0]) == [0, 1] and sorted(starts[1]) == [1, 2]
    assert "heldout/hps" in starts[0][1] and "loss" not in starts[0][1]
    assert "loss" in starts[1][1] and "heldout/hps" not in starts[1][1]
    both = {step: {**starts[0].get(step, {}), **starts[1].get(step, {})} for step in (0, 1, 2)}
    assert_holds(both, jsonl_scalars(out))


def test_a_wandb_run_that_cannot_start_is_refused_in_one_line(tiny_models, tiny_embeddings, tmp_path, monkeypatch):
    """Online without an API key: a `WandbError` naming the field and both ways out, and the folder left free."""
    from g2rpo.metrics import WandbError
    from g2rpo.rundir import RunLock

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # no stored login
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WandbError, match=r"logging\.wandb: wandb\.init failed .*wandb login.*logging\.wandb_mode=offline"):
        small_trainer(tiny_models, tiny_embeddings, tmp_path / "run", "logging.wandb=true")
    RunLock(tmp_path / "run").acquire().release()  # the folder is free


def test_a_start_that_fails_before_logging_leaves_no_run_behind(tiny_models, tiny_embeddings, tmp_path, monkeypatch):
    """A model that fails to load after the W&B run started: the W&B run is closed as failed and its local files
    removed, TensorBoard wrote nothing, so the folder holds no run and the next start is not refused."""
    import g2rpo.trainer
    from g2rpo.rundir import run_files

    def fail(*args, **kwargs):
        raise RuntimeError("the transformer did not load")

    monkeypatch.setattr(g2rpo.trainer, "build_engine", fail)
    with pytest.raises(RuntimeError, match="did not load"):
        small_trainer(tiny_models, tiny_embeddings, tmp_path / "run", "logging.wandb=true", "logging.wandb_mode=offline")
    assert run_files(tmp_path / "run") == []


def test_logging_fields_are_checked():
    from g2rpo.config import LoggingConfig

    with pytest.raises(ValueError, match=r"logging\.wandb_mode='cloud': expected online or offline"):
        LoggingConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match="logging.wandb_project is empty"):
        LoggingConfig(wandb=True, wandb_project="")

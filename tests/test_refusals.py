"""Refusals read as one line through every launcher, and one setting has one meaning however it is given.

Every expected refusal ends its process with ``error: <message>`` as the last line on stderr, exit code 2 and no
traceback -- through the real launchers, as subprocesses, under torchrun with 2 ranks where the launcher does
(`g2rpo.cli`, `g2rpo.launch`); an unexpected error keeps its traceback and names its rank. ``resume`` means the
same in a YAML file, a ``resume=`` override, ``--resume`` and ``RESUME=``.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, SMALL_STEP, model_overrides, small_trainer

FINETUNE = ["bash", str(ROOT / "scripts/finetune/finetune_g2rpo_tiny.sh")]


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **env}, capture_output=True, text=True, timeout=600)


def _assert_refused(result, expected: str) -> None:
    """Exit code 2, no traceback, the message as the last line -- and only once (not once per rank)."""
    where = f"exit {result.returncode}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines, where
    assert "Traceback" not in result.stderr, where
    assert lines[-1].startswith("error: ") and expected in lines[-1], where
    assert result.stderr.count(lines[-1]) == 1 and sum(line.startswith("error: ") for line in lines) == 1, where


@pytest.fixture(scope="module")
def run_folder(tiny_models, tiny_embeddings, tmp_path_factory):
    """A tiny run with committed checkpoints at steps 0 and 1 (2 steps, in process)."""
    out = tmp_path_factory.mktemp("refusals") / "run"
    small_trainer(tiny_models, tiny_embeddings, out, "max_steps=2", "checkpoint_every=1", "checkpoint_start=0").fit()
    return out


@pytest.fixture(scope="module")
def common(tiny_models, tiny_embeddings):
    return [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", *SMALL_STEP]


def _misfit_index(tiny_embeddings, folder):
    """An index like the tiny one, but its first embedding file is 16 wide where the transformer reads 32."""
    from g2rpo.data import write_embedding

    folder.mkdir(parents=True)
    lines = (tiny_embeddings / "index.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        entry["file"] = str(tiny_embeddings / entry["file"])
    write_embedding(folder / "bad.safetensors", torch.zeros(64, 16), torch.zeros(32), torch.zeros(64, 3), "bad")
    entries[0]["file"] = str(folder / "bad.safetensors")
    (folder / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder / "index.jsonl"


@pytest.mark.slow
def test_refusals_are_one_line_through_every_launcher(run_folder, common, tiny_models, tiny_embeddings, tmp_path):
    """Eleven refusals, each through the launcher a user runs (2 ranks where it starts torchrun)."""
    from g2rpo.rundir import RunLock

    copy = tmp_path / "copy"
    shutil.copytree(run_folder, copy)
    corrupted = tmp_path / "corrupted"
    shutil.copytree(run_folder, corrupted)
    shard = next((corrupted / "checkpoint-1/state").rglob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    export = tmp_path / "export"
    shutil.copytree(run_folder / "checkpoint-1", export / "checkpoint-1")
    weights = next((export / "checkpoint-1/transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    misfit = _misfit_index(tiny_embeddings, tmp_path / "misfit")
    flux = tiny_models.base.path

    cases = [  # (what, command, environment, the message's tell-tale part)
        ("a bad config value", [*FINETUNE, *common, f"output_dir={tmp_path / 'a'}", "ema.decay=1.5"], {},
         "command-line override ema.decay=1.5: expected 0 (off) or a value in (0, 1)"),
        ("a fresh start in a folder that holds a run", [*FINETUNE, *common, f"output_dir={copy}", "resume=none"], {},
         f"{copy}: holds an earlier run"),
        ("a checkpoint that does not exist", [*FINETUNE, *common, f"output_dir={tmp_path / 'b'}"],
         {"RESUME": str(tmp_path / "nowhere")}, f"resume={tmp_path / 'nowhere'}: no such checkpoint directory"),
        ("a corrupted checkpoint", [*FINETUNE, *common, f"output_dir={corrupted}"], {},
         f"{shard}: SHA-256 mismatch (corrupted)"),
        ("an output folder another run holds", [*FINETUNE, *common, f"output_dir={tmp_path / 'locked'}"], {},
         f"{tmp_path / 'locked'}: another run is writing to this folder"),
        ("embeddings that do not fit the model", [*FINETUNE, *common, f"output_dir={tmp_path / 'c'}",
                                                  f"data.index={misfit}"], {},
         "bad.safetensors: embedding dims (D=16, P=32) do not match the transformer (joint_attention_dim=32"),
        ("a GPU-only option on a CPU machine", [*FINETUNE, *common, f"output_dir={tmp_path / 'd'}", "engine.device=cuda"],
         {}, "device cuda was asked for (engine.device=cuda or --device cuda), but torch"),
        ("a missing prompt file to preprocess", ["bash", str(ROOT / "scripts/preprocess/preprocess_flux_rl_embeddings.sh"),
                                                 "--device", "cpu"],
         {"PROMPTS": str(tmp_path / "missing.txt"), "MODEL": flux, "OUT": str(tmp_path / "emb"), "GPUS": "2"},
         f"prompt file not found: {tmp_path / 'missing.txt'}"),
        ("a corrupted export to sample from", [sys.executable, str(ROOT / "scripts/inference/infer.py"), "--base", flux,
                                               "--transformer", str(export / "checkpoint-1/transformer"), "--prompt", "a fox",
                                               "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "e")],
         {}, f"{weights}: SHA-256 mismatch"),
        ("a missing prompt file to evaluate", ["bash", str(ROOT / "scripts/evaluation/run_eval.sh"), "--device", "cpu"],
         {"BASE": flux, "PROMPTS": str(tmp_path / "none.txt"), "OUT": str(tmp_path / "eval")},
         f"prompt file not found: {tmp_path / 'none.txt'}"),
        ("a benchmark without its embeddings", [sys.executable, str(ROOT / "scripts/benchmark/bench_train_step.py"),
                                                "--smoke", f"data.index={tmp_path / 'no/index.jsonl'}"], {},
         f"{tmp_path / 'no/index.jsonl'}: no embedding index"),
    ]
    lock = RunLock(tmp_path / "locked").acquire()
    try:
        for what, cmd, env, expected in cases:
            result = _run(cmd, **env)
            try:
                _assert_refused(result, expected)
            except AssertionError as failure:
                raise AssertionError(f"{what}: {failure}") from None
    finally:
        lock.release()
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in run_folder.iterdir())  # nothing written

    # a resume that goes through prints each change once (rank 0), not once per rank
    resumed = _run([*FINETUNE, *common, f"output_dir={copy}", "max_steps=3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("changed on resume, applied from step 2: max_steps: checkpoint 2 != now 3") == 1


def test_an_unexpected_error_keeps_its_traceback_and_names_its_rank():
    result = _run([sys.executable, "-m", "g2rpo.launch", "--standalone", "--nproc_per_node=2",
                   str(ROOT / "tests/helpers/raise_unexpected.py")])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert "unexpected error on rank 1 of 2 (KeyError); traceback:" in result.stderr and "KeyError: 'no such key'" \
        in result.stderr
    assert lines[-1] == "error: rank 1 failed with exit code 1 (its traceback is above)", lines[-3:]


def test_what_counts_as_a_refusal():
    """Ours and explained: yes; a ValueError from inside a library, or a bug: no (it keeps its traceback)."""
    from g2rpo.cli import is_refusal, one_line
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.rundir import RunInUseError

    with pytest.raises(ValueError) as ours:
        load_config(TrainConfig, ROOT / "configs/tiny.yaml", ["ema.decay=2"])
    with pytest.raises(ValueError) as library:
        json.loads("{not json")
    with pytest.raises(FileNotFoundError) as missing:
        load_config(TrainConfig, ROOT / "configs/nowhere.yaml")
    assert is_refusal(ours.value) and is_refusal(missing.value) and is_refusal(RunInUseError("x"))
    assert not is_refusal(library.value) and not is_refusal(KeyError("k")) and not is_refusal(PermissionError(13, "x"))
    assert one_line("a folder holds other inputs:\n  x: was 1, now 2\n  y: was 3\nuse a new --out") == \
        "a folder holds other inputs: x: was 1, now 2; y: was 3; use a new --out"


# ------------------------------------------------------------------------------------ resume, however it is given

SPELLINGS = {"none": "start: afresh;", "": "start: afresh;", "auto": "start: the newest committed checkpoint",
             "PATH": "start: resume from"}


def _dry_run(argv, capsys, inputs) -> str:
    from g2rpo import train

    train.main(["--config", argv[0], *inputs, *argv[1:], "--dry-run"])  # the overrides before any option
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("start:"))


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_resume_has_one_meaning_in_yaml_override_flag_and_launcher(spelling, tmp_path, capsys, tiny_models,
                                                                  tiny_embeddings):
    inputs = [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}"]  # the plan checks them
    value = str(tmp_path / "checkpoint-4") if spelling == "PATH" else spelling
    expected = SPELLINGS[spelling] + (f" {value}" if spelling == "PATH" else "")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text((ROOT / "configs/tiny.yaml").read_text() + f"\nresume: {json.dumps(value)}\n")
    starts = {"yaml": _dry_run([str(yaml_file)], capsys, inputs),
              "override": _dry_run([str(ROOT / "configs/tiny.yaml"), f"resume={value}"], capsys, inputs),
              "flag": _dry_run([str(ROOT / "configs/tiny.yaml"), "--resume", value], capsys, inputs)}
    for name, env, args in (("RESUME=", {"RESUME": value}, []), ("launcher override", {}, [f"resume={value}"])):
        result = _run([*FINETUNE, *inputs, *args], DRY_RUN="1", **env)
        assert result.returncode == 0, result.stderr[-2000:]
        starts[name] = next(line for line in result.stdout.splitlines() if line.startswith("start:"))
    assert all(line.startswith(expected) for line in starts.values()), starts


def test_resume_given_twice_differently_is_refused_naming_both(capsys, tiny_models, tiny_embeddings):
    from g2rpo import train

    inputs = [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}"]
    with pytest.raises(ValueError, match=r"resume is given twice, differently: --resume auto \(the launchers' RESUME=\) "
                                         r"and the override resume=none; give one"):
        train.main(["--config", str(ROOT / "configs/tiny.yaml"), "resume=none", "--resume", "auto", "--dry-run"])
    assert "afresh" in _dry_run([str(ROOT / "configs/tiny.yaml"), "resume=none", "--resume", "none"], capsys, inputs)
    _assert_refused(_run([*FINETUNE, "resume=none"], DRY_RUN="1", RESUME="auto"),
                    "resume is given twice, differently: --resume auto")
    _assert_refused(_run([*FINETUNE], DRY_RUN="1", RESUME="auto", OVERWRITE="1"),
                    "overwrite=true with resume=auto: choose one")
    # the launchers' other settings: an environment variable and its flag may not both be given
    _assert_refused(_run(["bash", str(ROOT / "scripts/evaluation/run_eval.sh"), "--transformer", "b"], TRANSFORMER="a"),
                    "TRANSFORMER=a and --transformer are both given; give one")
    _assert_refused(_run(["bash", str(ROOT / "scripts/preprocess/preprocess_flux_rl_embeddings.sh"), "--out", "b"],
                         OUT="a"), "OUT=a and --out are both given; give one")
    _assert_refused(_run([*FINETUNE, "--config", "configs/tiny.yaml"], DRY_RUN="1", CONFIG="configs/tiny.yaml"),
                    "CONFIG=configs/tiny.yaml and --config are both given; give one")
    named = _run([*FINETUNE, "--config", "configs/tiny_sd35m_densegrpo.yaml"], DRY_RUN="1")  # the flag alone: used
    assert "method: densegrpo\nbase model: SD3" in named.stdout, named.stderr[-2000:]  # (its inputs may be unbuilt)
    # without RESUME the launcher's default (auto) gives way to an explicit override
    fresh = _run([*FINETUNE, *inputs, "resume=none"], DRY_RUN="1")
    assert fresh.returncode == 0 and "start: afresh" in fresh.stdout, fresh.stderr[-2000:]
    assert "start: the newest committed checkpoint" in _run([*FINETUNE, *inputs], DRY_RUN="1").stdout

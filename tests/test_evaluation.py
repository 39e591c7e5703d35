"""The evaluation harness: a 2-process run on tiny models, its table against the per-image scores."""

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from g2rpo.evaluation import (METRIC_COLUMNS, EvaluationError, paper_comparison_markdown, parse_args, prepare_out,
                              summarize, summary_markdown)
from g2rpo.fingerprint import read_fingerprint
from g2rpo.reward_registry import build_reward

SIZE = ["--height", "64", "--width", "64", "--steps", "4", "--dtype", "float32", "--device", "cpu"]


def _evaluate(tiny_models, models_yaml, prompt_file, out, nproc=2, extra=(), ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "scripts/evaluation/evaluate.py"), "--base", tiny_models.base.path, "--prompts", str(prompt_file),
           "--models-config", str(models_yaml), "--out", str(out), *SIZE, *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _evaluate_here(tiny_models, models_yaml, prompt_file, out, extra) -> str:
    """`g2rpo.evaluation.evaluate` in this process (one rank); returns what it printed."""
    import contextlib
    import io

    from g2rpo.evaluation import evaluate

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate(["--base", tiny_models.base.path, "--prompts", str(prompt_file), "--models-config", str(models_yaml),
                  "--out", str(out), *SIZE, *extra])
    return printed.getvalue()


def _scores(out) -> list[dict]:
    return [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def _images(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def models_yaml(tiny_models, tmp_path_factory):
    import yaml

    from g2rpo.config import to_dict

    path = tmp_path_factory.mktemp("cfg") / "models.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_models)))
    return path


def test_eval_script_end_to_end(tiny_models, tiny_pipeline, models_yaml, prompts, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts[:5]) + "\n")
    out = tmp_path / "eval"
    result = _evaluate(tiny_models, models_yaml, prompt_file, out)

    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(5))
    assert [r["prompt"] for r in records] == prompts[:5]
    # per-image scores equal the reward models applied to the pipeline's own output for that seed
    image = tiny_pipeline(prompts[3], height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                          generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    image = torch.from_numpy((image * 255).round() / 255).permute(2, 0, 1)[None].float()
    for name in METRIC_COLUMNS:
        expected = build_reward(name, tiny_models).score(image, [prompts[3]])[0].item()
        assert records[3][name] == pytest.approx(expected, abs=1e-4), name

    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["metric"] for r in rows] == ["HPS-v2.1", "CLIP Score", "PickScore", "ImageReward", "UnifiedReward"]
    for row, name in zip(rows, METRIC_COLUMNS):
        values = np.array([r[name] for r in records])
        assert int(row["n"]) == 5
        assert float(row["mean"]) == pytest.approx(values.mean(), rel=1e-6)
        assert float(row["std"]) == pytest.approx(values.std(ddof=1), rel=1e-6)
    table = (out / "summary.md").read_text()
    assert table.splitlines()[0] == "| HPS-v2.1 | CLIP Score | PickScore | ImageReward | UnifiedReward |"
    assert table in result.stdout
    assert [r["unifiedreward"] for r in records] == [3.0] * 5  # the tiny judge's one answer, parsed
    assert table.splitlines()[-1].endswith("| 3.000 |")  # our row beside the paper's: all five columns filled
    assert (out / "grid.png").is_file() and not list(out.glob(".scores.rank*"))

    assert (out / "scores.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in records)
    _check_another_transformer_is_refused_until_overwrite(tiny_models, tiny_pipeline, models_yaml, prompt_file, out)


def _check_another_transformer_is_refused_until_overwrite(tiny_models, tiny_pipeline, models_yaml, prompt_file, out):
    """``out`` holds the base model's evaluation: one with another transformer into it is refused (by every
    rank, no hang), regenerates with --overwrite, and is then reused as it stands."""
    other = out.parent / "other"
    model = copy.deepcopy(tiny_pipeline.transformer)  # the base's transformer with one parameter changed
    with torch.no_grad():
        model.proj_out.bias.add_(0.5)
    model.save_pretrained(other)
    base_scores, base_images = _scores(out), _images(out)
    base_table = (out / "summary.md").read_text()

    swapped = ["--transformer", str(other)]
    refused = _evaluate(tiny_models, models_yaml, prompt_file, out, extra=swapped, ok=False)
    ranks_stderr = refused.stderr.split("failed (exitcode")[0]  # what follows is torchrun's own report
    assert refused.returncode != 0 and "Traceback" not in ranks_stderr and ranks_stderr.count("error: ") == 1
    assert "holds evaluation images made from other inputs than asked for now: transformer.count: was (absent)" \
        in refused.stderr and "; transformer.kind: was base, now folder;" in refused.stderr  # one line
    assert "--overwrite (OVERWRITE=1 for run_eval.sh)" in refused.stderr and "to generate" not in refused.stdout
    assert _images(out) == base_images and _scores(out) == base_scores  # nothing touched

    # in process (one rank; the refusal above is the part that needs two): --overwrite regenerates
    _evaluate_here(tiny_models, models_yaml, prompt_file, out, [*swapped, "--overwrite"])
    new_scores, new_images = _scores(out), _images(out)
    assert sorted(new_images) == sorted(base_images)
    assert all(new_images[name] != base_images[name] for name in new_images)
    changed = [m for m in METRIC_COLUMNS if m != "unifiedreward"]  # the tiny judge answers 3 to every image
    assert all(new[m] != old[m] for new, old in zip(new_scores, base_scores) for m in changed)
    assert read_fingerprint(out)["transformer"]["kind"] == "folder"
    assert json.loads((out / "settings.json").read_text())["transformer"] == str(other)

    # a re-run with the same inputs generates nothing, rewrites no image and gives the same scores
    before = (out / "images/00002.png").stat().st_mtime_ns
    again = _evaluate_here(tiny_models, models_yaml, prompt_file, out, swapped)
    assert "rank 0: 5 prompts, 0 to generate" in again and "plain diffusers folder (not verified)" in again
    assert (out / "images/00002.png").stat().st_mtime_ns == before
    assert _images(out) == new_images and _scores(out) == new_scores
    assert (out / "summary.md").read_text() != base_table and (out / "summary.md").read_text() in again


def _args(tiny_models, tmp_path, *extra):
    prompt_file = tmp_path / "prompts.txt"
    if not prompt_file.exists():
        prompt_file.write_text("a cat\na dog\na fox\n")
    return parse_args(["--base", tiny_models.base.path, "--prompts", str(prompt_file), "--out", str(tmp_path / "out"),
                       "--models-config", "unused.yaml", *SIZE, *extra])


def test_eval_fingerprint_reuses_only_an_exact_match(tiny_models, tmp_path):
    prompts = ["a cat", "a dog", "a fox"]
    out = tmp_path / "out"
    assert prepare_out(_args(tiny_models, tmp_path), prompts) is None  # fresh: no transformer, nothing to check
    recorded = read_fingerprint(out)
    assert recorded["transformer"] == {"kind": "base"} and recorded["sampling"]["steps"] == 4
    (out / "images/00000.png").write_bytes(b"png")
    prepare_out(_args(tiny_models, tmp_path), prompts)  # the same inputs: reused
    assert read_fingerprint(out) == recorded and (out / "images/00000.png").is_file()

    for extra, used, field in [(["--steps", "5"], prompts, "sampling.steps: was 4, now 5"),
                               (["--seed", "1"], prompts, "sampling.seed: was 0, now 1"),
                               ([], prompts[:2], "prompts.count: was 3, now 2"),
                               ([], ["a cat", "a dog", "a bird"], "prompts.sha256: was")]:
        with pytest.raises(EvaluationError, match=field):
            prepare_out(_args(tiny_models, tmp_path, *extra), used)
    assert read_fingerprint(out) == recorded  # a refused run changes nothing

    (out / "fingerprint.json").unlink()
    with pytest.raises(EvaluationError, match="holds evaluation images of unknown origin"):
        prepare_out(_args(tiny_models, tmp_path), prompts)
    (out / "scores.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    prepare_out(_args(tiny_models, tmp_path, "--steps", "5", "--overwrite"), prompts)
    assert not any((out / "images").iterdir()) and not (out / "scores.jsonl").exists()
    assert (out / "notes.txt").is_file() and read_fingerprint(out)["sampling"]["steps"] == 5


def test_eval_verifies_the_transformer_export(tiny_models, tmp_path):
    from test_infer import committed_export, flip_last_byte

    export = committed_export(tiny_models, tmp_path / "run")
    assert prepare_out(_args(tiny_models, tmp_path, "--transformer", str(export)), ["a cat"]).endswith("(2 files)")
    assert read_fingerprint(tmp_path / "out")["transformer"]["kind"] == "g2rpo checkpoint export"
    shutil.rmtree(tmp_path / "out")
    flip_last_byte(export / "diffusion_pytorch_model.safetensors")
    with pytest.raises(EvaluationError, match=r"diffusion_pytorch_model.safetensors: SHA-256 mismatch"):
        prepare_out(_args(tiny_models, tmp_path, "--transformer", str(export)), ["a cat"])
    assert not (tmp_path / "out").exists()  # refused before anything is written

    uncommitted = tmp_path / "run/checkpoint-5/transformer"
    shutil.copytree(Path(tiny_models.base.path) / "transformer", uncommitted)
    with pytest.raises(EvaluationError, match="checkpoint-5, which was never committed"):
        prepare_out(_args(tiny_models, tmp_path, "--transformer", str(uncommitted)), ["a cat"])
    with pytest.raises(EvaluationError, match="no model_index.json"):
        prepare_out(_args(tiny_models, tmp_path, "--base", str(tmp_path)), ["a cat"])


def test_summary_table():
    records = [{"hps": 0.2, "pickscore": 20.0}, {"hps": 0.4, "pickscore": 22.0}]
    rows = summarize(records, ["pickscore", "hps"])
    assert [r["metric"] for r in rows] == ["HPS-v2.1", "PickScore"]  # the paper's order, not the argument's
    assert rows[0]["mean"] == pytest.approx(0.3) and rows[0]["std"] == pytest.approx(0.1414213, rel=1e-6)
    assert summary_markdown(rows).splitlines()[2] == "| 0.3000 ± 0.1414 (n=2) | 21.0000 ± 1.4142 (n=2) |"
    comparison = paper_comparison_markdown(rows, "ours").splitlines()
    assert comparison[0] == "| | HPS-v2.1 | CLIP Score | PickScore | ImageReward | UnifiedReward |"
    assert comparison[2] == "| FLUX.1-dev (paper) | 0.305 | 0.388 | 0.226 | 1.040 | 3.621 |"  # the paper's row
    assert comparison[8] == "| G²RPO (HPS + CLIP) (paper) | 0.376 | 0.406 | 0.235 | 1.483 | 3.783 |"
    assert comparison[-1] == "| ours | 0.300 | – | 0.210 | – | – |"  # PickScore in the paper's units (/ 100)

    # a judge's answer without a score is NaN: left out of the mean and counted
    records = [{"unifiedreward": 3.0}, {"unifiedreward": None}, {"unifiedreward": 4.0}]  # null in scores.jsonl
    rows = summarize(records, ["unifiedreward"])
    assert rows == [{"metric": "UnifiedReward", "mean": 3.5, "std": pytest.approx(0.7071068), "n": 2, "unscored": 1}]
    assert summary_markdown(rows).splitlines()[2] == "| 3.5000 ± 0.7071 (n=2, 1 unscored) |"
    nothing = summarize([{"unifiedreward": float("nan")}], ["unifiedreward"])
    assert summary_markdown(nothing).splitlines()[2] == "| – (n=0, 1 unscored) |"
    assert paper_comparison_markdown(nothing, "ours").splitlines()[-1] == "| ours | – | – | – | – | – |"


def test_pickscore_is_batch_invariant_and_logit_scaled(tiny_models):
    reward = build_reward("pickscore", tiny_models)
    images = torch.rand(4, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a red fox in the snow at dawn", "a tree", "two penguins"]
    batched = reward.score(images, prompts)
    singles = torch.cat([reward.score(images[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    assert batched.abs().max() <= reward.model.logit_scale.exp().item() + 1e-4


def test_eval_rejects_bad_prompt_files_and_metrics(tiny_models, models_yaml, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a cat\n\xff\xfe broken\n")
    cmd = [sys.executable, str(ROOT / "scripts/evaluation/evaluate.py"), "--base", tiny_models.base.path,
           "--prompts", str(bad), "--models-config", str(models_yaml), "--out", str(tmp_path / "o")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "bad.txt:2: not valid UTF-8" in result.stderr
    for bad_args, named in ((["--metrics", "hps,aesthetic"], ["['aesthetic']", "imagereward, unifiedreward"]),
                            (["--score-batch-size", "0"], ["--score-batch-size 0: expected >= 1"])):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(cmd[2:] + bad_args)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and all(n in stderr for n in named), stderr


def test_pickscore_missing_folder_is_named(tiny_models, tmp_path):
    from g2rpo.rewards import PickScoreReward

    with pytest.raises(FileNotFoundError, match="PickScore model: directory not found: .*no-pickscore"):
        PickScoreReward(tmp_path / "no-pickscore", tiny_models.pickscore.processor)

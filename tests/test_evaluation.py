"""The evaluation harness: a 2-process run on tiny models, its table against the per-image scores."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from g2rpo.evaluation import METRIC_COLUMNS, summarize, summary_markdown
from g2rpo.rewards import build_reward


def _evaluate(tiny_models, models_yaml, prompt_file, out, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "scripts/evaluation/evaluate.py"), "--base", tiny_models.flux.path, "--prompts", str(prompt_file),
           "--models-config", str(models_yaml), "--out", str(out), "--height", "64", "--width", "64", "--steps", "4",
           "--dtype", "float32", "--device", "cpu", *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


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
    assert [r["metric"] for r in rows] == ["HPS-v2.1", "CLIP Score", "PickScore"]
    for row, name in zip(rows, METRIC_COLUMNS):
        values = np.array([r[name] for r in records])
        assert int(row["n"]) == 5
        assert float(row["mean"]) == pytest.approx(values.mean(), rel=1e-6)
        assert float(row["std"]) == pytest.approx(values.std(ddof=1), rel=1e-6)
    table = (out / "summary.md").read_text()
    assert table.splitlines()[0] == "| HPS-v2.1 | CLIP Score | PickScore |" and table in result.stdout
    assert (out / "grid.png").is_file() and not list(out.glob(".scores.rank*"))

    # a re-run generates nothing and gives the same scores
    before = (out / "images/00002.png").stat().st_mtime_ns
    again = _evaluate(tiny_models, models_yaml, prompt_file, out)
    assert "0 to generate" in again.stdout
    assert (out / "images/00002.png").stat().st_mtime_ns == before
    assert (out / "scores.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in records)


def test_summary_table():
    records = [{"hps": 0.2, "pickscore": 20.0}, {"hps": 0.4, "pickscore": 22.0}]
    rows = summarize(records, ["pickscore", "hps"])
    assert [r["metric"] for r in rows] == ["HPS-v2.1", "PickScore"]  # the paper's order, not the argument's
    assert rows[0]["mean"] == pytest.approx(0.3) and rows[0]["std"] == pytest.approx(0.1414213, rel=1e-6)
    assert summary_markdown(rows).splitlines()[2] == "| 0.3000 ± 0.1414 (n=2) | 21.0000 ± 1.4142 (n=2) |"


def test_pickscore_is_batch_invariant_and_logit_scaled(tiny_models):
    reward = build_reward("pickscore", tiny_models)
    images = torch.rand(4, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a red fox in the snow at dawn", "a tree", "two penguins"]
    batched = reward.score(images, prompts)
    singles = torch.cat([reward.score(images[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)
    assert batched.abs().max() <= reward.model.logit_scale.exp().item() + 1e-4


def test_eval_rejects_bad_prompt_files_and_metrics(tiny_models, models_yaml, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"a cat\n\xff\xfe broken\n")
    cmd = [sys.executable, str(ROOT / "scripts/evaluation/evaluate.py"), "--base", tiny_models.flux.path,
           "--prompts", str(bad), "--models-config", str(models_yaml), "--out", str(tmp_path / "o")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "bad.txt:2: not valid UTF-8" in result.stderr
    result = subprocess.run(cmd[:-4] + ["--metrics", "hps,imagereward", "--out", str(tmp_path / "o")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "imagereward" in result.stderr


def test_pickscore_missing_folder_is_named(tiny_models, tmp_path):
    from g2rpo.rewards import PickScoreReward

    with pytest.raises(FileNotFoundError, match="PickScore model: directory not found: .*no-pickscore"):
        PickScoreReward(tmp_path / "no-pickscore", tiny_models.pickscore.processor)

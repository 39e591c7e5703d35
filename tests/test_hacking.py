"""Watching for reward hacking (g2rpo.hacking, g2rpo.report, the trainer's held-out evaluation): the detector's rule
against a hand-computed history; end to end, a tiny run trained on an easily hacked reward (brightness) whose
out-of-domain reward falls makes the detector fire and stop the run; the best pointer names the checkpoint the
rule says; the report holds every curve and strip it claims."""

import json
from html.parser import HTMLParser

import pytest
import torch

from conftest import ROOT, model_overrides
from g2rpo import hacking
from g2rpo.config import TrainConfig, load_config
from g2rpo.distributed import DistInfo


def _record(step, **values):
    """A held-out record: name=(mean, std) pairs; ``ood_<name>`` for out-of-domain ones."""
    record = {"step": step}
    for name, (mean, std) in values.items():
        key = f"ood/{name[4:]}" if name.startswith("ood_") else name
        record[f"heldout/{key}"], record[f"heldout/std/{key}"] = mean, std
    return record


def test_the_rule_and_the_criterion_against_a_hand_computed_history():
    history = [_record(0, hps=(0.30, 0.10), ood_clip=(0.50, 0.20)),
               _record(2, hps=(0.32, 0.10), ood_clip=(0.40, 0.20)),   # z: hps +0.2, clip -0.5 (not below -0.5)
               _record(4, hps=(0.35, 0.10), ood_clip=(0.36, 0.20)),   # z: +0.5, -0.7
               _record(6, hps=(0.40, 0.10), ood_clip=(0.30, 0.20)),   # z: +1.0, -1.0
               _record(8, hps=(0.29, 0.10), ood_clip=(0.20, 0.20))]   # z: -0.1 (the trained reward fell), -1.5
    assert hacking.z_scores(history, history[3]) == pytest.approx({"hps": 1.0, "ood/clip": -1.0})
    assert [hacking.flags(history[:n], window=2, margin=0.5) for n in range(1, 6)] == [[], [], [], ["ood/clip"], []]
    assert hacking.flags(history[:3], window=1, margin=0.5) == ["ood/clip"]  # -0.7 < -0.5 once is enough
    assert hacking.flags(history[:4], window=2, margin=1.0) == []  # -1.0 is not below -1.0
    assert hacking.criterion(history, history[2], "ood") == pytest.approx(-0.7)
    assert hacking.criterion(history, history[2], "hps") == 0.35 and hacking.criterion(history, history[2], "x") is None


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.figures, self.series, self.cells = [], [], {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "figure":
            self.figures.append(int(attrs["data-step"]))
        elif tag == "polyline":
            self.series.setdefault(attrs["data-series"], []).append(int(attrs["data-points"]))

    def handle_data(self, data):
        self.cells.append(data.strip())


@pytest.mark.slow
def test_a_run_that_hacks_its_reward_is_flagged_stopped_and_reported(tiny_models, tiny_embeddings, tmp_path):
    """Trained on brightness towards white (tests/my_reward.py), watched by HPS and by darkness (out-of-domain):
    brightness rises, darkness falls -- the detector fires after 8 steps (2 evaluations below -0.5 std), the run
    stops there with checkpoint-7 (of 10 steps), best.json names the checkpoint with the best out-of-domain z-score
    among the evaluated checkpoints, and report.html links every strip and draws every curve."""
    from PIL import Image

    from g2rpo.checkpoint import resolve_best, verify_export
    from g2rpo.trainer import HackingDetected, Trainer

    out = tmp_path / "hack"
    cfg = load_config(TrainConfig, ROOT / "configs/tiny.yaml", [
        *model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={out}",
        'rewards=[{name: "tests.my_reward:build", args: {target: 1.0}}]', 'eval.rewards=[hps, "tests.my_reward:darkness"]',
        "optim.lr=3e-3", "max_steps=10", "eval_every=2", "checkpoint_every=2", "checkpoint_start=1",
        "eval.best_by=ood", "eval.stop_on_hacking=true", "sample_every=0"])
    with pytest.raises(HackingDetected, match=r"flagged after 8 steps \(ood/darkness fell .*checkpoint-7 written"):
        Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in heldout] == [0, 2, 4, 6, 8]
    assert [r["hacking"] for r in heldout] == [[], [], [], [], ["ood/darkness"]]
    z = hacking.z_scores(heldout)
    assert z["brightness"] > 1 and z["ood/darkness"] < -1  # the hack, end to end
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8  # stopped: 2 of the 10 steps never ran
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3", "checkpoint-5",
                                                                "checkpoint-7"]
    # the best: the evaluated checkpoint (evaluation after step + 1 steps) with the highest mean out-of-domain z
    scores = {s: hacking.criterion(heldout, next(r for r in heldout if r["step"] == s + 1), "ood") for s in (1, 3, 5, 7)}
    best = json.loads((out / "best.json").read_text())
    assert best["checkpoint"] == f"checkpoint-{max(scores, key=scores.get)}" and best["by"] == "ood"
    assert resolve_best(out / "best") == out / best["checkpoint"] / "transformer"
    assert "verified against" in verify_export(resolve_best(out / "best"))

    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.figures == [0, 2, 4, 6, 8]
    for step, src in zip(page.figures, page.images, strict=True):
        assert src == f"samples/heldout/step-{step:05d}.png" and (out / src).is_file()
        with Image.open(out / src) as strip:  # 4 prompts side by side, 64 px each, 2 px padding
            assert strip.size == (2 + 4 * 66, 2 + 66)
    for name in ("brightness", "ood/hps", "ood/darkness"):
        assert page.series[name][0] == 5, name  # the z-score chart: one point per evaluation
    assert page.series["reward/brightness"] == [8] and page.series["heldout/ood/darkness"] == [5]
    assert "8" in page.cells and "ood/darkness" in page.cells  # the flags table
    # the strip shows the same prompts with the same noise: after 0 steps, any run's equals this one's
    other = load_config(TrainConfig, ROOT / "configs/tiny.yaml", [
        *model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={tmp_path / 'b'}",
        "max_steps=1", "eval_every=1", "sample_every=0", "eval.rewards=[]"])
    Trainer(other, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    assert (tmp_path / "b/samples/heldout/step-00000.png").read_bytes() == (out / page.images[0]).read_bytes()

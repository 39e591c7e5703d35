"""Bring your own reward (g2rpo.reward_plugins, g2rpo.http_reward, scripts/reward_server.py): a factory named by
import path, and a reward served over HTTP -- checked with the config, equal to the reward called directly, trained
on two FSDP ranks as in one process, and a server that dies mid-run stops the run with a checkpoint that resumes
exactly."""

import importlib.util
import json
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ENV, ROOT, SMALL_STEP, TORCHRUN, model_overrides
from g2rpo.config import TrainConfig, load_config
from g2rpo.distributed import DistInfo

CUSTOM = "tests.my_reward:build"


def _server_module():
    spec = importlib.util.spec_from_file_location("reward_server", ROOT / "scripts/reward_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Served:
    """The reference server in a thread of this process, serving ``reward``; ``fail_after``: it shuts down (the
    connection refused from then on) once it has answered that many score requests."""

    def __init__(self, reward, name: str = "brightness", port: int = 0, fail_after: int | None = None):
        self.requests, self.fail_after = 0, fail_after
        outer = self

        class Counting:
            def score(self, images, prompts):
                outer.requests += 1
                return reward.score(images, prompts)

        self.server = _server_module().make_server(Counting(), name, "127.0.0.1", port)
        if fail_after is not None:
            handle = self.server.finish_request

            def finish_then_maybe_stop(request, address):
                handle(request, address)
                if outer.requests >= outer.fail_after:
                    threading.Thread(target=outer.stop, daemon=True).start()

            self.server.finish_request = finish_then_maybe_stop
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _brightness(target=0.8):
    from tests.my_reward import build

    return build("cpu", target)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tiny_models, tiny_embeddings, out, rewards, *extra):
    return load_config(TrainConfig, ROOT / "configs/tiny.yaml", [
        *model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={out}",
        *SMALL_STEP, f"rewards={json.dumps(rewards)}", *extra])


# ------------------------------------------------------------------------------------ import path


def test_an_import_path_is_checked_when_the_config_is():
    from g2rpo.config import RewardSpec

    spec = RewardSpec(CUSTOM, args={"target": 0.8})
    assert (spec.key, spec.weight) == ("brightness", 1.0)  # the factory's name; the default weight
    for name, args, message in (
            ("tests.no_such_module:build", {}, r"cannot import tests.no_such_module .* importable from the working"),
            ("tests.my_reward:missing", {}, r"tests.my_reward \(.*my_reward.py\) has no missing"),
            ("tests.my_reward", {}, r"unknown key|expected one of"),
            (CUSTOM, {"targt": 1}, r"factory\(device, target: float = 0.5\) cannot be called as factory\(device=..., "
                                   r"\*\*args\) with args \['targt'\]"),
            ("tests.my_reward:judge", {}, r"trains = False \(an evaluation-only reward\)")):
        with pytest.raises(ValueError, match=message):
            RewardSpec(name, args=args)
    with pytest.raises(ValueError, match=r"rewards \['brightness', 'brightness'\]: each reward may appear once"):
        load_config(TrainConfig, ROOT / "configs/tiny.yaml", [f"rewards={json.dumps([{'name': CUSTOM}] * 2)}"])


def test_the_custom_rewards_scores_are_the_modules_own(tiny_models, tiny_embeddings, tmp_path):
    """In the trainer, the import-path reward gives every scored image what the module's reward gives it called
    directly, is logged under its name, and trains beside a registry reward."""
    from g2rpo.trainer import Trainer

    rewards = [{"name": CUSTOM, "args": {"target": 0.8}}, {"name": "hps", "weight": 0.5}]
    cfg = _cfg(tiny_models, tiny_embeddings, tmp_path / "look", rewards, "max_steps=2")
    trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert list(trainer.rewards) == ["brightness", "hps"]
    groups = trainer.rollout(0)
    trainer.score(groups)
    latents = trainer.method.score_latents(groups[0].rollout)
    images = trainer.family.decode(trainer.vae, latents, cfg.sampling.height, cfg.sampling.width)
    direct = _brightness(0.8).score(images, [groups[0].caption] * len(images))
    n, k, g = groups[0].rollout.completions.shape[:3]
    torch.testing.assert_close(groups[0].rewards[0], direct[:-1].reshape(n, k, g).permute(2, 0, 1))
    trainer.close()
    Trainer(_cfg(tiny_models, tiny_embeddings, tmp_path / "run", rewards, "max_steps=2"),
            DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1] and all("reward/brightness" in m for m in metrics)
    assert len((tmp_path / "run/brightness_reward.txt").read_text().splitlines()) == 2


@pytest.mark.slow
def test_a_custom_reward_trains_on_two_ranks_as_in_one_process(tiny_models, tiny_embeddings, tmp_path):
    from safetensors.torch import load_file

    from g2rpo.trainer import Trainer

    overrides = [*model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}", "max_steps=2",
                 "sample_every=0", "eval_every=0", "data.holdout=0", "checkpoint_start=1000", "save_dtype=float32",
                 "sampling.num_steps=4", "sampling.group_size=4", "sampling.height=32", "sampling.width=32",
                 "sampling.branch_steps=[0,1]", f"rewards={json.dumps([{'name': CUSTOM, 'args': {'target': 0.8}}])}"]
    two = tmp_path / "two"
    result = subprocess.run([*TORCHRUN, str(ROOT / "tests/helpers/world_equivalence.py"), str(two),
                             json.dumps({"tiny.yaml": overrides})], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    cfg = load_config(TrainConfig, ROOT / "configs/tiny.yaml", [*overrides, "data.prompts_per_rank=2",
                                                               f"output_dir={tmp_path / 'one'}"])
    Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    one_m, two_m = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                    for run in (tmp_path / "one", two / "tiny.yaml"))
    for a, b in zip(one_m, two_m, strict=True):
        for key in ("loss", "reward/brightness", "eval_reward/brightness"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    one_w, two_w = ({k: v for f in sorted(run.glob("checkpoint-*/transformer/*.safetensors")) for k, v in
                     load_file(str(f)).items()} for run in (tmp_path / "one", two / "tiny.yaml"))
    assert one_w.keys() == two_w.keys()
    assert max((one_w[k] - two_w[k]).abs().max().item() for k in one_w) < 1e-5


# ------------------------------------------------------------------------------------ over HTTP


def test_the_http_reward_scores_what_the_reward_scores_in_process():
    """PNG is lossless: the server scores exactly the 8-bit images, as the reward in this process does; JPEG is
    accepted too; an unscored image (NaN) travels as null."""
    from g2rpo.http_reward import HttpReward, HttpRewardSettings

    class SometimesNaN:
        def score(self, images, prompts):
            scores = _brightness().score(images, prompts)
            return torch.where(torch.tensor(["nan" in p for p in prompts]), torch.nan, scores)

    served = Served(SometimesNaN())
    try:
        images = torch.rand(5, 3, 16, 24, generator=torch.Generator().manual_seed(0))
        prompts = ["a", "b", "nan", "d", "e"]
        http = HttpReward(HttpRewardSettings.from_args({"url": served.url, "batch_size": 2}))
        eight_bit = (images * 255).round() / 255
        expected = _brightness().score(eight_bit, prompts)
        got = http.score(images, prompts)
        assert torch.isnan(got[2]) and served.requests == 3  # batches of 2
        torch.testing.assert_close(got[[0, 1, 3, 4]], expected[[0, 1, 3, 4]], atol=1e-6, rtol=0)
        jpeg = HttpReward(HttpRewardSettings.from_args({"url": served.url, "format": "jpeg", "jpeg_quality": 90}))
        assert (jpeg.score(images, prompts)[[0, 1]] - expected[[0, 1]]).abs().max() < 0.02
        with pytest.raises(ValueError, match=r"unknown \['bacth_size'\]"):
            HttpRewardSettings.from_args({"url": served.url, "bacth_size": 2})
    finally:
        served.stop()


def test_a_server_that_is_down_refuses_the_run_in_one_line(tiny_models, tiny_embeddings, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    rewards = json.dumps([{"name": "http", "args": {"url": url, "timeout_s": 2}}])
    cmd = [sys.executable, "-m", "g2rpo.train", "--config", str(ROOT / "configs/tiny.yaml"), f"rewards={rewards}",
           *model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}",
           f"output_dir={tmp_path / 'run'}"]
    for extra in ([], ["--dry-run"]):  # before any model loads, and in the plan
        result = subprocess.run([*cmd, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert lines[-1].startswith("error: ") and f"reward server {url} does not answer" in lines[-1], lines[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_http_reward_trains_and_a_server_that_dies_mid_run_stops_it_with_a_checkpoint(tiny_models,
                                                                                          tiny_embeddings, tmp_path):
    """3 steps scored over HTTP: uninterrupted; then with the server dying after step 0 was scored -- the run stops
    in one line with checkpoint-0 (step 1 abandoned, nothing changed) -- and resumed once it is back: the same
    losses, rewards and weights as the uninterrupted run."""
    from safetensors.torch import load_file

    from g2rpo.http_reward import RewardServerError
    from g2rpo.trainer import Trainer

    def run(out, url, resume=None):
        rewards = [{"name": "http", "args": {"url": url, "batch_size": 64, "retries": 2, "backoff_s": 0.01}}]
        cfg = _cfg(tiny_models, tiny_embeddings, out, rewards, "max_steps=3", "checkpoint_every=100",
                   *([f"resume={resume}"] if resume else []))
        Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()

    served = Served(_brightness())
    try:
        run(tmp_path / "whole", served.url)
    finally:
        served.stop()
    assert served.requests == 3  # one batch per step

    port = _free_port()
    dying = Served(_brightness(), port=port, fail_after=1)
    with pytest.raises(RewardServerError, match=rf"reward server http://127.0.0.1:{port} failed 3 time\(s\) .*"
                                                rf"checkpoint-0 written"):
        run(tmp_path / "cut", dying.url)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-0"]
    back = Served(_brightness(), port=port)
    try:
        run(tmp_path / "cut", back.url, resume="auto")
    finally:
        back.stop()
    whole, cut = ([json.loads(line) for line in (tmp_path / run_ / "metrics.jsonl").read_text().splitlines()]
                  for run_ in ("whole", "cut"))
    assert [m["step"] for m in cut] == [0, 1, 2]
    for a, b in zip(whole, cut, strict=True):
        for key in ("loss", "reward/http", "eval_reward/http"):
            assert a[key] == b[key], key
    w, c = (load_file(str(next((tmp_path / r / "checkpoint-2/transformer").glob("*.safetensors"))))
            for r in ("whole", "cut"))
    assert all(torch.equal(w[k], c[k]) for k in w)


def test_the_evaluation_scores_your_own_rewards_as_extra_columns(tiny_models, prompts, tmp_path):
    """scripts/evaluation/: an import-path reward and a served one beside a registry metric, each an extra column
    (after the paper's) holding what the reward gives the written PNG; the paper comparison leaves them out."""
    import contextlib
    import io

    import numpy as np
    import yaml
    from PIL import Image

    from g2rpo.config import to_dict
    from g2rpo.evaluation import evaluate

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(to_dict(tiny_models)))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts[:3]) + "\n")
    served = Served(_brightness(0.2), name="served")
    try:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            evaluate(["--base", tiny_models.base.path, "--prompts", str(prompt_file), "--models-config", str(models),
                      "--out", str(tmp_path / "eval"), "--metrics", f"hps,{CUSTOM},http", "--reward-args",
                      json.dumps({CUSTOM: {"target": 0.8}, "http": {"url": served.url}}), "--height", "64",
                      "--width", "64", "--steps", "3", "--dtype", "float32", "--device", "cpu"])
    finally:
        served.stop()
    lines = (tmp_path / "eval/summary.md").read_text().splitlines()
    assert lines[0] == "| HPS-v2.1 | brightness | http |"
    records = [json.loads(line) for line in (tmp_path / "eval/scores.jsonl").read_text().splitlines()]
    for record in records:
        with Image.open(tmp_path / "eval" / record["image"]) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
        assert record["brightness"] == pytest.approx(_brightness(0.8).score(pixels, [""]).item(), abs=1e-6)
        assert record["http"] == pytest.approx(_brightness(0.2).score(pixels, [""]).item(), abs=1e-6)
    assert any(line.startswith("| this evaluation (eval) |") for line in lines)  # the paper's row: hps only

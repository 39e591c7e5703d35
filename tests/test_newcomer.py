"""A newcomer's path: the torch build set-up picks, the training prompts, output folders that never mix two runs,
refusing before the long work, and the same run outputs for every method."""

import hashlib
import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ENV, ROOT
from g2rpo.config import TrainConfig, load_config


def _plan(path_prefix: str = "", **env) -> list[str]:
    result = subprocess.run(["bash", str(ROOT / "env_setup.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**ENV, "G2RPO_SETUP_PLAN": "1", "PATH": path_prefix + os.environ["PATH"], **env})
    assert result.returncode == 0, result.stderr
    return [line.removeprefix("[env_setup] plan: ") for line in result.stdout.splitlines() if "plan:" in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_setup_picks_the_torch_build_that_fits_the_machine(tmp_path):
    """A GPU (nvidia-smi -L answers): the default index's CUDA build. No GPU: the CPU wheel index where it answers
    (a local stand-in here), else the default index, said so. TORCH_INDEX_URL overrides the choice."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    (fake / "nvidia-smi").chmod(0o755)
    gpu = _plan(f"{fake}:", TORCH_CPU_INDEX="http://127.0.0.1:9/")
    assert "cuda build, from the default index (its torch is the CUDA build)" in gpu[0] and "--extra-index-url" not in gpu[1]

    (tmp_path / "index" / "torch").mkdir(parents=True)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "index"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        answering = _plan(TORCH_CPU_INDEX=url)
    finally:
        server.shutdown()
    assert f"cpu build, from the PyTorch CPU index {url}" in answering[0]
    assert answering[1].endswith(f"pip install -q --extra-index-url {url} -r requirements.txt")
    silent = _plan(TORCH_CPU_INDEX=f"http://127.0.0.1:{_free_port()}/")  # nothing listens there
    assert "cpu build, from the default index (the CPU index" in silent[0] and "--extra-index-url" not in silent[1]
    forced = _plan(TORCH_INDEX_URL="https://example.invalid/whl/cu128")
    assert "from TORCH_INDEX_URL" in forced[0] and "--extra-index-url https://example.invalid/whl/cu128" in forced[1]


def test_hpdv2_training_prompts_are_written_with_count_and_digest(tmp_path):
    """The dataset's train.json layout (one entry per prompt with the images rated for it): one line each, in order,
    whitespace collapsed, a repeated prompt once; the count and the file's SHA-256 are printed."""
    entries = [{"prompt": "a red fox  in\nsnow", "image_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0],
                "rank": [1, 2], "raw_annotations": [[1, 0]], "user_hash": ["u"]},
               {"prompt": "an astronaut riding a horse", "image_path": ["c.jpg", "d.jpg"], "human_preference": [0, 1],
                "rank": [2, 1], "raw_annotations": [[0, 1]], "user_hash": ["v"]},
               {"prompt": "a red fox in snow", "image_path": ["e.jpg", "f.jpg"], "human_preference": [1, 0],
                "rank": [1, 2], "raw_annotations": [[1, 0]], "user_hash": ["w"]}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    out = tmp_path / "prompts.txt"
    result = subprocess.run([sys.executable, str(ROOT / "scripts/huggingface/download_hf.py"), "--hpdv2-train-prompts",
                             str(out), "--hpdv2-train-json", str(tmp_path / "train.json")], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "a red fox in snow\nan astronaut riding a horse\n"
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f"wrote 2 HPDv2 training prompts to {out} (1 repeated ones dropped); sha256 {digest}" in result.stdout
    (tmp_path / "bad.json").write_text('{"prompt": "not a list"}')
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/huggingface/download_hf.py"), "--hpdv2-train-prompts",
                          str(out), "--hpdv2-train-json", str(tmp_path / "bad.json")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("expected HPDv2's layout, a JSON list "
                                                                               "of objects with a 'prompt' string")


def _infer():
    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "scripts/inference/infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inference_never_mixes_two_runs_in_one_folder(tiny_models, tmp_path):
    infer, out = _infer(), tmp_path / "out"
    base = ["--base", tiny_models.base.path, "--prompt", "a red fox", "--prompt", "a blue bird", "--steps", "1",
            "--height", "32", "--width", "32", "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    infer.main(base)
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "fingerprint.json", "settings.json"]
    first = (out / "00000.png").read_bytes()
    infer.main(base)  # the same settings again: the same files
    assert (out / "00000.png").read_bytes() == first
    with pytest.raises(ValueError, match=r"holds images made from other inputs than asked for now:\n  prompts: was .*\n"
                                         r"  sampling.steps: was 1, now 2"):
        infer.main([*base[:4], "--steps", "2", *base[8:]])  # one prompt, 2 steps
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "fingerprint.json", "settings.json"]
    infer.main([*base[:4], "--steps", "2", *base[8:], "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "fingerprint.json", "settings.json"]  # no stale 00001


def test_evaluation_checks_every_reward_model_before_generating(tiny_models, tmp_path):
    from g2rpo.config import to_dict

    models = to_dict(tiny_models)
    models["imagereward"]["checkpoint"] = str(tmp_path / "no/ImageReward.pt")
    import yaml

    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts/evaluation/evaluate.py"), "--base", tiny_models.base.path,
                             "--prompts", str(prompts), "--models-config", str(tmp_path / "models.yaml"), "--out",
                             str(tmp_path / "eval"), "--device", "cpu", "--height", "32", "--width", "32"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and f"models.imagereward.checkpoint={tmp_path / 'no/ImageReward.pt'} (the ImageReward " \
        "model)" in last, result.stderr[-2000:]
    assert not (tmp_path / "eval" / "images").exists() or not any((tmp_path / "eval" / "images").iterdir())


def test_every_method_writes_the_per_reward_logs_and_the_curve(tmp_path):
    """A method without an anchor sample logs the mean reward of its final images in the reference's files."""
    from g2rpo.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, ["hps", "clip_score"])
    for step, (hps, clip) in enumerate(((0.2, 0.3), (0.25, 0.35))):
        logger.log(step, {"reward/hps": hps, "reward/clip_score": clip, "loss": 0.0})
    logger.close()
    assert (tmp_path / "hps_reward.txt").read_text() == "0 0.200000\n1 0.250000\n"
    assert (tmp_path / "clip_reward.txt").read_text() == "0 0.300000\n1 0.350000\n"
    assert (tmp_path / "reward_curve.png").stat().st_size > 0


def test_each_config_has_its_own_output_folder_and_plans_its_real_checkpoints():
    from g2rpo.train import describe

    configs = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
    folders = [load_config(TrainConfig, path).output_dir for path in configs]
    assert len(set(folders)) == len(folders), dict(zip((p.name for p in configs), folders))
    short = load_config(TrainConfig, ROOT / "configs/g2rpo_hps_clip.yaml", ["max_steps=100"])
    assert "checkpoints to outputs/g2rpo_hps_clip: after steps 99 (every 50 from 150" in describe(short, 2, 8)
    full = load_config(TrainConfig, ROOT / "configs/g2rpo_hps_clip.yaml")
    plan = describe(full, 2, 8)
    assert "after steps 150, 200, 250, 300 (every 50" in plan and "EMA: off" in plan and "KL: off" in plan
    lora = describe(load_config(TrainConfig, ROOT / "configs/flowgrpo_pickscore_flux.yaml"), 1, 8)
    assert "LoRA rank 32, alpha 64" in lora and "EMA: decay 0.9, every 8 update(s)" in lora
    assert "fp32 state offloaded to host memory" in describe(load_config(TrainConfig, ROOT / "configs/"
                                                                         "g2rpo_hps_clip_1gpu.yaml"), 1, 1)


def _section_commands(title: str) -> list[str]:
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_the_readme_cpu_commands_run_as_written(tmp_path):
    """Every command of README's "Quick start" (but the test command itself) and "More on the CPU", as written, one
    after the other in a fresh copy of the repository (its tracked files; the environment linked in)."""
    import shutil

    commands = [c for c in _section_commands("Quick start") if "pytest" not in c] + _section_commands("More on the CPU")
    assert len(commands) == 5 and "scripts/run_tiny.sh" in commands[0], commands
    # the copy shares this environment: its env_setup.sh must find it up to date, or it would reinstall the project
    # from the copy (an editable install pointing at a folder about to be deleted)
    want = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in (
        "requirements.txt", "pyproject.toml", "env_setup.sh", "g2rpo/_torchvision_compat.py"))).hexdigest()[:16]
    stamp = (ROOT / ".venv/.g2rpo-setup").read_text().strip()
    assert stamp.startswith(want + "-"), "the environment is out of date: run `bash env_setup.sh` before the tests"
    copy = tmp_path / "repo"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in (n.decode() for n in listed if n):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH",)}
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    for method in ("dancegrpo", "flowgrpo", "mixgrpo", "densegrpo"):
        run = copy / "outputs/tiny" / method
        assert (run / "checkpoint-1/COMMITTED").is_file() and (run / "hps_reward.txt").is_file(), method
        assert (run / "reward_curve.png").is_file(), method
    assert (copy / "outputs/tiny/eval/summary.md").is_file() and (copy / "outputs/tiny/fox/00000.png").is_file()
    sd3 = copy / "outputs/tiny/sd35m_densegrpo"  # DenseGRPO on the tiny SD3 pipeline, PickScore its reward
    assert (sd3 / "checkpoint-1/COMMITTED").is_file() and (sd3 / "pickscore_reward.txt").is_file()
    assert json.loads((copy / "data/tiny_sd3_embeddings/fingerprint.json").read_text())["family"] == "sd3"
    assert (copy / "data/tiny_sd3_embeddings/negative.safetensors").is_file()

"""scripts/inference/infer.py, run as a user runs it, against the pipeline called directly."""

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import ROOT


def test_infer_script_writes_the_pipelines_images(tiny_pipeline, tiny_models, tmp_path):
    prompts = ["A red panda napping on a tree branch", "A lantern festival over a river", "unused third prompt"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts/inference/infer.py"), "--base", tiny_models.flux.path,
           "--prompt-file", str(prompt_file), "--limit", "2", "--steps", "3", "--height", "64", "--width", "80",
           "--seed", "7", "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)

    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "settings.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == prompts[:2] and settings["steps"] == 3 and settings["seed"] == 7
    for index, prompt in enumerate(prompts[:2]):
        written = np.asarray(Image.open(out / f"{index:05d}.png"))
        assert written.shape == (64, 80, 3)
        expected = tiny_pipeline(prompt, height=64, width=80, num_inference_steps=3, guidance_scale=3.5,
                                 generator=torch.Generator().manual_seed(7 + index)).images[0]
        np.testing.assert_array_equal(written, np.asarray(expected))


def test_infer_rejects_bad_sizes(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts/inference/infer.py"), "--prompt", "x",
                             "--height", "60"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "multiples of 16" in result.stderr

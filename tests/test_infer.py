"""scripts/inference/infer.py, run as a user runs it, against the pipeline called directly; the check of
a --transformer export (`g2rpo.checkpoint.verify_export`) before it is loaded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from g2rpo.checkpoint import verify_export
from g2rpo.fingerprint import sha256_file

INFER = [sys.executable, str(ROOT / "scripts/inference/infer.py")]


def committed_export(tiny_models, parent: Path, step: int = 3) -> Path:
    """``parent/checkpoint-<step>/transformer`` holding the tiny transformer, with a ``COMMITTED`` in the
    format `g2rpo.checkpoint.save` writes (``{"files": {relative path: {size, sha256}}}``)."""
    checkpoint = parent / f"checkpoint-{step}"
    export = checkpoint / "transformer"
    shutil.copytree(Path(tiny_models.base.path) / "transformer", export)
    (checkpoint / "trainer_state.json").write_text("{}")
    files = {p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    (checkpoint / "COMMITTED").write_text(json.dumps({"files": files}, indent=1))
    return export


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_infer_script_writes_the_pipelines_images(tiny_pipeline, tiny_models, tmp_path):
    prompts = ["A red panda napping on a tree branch", "A lantern festival over a river", "unused third prompt"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    export = committed_export(tiny_models, tmp_path / "run")  # the base's own weights, as a verified export
    cmd = [*INFER, "--base", tiny_models.base.path, "--transformer", str(export),
           "--prompt-file", str(prompt_file), "--limit", "2", "--steps", "3", "--height", "64", "--width", "80",
           "--seed", "7", "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    assert f"{export}: verified against {export.parent / 'COMMITTED'} (2 files)" in result.stdout

    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "fingerprint.json", "settings.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == prompts[:2] and settings["steps"] == 3 and settings["seed"] == 7
    for index, prompt in enumerate(prompts[:2]):
        written = np.asarray(Image.open(out / f"{index:05d}.png"))
        assert written.shape == (64, 80, 3)
        expected = tiny_pipeline(prompt, height=64, width=80, num_inference_steps=3, guidance_scale=3.5,
                                 generator=torch.Generator().manual_seed(7 + index)).images[0]
        np.testing.assert_array_equal(written, np.asarray(expected))


def test_infer_rejects_bad_sizes(tmp_path):
    result = subprocess.run([*INFER, "--prompt", "x", "--height", "60"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "multiples of 16" in result.stderr


def test_verify_export_checks_the_committed_manifest(tiny_models, tmp_path):
    export = committed_export(tiny_models, tmp_path)
    weights = export / "diffusion_pytorch_model.safetensors"
    assert verify_export(export) == f"{export}: verified against {tmp_path / 'checkpoint-3/COMMITTED'} (2 files)"

    flip_last_byte(weights)  # same size, other bytes
    with pytest.raises(ValueError, match=rf"{weights}: SHA-256 mismatch"):
        verify_export(export)
    flip_last_byte(weights)
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ValueError, match=rf"{weights}: \d+ bytes, expected \d+ \(truncated"):
        verify_export(export)


def test_verify_export_refuses_unlisted_weights_and_uncommitted_checkpoints(tiny_models, tmp_path):
    export = committed_export(tiny_models, tmp_path)
    shutil.copy(export / "diffusion_pytorch_model.safetensors", export / "extra.safetensors")
    with pytest.raises(ValueError, match=r"weights not in its checkpoint's COMMITTED: \['extra.safetensors'\]"):
        verify_export(export)

    (tmp_path / "checkpoint-3/COMMITTED").unlink()
    with pytest.raises(ValueError, match="checkpoint-3, which was never committed"):
        verify_export(export)
    interrupted = tmp_path / ".checkpoint-5.tmp/transformer"
    shutil.copytree(Path(tiny_models.base.path) / "transformer", interrupted)
    with pytest.raises(ValueError, match=r"\.checkpoint-5\.tmp, which was never committed"):
        verify_export(interrupted)


def test_verify_export_accepts_plain_folders_unverified(tiny_models, tmp_path):
    plain = Path(tiny_models.base.path) / "transformer"
    assert verify_export(plain) == f"{plain}: not a g2rpo checkpoint export; used as a plain diffusers folder " \
                                   f"(not verified)"
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no config.json"):
        verify_export(tmp_path)


def test_infer_refuses_a_corrupted_or_uncommitted_export(tiny_models, tmp_path, capsys):
    """In process (``main`` raises the one-line ``SystemExit`` the CLI prints, without a traceback)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "scripts/inference/infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    export = committed_export(tiny_models, tmp_path / "run")
    weights = export / "diffusion_pytorch_model.safetensors"
    base = ["--base", tiny_models.base.path, "--prompt", "a red fox", "--steps", "1", "--height", "32",
            "--width", "32", "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "out")]

    flip_last_byte(weights)
    with pytest.raises((ValueError, OSError)) as refused:  # a refusal: the CLI prints it as one line (g2rpo.cli)
        infer.main([*base, "--transformer", str(export)])
    assert str(refused.value) == f"{weights}: SHA-256 mismatch with {export.parent / 'COMMITTED'} " \
        f"(corrupted); use another checkpoint"
    flip_last_byte(weights)
    (export.parent / "COMMITTED").unlink()
    with pytest.raises((ValueError, OSError)) as refused:
        infer.main([*base, "--transformer", str(export)])
    assert str(refused.value).startswith(f"{export}: belongs to checkpoint {export.parent}, which was never committed")
    assert not (tmp_path / "out").exists()

    plain = Path(tiny_models.base.path) / "transformer"  # any other diffusers folder: used, with a note
    capsys.readouterr()
    infer.main([*base, "--transformer", str(plain)])
    assert f"{plain}: not a g2rpo checkpoint export; used as a plain diffusers folder (not verified)" \
        in capsys.readouterr().out
    assert (tmp_path / "out/00000.png").is_file()


def test_hybrid_sampling_is_the_trained_model_then_the_base(tiny_pipeline, tiny_models, tmp_path):
    """--base-after-step 2 of 4 steps (MixGRPO's hybrid sampling) == the trained pipeline's latents after 2 steps,
    continued by the base pipeline over the last 2 sigmas of the same schedule; and differs from either alone."""
    from diffusers import FluxTransformer2DModel

    trained = FluxTransformer2DModel.from_pretrained(tiny_models.base.path, subfolder="transformer",
                                                     local_files_only=True)
    with torch.no_grad():  # a "trained" model: the base, moved
        for param in trained.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    trained.save_pretrained(tmp_path / "trained")
    prompt, size = "A red panda napping on a tree branch", dict(height=64, width=64)
    result = subprocess.run([*INFER, "--base", tiny_models.base.path, "--transformer", str(tmp_path / "trained"),
                             "--prompt", prompt, "--steps", "4", "--base-after-step", "2", "--seed", "5", "--dtype",
                             "float32", "--device", "cpu", "--height", "64", "--width", "64", "--out",
                             str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    written = np.asarray(Image.open(tmp_path / "out/00000.png"))
    base_transformer = tiny_pipeline.transformer
    captured = {}

    def keep(pipe, step, timestep, tensors):
        if step == 1:
            captured["latents"] = tensors["latents"].clone()
        return tensors

    try:
        tiny_pipeline.transformer = trained
        trained_alone = tiny_pipeline(prompt, num_inference_steps=4, guidance_scale=3.5, callback_on_step_end=keep,
                                      generator=torch.Generator().manual_seed(5), **size).images[0]
    finally:
        tiny_pipeline.transformer = base_transformer
    sigmas = list(np.linspace(1.0, 1 / 4, 4)[2:])  # FluxPipeline's own grid, its last two points (shifted by it)
    expected = tiny_pipeline(prompt, sigmas=sigmas, latents=captured["latents"], guidance_scale=3.5, **size).images[0]
    np.testing.assert_array_equal(written, np.asarray(expected))
    base_alone = tiny_pipeline(prompt, num_inference_steps=4, guidance_scale=3.5,
                               generator=torch.Generator().manual_seed(5), **size).images[0]
    assert not np.array_equal(written, np.asarray(trained_alone)) and not np.array_equal(written, np.asarray(base_alone))
    refused = subprocess.run([*INFER, "--base", tiny_models.base.path, "--prompt", prompt, "--base-after-step", "2"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "exactly one of --transformer, --lora" in refused.stderr


@pytest.mark.parametrize("after, off_at", [(2, 1), (0, None), (9, "never")])
def test_hybrid_switch_with_a_lora_turns_the_adapters_off_after_k_steps_and_back_on(after, off_at):
    """With --lora the switch is diffusers' disable_lora once K steps are done (K = 0: before the first), and
    enable_lora when the image is finished; no second model."""
    from g2rpo.hybrid import hybrid

    class Pipe:
        transformer = object()

        def __init__(self):
            self.calls = []

        def disable_lora(self):
            self.calls.append(("off", self.step))

        def enable_lora(self):
            self.calls.append(("on", self.step))

    pipe = Pipe()
    pipe.step = None
    with hybrid(pipe, after) as switch:
        for step in range(4):  # what the pipeline does: denoise step `step`, then call back
            pipe.step = step
            switch["callback_on_step_end"](pipe, step, 0.0, {})
        pipe.step = "end"
    expected = [] if off_at == "never" else [("off", off_at)]
    assert pipe.calls == [*expected, ("on", "end")]

"""Preprocessing never mixes embeddings of different inputs: the output folder's fingerprint, --overwrite,
resuming an interrupted run, the stored captions, and the one-line report of prompts the encoders truncate.

Most runs are in-process (`g2rpo.preprocess.run`); one test starts two ranks to check that every rank
learns rank 0's refusal."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ENV, ROOT
from g2rpo import preprocess
from g2rpo.fingerprint import StaleOutputsError

PROMPTS = ["a red fox", "a blue bird", "a green frog"]


def _run(model, prompt_file, out, *extra):
    return preprocess.run(["--model", str(model), "--prompts", str(prompt_file), "--out", str(out),
                           "--dtype", "float32", "--device", "cpu", *extra])


def _write(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _stored_caption(path: Path) -> str:
    with safe_open(path, framework="pt") as f:
        return f.metadata()["caption"]


@pytest.fixture()
def text_model(tiny_models, tmp_path) -> Path:
    """The tiny pipeline's folder without transformer and VAE weights (preprocessing reads neither)."""
    folder = tmp_path / "flux"
    shutil.copytree(tiny_models.base.path, folder, ignore=lambda d, names: [
        n for n in names if n.endswith(".safetensors") and Path(d).name in ("transformer", "vae")])
    return folder


def test_edited_prompt_file_is_refused_and_overwrite_reencodes(text_model, tmp_path):
    prompt_file, out = _write(tmp_path / "prompts.txt", PROMPTS), tmp_path / "emb"
    assert _run(text_model, prompt_file, out)["encoded"] == 3
    before = {i: load_file(out / "embeddings" / f"{i:05d}.safetensors")["prompt_embeds"] for i in range(3)}
    index_before = (out / "index.jsonl").read_bytes()

    edited = [PROMPTS[0], "a yellow submarine", PROMPTS[2]]
    _write(prompt_file, edited)
    with pytest.raises(StaleOutputsError, match=r"prompt_file\.sha256: was [0-9a-f]+\.*, now") as refused:
        _run(text_model, prompt_file, out)
    assert "--out" in str(refused.value) and "--overwrite" in str(refused.value)
    assert (out / "index.jsonl").read_bytes() == index_before  # nothing touched

    assert _run(text_model, prompt_file, out, "--overwrite")["encoded"] == 3
    entries = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [e["caption"] for e in entries] == edited
    assert [_stored_caption(out / e["file"]) for e in entries] == edited
    after = {i: load_file(out / "embeddings" / f"{i:05d}.safetensors")["prompt_embeds"] for i in range(3)}
    assert not torch.allclose(after[1], before[1])
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[2], before[2])


def test_identical_rerun_reuses_and_any_other_input_is_refused(text_model, tmp_path, capsys):
    prompt_file, out = _write(tmp_path / "prompts.txt", PROMPTS), tmp_path / "emb"
    _run(text_model, prompt_file, out)
    files = _files(out)
    assert "fingerprint.json" in files
    capsys.readouterr()
    assert _run(text_model, prompt_file, out) == {"prompts": 3, "encoded": 0, "reused": 3}
    assert "encodes 0 of its 3" in capsys.readouterr().out
    assert _files(out) == files  # byte-identical, the fingerprint included

    # every other field of the fingerprint is checked (no run below gets as far as loading a model)
    for extra, field in ((["--max-sequence-length", "256"], "max_sequence_length: was 512, now 256"),
                         (["--dtype", "bfloat16"], "dtype: was float32, now bfloat16")):
        with pytest.raises(StaleOutputsError, match=field):
            preprocess.run(["--model", str(text_model), "--prompts", str(prompt_file), "--out", str(out),
                            "--device", "cpu", "--dtype", "float32", *extra])
    config = text_model / "text_encoder_2" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    with pytest.raises(StaleOutputsError, match=r"text_encoders\.text_encoder_2\.files: was"):
        _run(text_model, prompt_file, out)
    assert _files(out) == files


def test_interrupted_run_resumes_with_the_same_inputs(text_model, tmp_path, monkeypatch):
    prompt_file, out = _write(tmp_path / "prompts.txt", PROMPTS), tmp_path / "emb"
    write, calls = preprocess.write_embedding, []

    def write_then_die(path, **tensors):
        if calls:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(path)
        write(path, **tensors)

    monkeypatch.setattr(preprocess, "write_embedding", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(text_model, prompt_file, out, "--batch-size", "1")
    monkeypatch.undo()
    folder = out / "embeddings"
    assert [p.name for p in folder.glob("*.safetensors")] == ["00000.safetensors"]
    assert (out / "fingerprint.json").is_file() and not (out / "index.jsonl").exists()
    first = (folder / "00000.safetensors").stat().st_mtime_ns

    # the fingerprint was written before the first embedding, so the same inputs resume
    assert _run(text_model, prompt_file, out) == {"prompts": 3, "encoded": 2, "reused": 1}
    assert (folder / "00000.safetensors").stat().st_mtime_ns == first
    assert len((out / "index.jsonl").read_text().splitlines()) == 3

    # a lost file is encoded again, alone
    kept = {i: (folder / f"{i:05d}.safetensors").stat().st_mtime_ns for i in (0, 2)}
    lost = load_file(folder / "00001.safetensors")
    (folder / "00001.safetensors").unlink()
    assert _run(text_model, prompt_file, out) == {"prompts": 3, "encoded": 1, "reused": 2}
    assert {i: (folder / f"{i:05d}.safetensors").stat().st_mtime_ns for i in (0, 2)} == kept
    again = load_file(folder / "00001.safetensors")
    for key, tensor in lost.items():
        torch.testing.assert_close(again[key], tensor)


def test_reused_files_are_checked_against_their_captions(text_model, tmp_path):
    prompt_file, out = _write(tmp_path / "prompts.txt", PROMPTS), tmp_path / "emb"
    _run(text_model, prompt_file, out)
    folder = out / "embeddings"
    a, b = folder / "00000.safetensors", folder / "00002.safetensors"
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    with pytest.raises(StaleOutputsError, match=r"00000\.safetensors: holds the caption 'a green frog', but line 1 "
                                                r"of .*prompts\.txt is 'a red fox'"):
        _run(text_model, prompt_file, out)
    a.write_bytes(a_bytes)

    # outputs without a fingerprint (hand-made, or an older g2rpo) are not reused ...
    (out / "fingerprint.json").unlink()
    with pytest.raises(StaleOutputsError, match="unknown origin"):
        _run(text_model, prompt_file, out)
    # ... while a fingerprint without outputs describes nothing: the folder counts as fresh
    (out / "fingerprint.json").write_text('{"prompt_file": "something else"}\n')
    shutil.rmtree(folder)
    (out / "index.jsonl").unlink()
    assert _run(text_model, prompt_file, out)["encoded"] == 3
    assert json.loads((out / "fingerprint.json").read_text())["max_sequence_length"] == 512


def test_prompts_longer_than_the_encoders_take_are_reported_once(text_model, tiny_pipeline, tmp_path, capsys):
    medium = " ".join(["a red fox jumping over the lazy dog"] * 20)
    long = " ".join(["a red fox jumping over the lazy dog"] * 150)  # 5,399 characters
    prompt_file, out = _write(tmp_path / "prompts.txt", ["a red fox", medium, long, "a blue bird"]), tmp_path / "emb"
    clip, t5 = ([len(tok(p, verbose=False).input_ids) for p in (medium, long)]
                for tok in (tiny_pipeline.tokenizer, tiny_pipeline.tokenizer_2))
    assert clip[0] > 77 and clip[1] > clip[0] and t5[0] < 512 < t5[1]  # the premise: medium exceeds CLIP only

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    libraries = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in libraries:
        logger.addHandler(handler)
    try:
        capsys.readouterr()
        _run(text_model, prompt_file, out, "--batch-size", "2")
    finally:
        for logger in libraries:
            logger.removeHandler(handler)
    printed = capsys.readouterr()
    ours = [line for line in printed.out.splitlines() if "longer than" in line]
    assert ours == [
        f"warning: {prompt_file}: 2 prompt(s) longer than CLIP's 77 tokens (longest: line 3, {clip[1]} tokens); "
        f"they are truncated to 77 tokens, as the reference FLUX pipeline does",
        f"warning: {prompt_file}: 1 prompt(s) longer than T5's 512 tokens (longest: line 3, {t5[1]} tokens); "
        f"they are truncated to 512 tokens, as the reference FLUX pipeline does"]
    library = [r.getMessage() for r in records if "truncated" in r.getMessage() or "Token indices" in r.getMessage()]
    assert library == [], library
    assert "was truncated" not in printed.out + printed.err

    # truncated as the pipeline itself does
    with torch.no_grad():
        embeds, pooled, _ = tiny_pipeline.encode_prompt(long, None, max_sequence_length=512)
    stored = load_file(out / "embeddings" / "00002.safetensors")
    torch.testing.assert_close(stored["prompt_embeds"], embeds[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stored["pooled_prompt_embeds"], pooled[0], atol=1e-6, rtol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_rank_learns_rank_0s_refusal(text_model, tmp_path):
    """Two ranks started by hand (as torchrun would), so that each rank's own exit and message are seen:
    rank 1 must not wait in a later collective, nor carry on with the stale files."""
    prompt_file, out = _write(tmp_path / "prompts.txt", PROMPTS), tmp_path / "emb"
    _run(text_model, prompt_file, out)
    index = (out / "index.jsonl").read_bytes()
    _write(prompt_file, [PROMPTS[0], "a yellow submarine", PROMPTS[2]])
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "g2rpo.preprocess", "--model", str(text_model), "--prompts", str(prompt_file),
           "--out", str(out), "--dtype", "float32", "--device", "cpu"]
    ranks = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        results = [(p.communicate(timeout=180), p.returncode) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    (_, err0), code0 = results[0]
    (_, err1), code1 = results[1]
    last0 = err0.strip().splitlines()[-1]  # rank 0's refusal: one line (g2rpo.cli), exit 2
    assert code0 == 2 and last0.startswith("error: ") and "prompt_file.sha256: was" in last0, err0[-3000:]
    assert "Traceback" not in err0, err0[-3000:]
    assert code1 == 2 and "rank 0 failed: StaleOutputsError" in err1 and "prompt_file.sha256: was" in err1, err1[-3000:]
    assert (out / "index.jsonl").read_bytes() == index

"""The newcomer's contract: README's two commands, CI running the README's test command, hygiene."""

import re
import subprocess

import pytest

from conftest import ROOT


def _readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    setup_and_run, run_tests = commands
    assert "env_setup.sh" in setup_and_run and "scripts/run_tiny.sh" in setup_and_run
    assert "pytest" in run_tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert run_tests in ci, ".ci/run must run the README's test command verbatim"


def test_shell_scripts_parse():
    scripts = [ROOT / "env_setup.sh", ROOT / ".ci" / "run", *sorted((ROOT / "scripts").rglob("*.sh"))]
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def _git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


@pytest.mark.skipif(_git("rev-parse").returncode != 0, reason="not a git checkout")
def test_weights_and_generated_files_are_ignored():
    for path in ("ckpt/tiny/flux/transformer/diffusion_pytorch_model.safetensors", "ckpt/flux/model_index.json",
                 "ckpt/hps/HPS_v2.1_compressed.pt", "data/embeddings/index.json", "outputs/tiny/inference/00000.png",
                 ".venv/bin/python"):
        assert _git("check-ignore", "-q", path).returncode == 0, f"{path} is not git-ignored"
    for path in ("ckpt/README.md", "data/README.md", "data/example_prompts.txt"):
        assert _git("check-ignore", "-q", path).returncode == 1, f"{path} must stay tracked"


def _download_commands():
    commands = []
    for doc in ("README.md", "ckpt/README.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        commands += [(doc, match.strip()) for match in re.findall(r"`?(hf download [^`\n]+)", text)]
    return commands


def test_download_commands_parse_with_the_pinned_hub_client():
    """Every `hf download` line of the READMEs is a valid command of the installed huggingface_hub CLI: offline
    (and with --dry-run) it stops at the network, not at its arguments (a usage error exits 2)."""
    import os
    import shlex
    import sys
    from pathlib import Path

    commands = _download_commands()
    assert len(commands) >= 5, commands
    hf = Path(sys.executable).parent / "hf"
    for doc in ("README.md", "ckpt/README.md", "scripts/huggingface/download_hf.py"):
        assert "huggingface-cli" not in (ROOT / doc).read_text(), f"{doc}: huggingface-cli is not in the pinned hub"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    for doc, command in commands:
        args = shlex.split(command)[2:]
        result = subprocess.run([str(hf), "download", *args, "--dry-run"], capture_output=True, text=True, env=env,
                                timeout=120)
        assert result.returncode == 1 and "offline" in (result.stdout + result.stderr), (doc, command, result.stderr)

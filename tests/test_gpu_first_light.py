"""scripts/gpu/: the carry that prepare.sh fetches, and the CPU dry run of first_light.sh with that carry installed."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, ROOT


def _run(cmd, env=ENV):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepare_then_cpu_dry_run(tmp_path):
    carry = tmp_path / "carry"
    python = "%d.%d" % sys.version_info[:2]
    prepared = _run(["bash", "scripts/gpu/prepare.sh", "--python-version", python, "--dest", str(carry)])
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    # every package of wheels.txt has its wheel; the manifest's sizes and the printed total are the files'
    specs = [line.split("#")[0].strip() for line in (ROOT / "scripts/gpu/wheels.txt").read_text().splitlines()]
    specs = [s for s in specs if s]
    manifest = json.loads((carry / "manifest.json").read_text())
    wheels = {w["file"]: w["bytes"] for w in manifest["wheels"]}
    assert set(wheels) == {p.name for p in (carry / "wheels").glob("*.whl")}
    assert all((carry / "wheels" / f).stat().st_size == b for f, b in wheels.items())
    norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()  # noqa: E731
    assert {norm(f.split("-")[0]): f.split("-")[1] for f in wheels} == {norm(n): v for n, v in (s.split("==") for s in specs)}
    assert manifest["bytes"] == sum(wheels.values()) and manifest["python_version"] == python
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / n.decode()).stat().st_size for n in listed if n and (ROOT / n.decode()).is_file())
    travels = float(re.search(r"travels: ([\d.]+) MiB", prepared.stdout).group(1))
    assert travels == pytest.approx((tree + manifest["bytes"]) / 2**20, abs=0.06) and travels < 48
    assert f'carry: ["{carry}"]' in prepared.stdout
    # the pins agree with requirements.txt where both name a package
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert all(pins[name] == version for name, version in (s.split("==") for s in specs) if name in pins)

    over = _run(["bash", "scripts/gpu/prepare.sh", "--python-version", python, "--dest", str(carry), "--max-mib", "1"])
    assert over.returncode != 0 and "over --max-mib 1" in over.stderr.strip().splitlines()[-1]

    # the dry run: the carried wheels installed ahead of the environment's, env and e2e run, the rollout is cut
    out, work = tmp_path / "out", tmp_path / "work"
    start = time.time()
    dry = _run(["bash", "scripts/gpu/first_light.sh", "--device", "cpu", "--budget", "120", "--out", str(out),
                "--work", str(work), "--phases", "env", "e2e", "rollout", "--limit", "rollout=3"],
               env={**ENV, "G2RPO_CARRY": str(carry), "PYTHON": sys.executable})
    wall = time.time() - start
    assert wall < 120 + 10, wall
    assert f"installing {len(wheels)} carried wheels" in dry.stdout
    assert sorted(p.name for p in out.iterdir()) == ["e2e.json", "env.json", "log.txt", "lora.json", "memory.json",
                                                       "rollout.json", "sd3.json", "summary.md"]
    records = {p: json.loads((out / f"{p}.json").read_text()) for p in ("env", "e2e", "rollout", "sd3", "memory", "lora")}
    assert dry.returncode == 1  # the cut phase makes the run's exit code non-zero
    env, e2e, rollout = records["env"], records["e2e"], records["rollout"]
    assert env["status"] == "ok" and env["result"]["torch"] == torch.__version__ and env["result"]["imports"] == "ok"
    assert env["result"]["packages"]["diffusers"] == "0.42.1"
    assert "g2rpo_site." in env["result"]["diffusers_file"]  # imported from the carried wheel, not the venv
    assert e2e["status"] == "ok", e2e.get("log_tail")
    res = e2e["result"]
    assert [s["step"] for s in res["steps"]] == ["preprocess", "train 2 steps", "resume, 1 more", "infer"]
    assert res["steps_logged"] == [0, 1, 2]  # the resumed run logged its one step once
    assert [s["step"] for s in res["starts"]] == [0, 2] and res["starts"][1]["resumed_from"].endswith("checkpoint-1")
    assert res["checkpoints"] == ["checkpoint-1", "checkpoint-2"] and res["images"] == ["00000.png", "00001.png"]
    assert "verified against" in res["verified"] and res["backend"] == "gloo"
    assert rollout["status"] == "cut" and rollout["seconds"] < 3 + 6 and "log_tail" in rollout
    assert records["sd3"]["status"] == records["memory"]["status"] == records["lora"]["status"] == "skipped"
    summary = (out / "summary.md").read_text()
    for phase, status in (("env", "ok"), ("e2e", "ok"), ("rollout", "cut"), ("memory", "skipped")):
        assert re.search(rf"^\| {phase} \| {status} \|", summary, flags=re.M), summary
    assert "===== e2e: rc 0" in (out / "log.txt").read_text()

"""GPU first light: the phases that give every GPU figure of the trainer, each with its own time limit.

    bash scripts/gpu/first_light.sh --device cuda --out "$OUT"     # on the GPU machine (installs the carried wheels)
    python scripts/gpu/first_light.py --device cpu --budget 120 --out outputs/first_light_cpu --phases env e2e

Phases, in order of value (``--phases`` picks some; ``--limit rollout=200`` changes a phase's limit):

* ``env``: the machine and the software (GPU, driver, torch, CUDA, NCCL, package versions), a bf16 matmul rate.
* ``e2e``: the tiny pipeline end to end under torchrun with one process (NCCL on CUDA, gloo on the CPU), in bf16
  on CUDA: preprocess, train 2 steps with a checkpoint, resume for 1 more, verify the last export, sample from it.
* ``rollout``: ``bench_rollout.py`` -- true-size FLUX.1-dev with random bf16 weights at 720², the reference order
  against ours, eager and torch.compiled (CPU: its tiny smoke run).
* ``sd3``: ``bench_rollout.py --model sd3`` -- one G2RPO step (rollout and update, K = {0, 1}) on SD3.5-Medium's
  true-size transformer with random bf16 weights at 512², T = 10, classifier-free guidance 4.5 (CPU: the tiny SD3).
* ``memory``: ``bench_memory.py`` at FLUX.1-dev's true widths with 1+1, 2+1 and 1+2 blocks (run side by side on
  one GPU: each process's own allocator peak is what is read, so they do not disturb each other), scaled to
  19 + 38 blocks.
* ``lora``: one step of the 1-GPU LoRA recipe (``configs/g2rpo_hps_clip_1gpu_lora.yaml``) at true size, its time
  and peak memory per phase.

Each phase runs in its own process group, limited to the smaller of its limit and what is left of ``--budget``
(counted from ``--t0``, the start of first_light.sh, so the wheel install counts too); a phase that overruns is
killed and recorded as ``cut``, one that would start with under MIN_START_S left is ``skipped``. After every phase
``OUT/<phase>.json`` (status, seconds, limit, command, and what the phase measured, as far as it got) and
``OUT/summary.md`` (every phase so far) are rewritten, so a run cut anywhere keeps what it did; ``OUT/log.txt``
holds every phase's output. That is 8 files, what the device tool returns at most.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHASES = {"env": 30, "e2e": 120, "rollout": 180, "sd3": 90, "memory": 120, "lora": 180}  # phase -> limit, seconds
MIN_START_S = 10
KILL_GRACE_S = 5
TINY_PARTS = ("flux", "hps", "clip_score")  # what training reads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--budget", type=float, default=420.0, help="seconds in all, never exceeded (default 420)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs/first_light"),
                   help="results: <phase>.json, summary.md, log.txt (default: $OUT)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--phases", nargs="+", choices=tuple(PHASES), default=list(PHASES))
    p.add_argument("--limit", action="append", default=[], metavar="PHASE=SECONDS", help="a phase's own limit")
    p.add_argument("--t0", type=float, default=None, help="epoch seconds the budget counts from (default: now)")
    p.add_argument("--run-phase", choices=tuple(PHASES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    limits = dict(PHASES)
    for item in args.limit:
        name, _, value = item.partition("=")
        if name not in PHASES or not value.replace(".", "", 1).isdigit():
            p.error(f"--limit {item}: expected PHASE=SECONDS with PHASE one of {', '.join(PHASES)}")
        limits[name] = float(value)
    args.limits = limits
    return args


# --------------------------------------------------------------------------------------------
# The driver: one process group per phase, a time limit each, results written as they come
# --------------------------------------------------------------------------------------------


def run_phases(args) -> int:
    t0 = args.t0 or time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"g2rpo_first_light_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text(f"first light, {args.device}, budget {args.budget:.0f} s, phases {' '.join(args.phases)}\n")
    records = {}
    for name in PHASES:
        record = {"phase": name, "device": args.device, "limit_s": args.limits[name]}
        left = args.budget - (time.time() - t0) - KILL_GRACE_S
        if name not in args.phases:
            record.update(status="skipped", reason="not in --phases")
        elif left < MIN_START_S:
            record.update(status="skipped", reason=f"{max(left, 0):.0f} s of the budget left (< {MIN_START_S} s)")
        else:
            record.update(run_one(name, min(args.limits[name], left), args, work, log))
        records[name] = record
        write_json(out / f"{name}.json", record)
        write_summary(out / "summary.md", records, args, time.time() - t0)
        print(f"[first light] {name}: {record['status']}"
              + (f" in {record['seconds']:.1f} s" if "seconds" in record else f" ({record.get('reason', '')})"),
              flush=True)
    print((out / "summary.md").read_text(), flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in records.values()) else 1


def run_one(name: str, limit: float, args, work: Path, log: Path) -> dict:
    result_file = work / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-phase", name, "--device", args.device,
           "--work", str(work), "--json", str(result_file)]
    start = time.time()
    with log.open("a") as sink:
        sink.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, status = proc.wait(timeout=limit), None
        except subprocess.TimeoutExpired:
            stop_group(proc)
            rc, status = proc.returncode, "cut"
        sink.write(f"===== {name}: rc {rc}, {time.time() - start:.1f} s =====\n")
    measured = read_json(result_file)
    status = status or ("ok" if rc == 0 else "failed")
    record = {"status": status, "rc": rc, "seconds": round(time.time() - start, 1), "limit_s": round(limit, 1),
              "command": " ".join(cmd[1:]), "result": measured}
    if status != "ok":
        record["log_tail"] = log_tail(log)
    return record


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the phase's whole process group (torchrun and its workers), SIGKILL what is left after the grace."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value) -> None:
    from g2rpo.io import atomic_write_text

    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def write_summary(path: Path, records: dict, args, elapsed: float) -> None:
    lines = [f"# GPU first light ({args.device})", "",
             f"Budget {args.budget:.0f} s, {elapsed:.0f} s used. Command: `bash scripts/gpu/first_light.sh "
             f"--device {args.device} --budget {args.budget:.0f}`.", "",
             "| phase | status | s | limit s | headline |", "|---|---|---|---|---|"]
    for name, r in records.items():
        headline = HEADLINES[name](r.get("result") or {}) if r.get("result") else r.get("reason", "")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '-')} | {r['limit_s']:.0f} | {headline} |")
    for name, r in records.items():
        table = TABLES[name](r["result"]) if r.get("result") else None
        if table:
            lines += ["", f"## {name}", "", *table]
    from g2rpo.io import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# Phases (each runs in its own process: --run-phase NAME --json FILE)
# --------------------------------------------------------------------------------------------


class Result:
    """A phase's measurements, rewritten to its JSON file at every `set`, so a killed phase keeps what it had."""

    def __init__(self, path: Path):
        self.path, self.data = path, {}

    def set(self, **values) -> None:
        self.data.update(values)
        write_json(self.path, self.data)


def phase_env(args, result: Result) -> None:
    import platform

    import torch

    versions = {}
    for name in ("diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "hpsv2", "safetensors",
                 "huggingface_hub", "tokenizers", "sentencepiece", "timm", "torchvision", "numpy", "deepspeed"):
        try:
            from importlib.metadata import version
            versions[name] = version(name)
        except Exception:  # not installed
            versions[name] = None
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpu_count": os.cpu_count(), "packages": versions,
             "host_memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
             "distributed_backends": {b: getattr(torch.distributed, f"is_{b}_available")() for b in ("nccl", "gloo")}}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1),
                     multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                     nccl=".".join(map(str, torch.cuda.nccl.version())), cudnn=torch.backends.cudnn.version(),
                     driver=nvidia_smi("driver_version"))
    result.set(**facts)
    import diffusers

    import g2rpo.trainer  # noqa: F401  (the whole package imports: diffusers, open_clip, hpsv2, peft)
    from hpsv2.src.open_clip import get_tokenizer

    get_tokenizer("ViT-H-14")(["a photo of a cat"])  # its BPE vocabulary is in place
    result.set(imports="ok", diffusers_file=diffusers.__file__)
    n = 8192 if args.device == "cuda" else 512
    a, b = (torch.randn(n, n, device=args.device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(args.device)
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync(args.device)
    result.set(matmul_bf16_n=n, matmul_bf16_tflops=round(2 * n**3 * reps / (time.perf_counter() - start) / 1e12, 1))


def nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def tiny_models(work: Path) -> Path:
    """The tiny checkpoints training reads, under ``work/ckpt/tiny``, and a models config naming them."""
    from g2rpo.data import read_prompt_file
    from g2rpo.tiny import prepare_tiny_checkpoints

    prepare_tiny_checkpoints(work / "ckpt/tiny", read_prompt_file(ROOT / "data/example_prompts.txt"), only=TINY_PARTS)
    text = (ROOT / "configs/models/tiny.yaml").read_text().replace("ckpt/tiny/", f"{work / 'ckpt/tiny'}/")
    config = work / "models_tiny.yaml"
    config.write_text(text)
    return config


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *args]


def run_step(result: Result, steps: list, name: str, cmd: list[str], env: dict | None = None) -> None:
    """Run one command of a phase; record its time and return code; a failure ends the phase with its output."""
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stdout.write(proc.stderr[-20000:])
    steps.append({"step": name, "rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1)})
    result.set(steps=steps)
    if proc.returncode:
        raise SystemExit(f"{name} failed (rc {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-600:]}")


def phase_e2e(args, result: Result) -> None:
    from g2rpo.checkpoint import verify_export

    cuda = args.device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    models = tiny_models(args.work)
    tiny = args.work / "ckpt/tiny"
    work = args.work / "e2e"
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    steps: list = []
    result.set(dtype=dtype, backend="nccl" if cuda else "gloo")
    run_step(result, steps, "preprocess", torchrun(
        "-m", "g2rpo.preprocess", "--model", str(tiny / "flux"), "--prompts", str(ROOT / "data/example_prompts.txt"),
        "--out", str(work / "emb"), "--dtype", dtype, "--device", args.device, "--max-sequence-length", "64"), env)
    train = ["-m", "g2rpo.train", "--config", str(ROOT / "configs/tiny.yaml"), f"models.base.path={tiny / 'flux'}",
             f"models.hps.base_dir={tiny / 'hps/open_clip_base'}", f"models.hps.checkpoint={tiny / 'hps/HPS_v2.1_compressed.pt'}",
             f"models.clip_score.path={tiny / 'clip_score'}", f"data.index={work / 'emb/index.jsonl'}",
             f"output_dir={work / 'run'}", f"engine.device={args.device}",
             f"engine.mixed_precision={'bf16' if cuda else 'fp32'}", f"models.base.dtype={dtype}",
             "checkpoint_every=2", "checkpoint_start=2", "eval_every=2", "sample_every=2"]
    run_step(result, steps, "train 2 steps", torchrun(*train, "max_steps=2", "--overwrite"), env)
    run_step(result, steps, "resume, 1 more", torchrun(*train, "max_steps=3", "--resume", "auto"), env)
    last = max((work / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    export = last / "transformer"
    verified = verify_export(export)
    run_step(result, steps, "infer", [sys.executable, str(ROOT / "scripts/inference/infer.py"), "--base",
                                      str(tiny / "flux"), "--transformer", str(export), "--prompt-file",
                                      str(ROOT / "data/example_prompts.txt"), "--limit", "2", "--height", "64",
                                      "--width", "64", "--steps", "8", "--dtype", dtype, "--device", args.device,
                                      "--out", str(work / "infer")], env)
    metrics = [json.loads(line) for line in (work / "run/metrics.jsonl").read_text().splitlines() if line.strip()]
    history = [json.loads(line) for line in (work / "run/config_history.jsonl").read_text().splitlines()]
    startup = read_json(work / "run/startup_memory.json")
    result.set(models_config=str(models), verified=verified, images=sorted(p.name for p in (work / "infer").glob("*.png")),
               checkpoints=sorted(p.name for p in (work / "run").glob("checkpoint-*")),
               steps_logged=[m.get("step") for m in metrics if "step" in m],
               starts=[{k: h.get(k) for k in ("step", "resumed_from", "world_size")} for h in history],
               metrics=[{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in metrics],
               startup_memory=startup)


def phase_rollout(args, result: Result) -> None:
    cmd = [sys.executable, str(ROOT / "scripts/benchmark/bench_rollout.py"), "--device", args.device,
           "--json", str(args.work / "rollout.bench.json")]
    cmd += ["--branch-steps", "0", "1", "--compile"] if args.device == "cuda" else ["--smoke"]
    result.set(command=" ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        rc = proc.wait()
    finally:
        result.set(bench=read_json(args.work / "rollout.bench.json"))
    if rc:
        raise SystemExit(f"bench_rollout.py failed (rc {rc})")


def phase_sd3(args, result: Result) -> None:
    """One G2RPO step's rollout and update on SD3.5-Medium's true-size transformer (random bf16 weights) at the
    SD3.5-M recipes' sampling: 512x512, T = 10, classifier-free guidance 4.5 (K = {0, 1} to fit the lease)."""
    cmd = [sys.executable, str(ROOT / "scripts/benchmark/bench_rollout.py"), "--model", "sd3", "--device", args.device,
           "--json", str(args.work / "sd3.bench.json")]
    cmd += ["--branch-steps", "0", "1", "--skip-reference"] if args.device == "cuda" else ["--smoke", "--skip-reference"]
    result.set(command=" ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        rc = proc.wait()
    finally:
        result.set(bench=read_json(args.work / "sd3.bench.json"))
    if rc:
        raise SystemExit(f"bench_rollout.py --model sd3 failed (rc {rc})")


def memory_run(args, double: int, single: int, threads: int, extra: list[str] = ()) -> tuple[list[str], Path, dict]:
    tag = f"d{double}s{single}" + ("_lora" if extra else "")
    cuda = args.device == "cuda"
    sizes = ["--height", "720", "--text-tokens", "512", "--group-size", "12"] if cuda else []
    out = args.work / f"memory_{tag}.json"
    cmd = torchrun(str(ROOT / "scripts/benchmark/bench_memory.py"), "--device", args.device, "--double", str(double),
                   "--single", str(single), "--models-config", str(tiny_models(args.work)),
                   "--pipeline", str(scratch(args.work) / f"flux_d{double}s{single}"), "--workdir",
                   str(args.work / f"memory_{tag}"), "--json", str(out), *sizes, *extra)
    return cmd, out, {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def scratch(work: Path) -> Path:
    """Where the large pipeline folders go: /dev/shm when it has room (no disk round trip), else ``work``."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40e9:
        folder = shm / "g2rpo_first_light"
        folder.mkdir(exist_ok=True)
        return folder
    return work


def phase_memory(args, result: Result) -> None:
    sys.path.insert(0, str(ROOT / "scripts/benchmark"))
    from bench_memory import scale

    from g2rpo.tiny import reduced_flux_config

    shapes = [(1, 1), (2, 1), (1, 2)]
    cuda = args.device == "cuda"
    threads = max(1, (os.cpu_count() or 3) // 3) if cuda else 1
    runs = [memory_run(args, d, s, threads) for d, s in shapes]
    result.set(commands=[" ".join(c[1:]) for c, _, _ in runs], side_by_side=cuda)
    outputs = []
    if cuda:  # side by side: each process's own allocator peak is read, unaffected by the others
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=env) for cmd, _, env in runs]
        codes = [p.wait() for p in procs]
    else:  # the CPU's memory is one pool, and host RSS is what the CPU run reads: one at a time
        codes = [subprocess.run(cmd, cwd=ROOT, env=env).returncode for cmd, _, env in runs]
    for (_, out, _), (d, s), rc in zip(runs, shapes, codes):
        outputs.append(read_json(out))
        result.set(runs=outputs)
        if rc:
            raise SystemExit(f"bench_memory.py with {d}+{s} blocks failed (rc {rc})")
    full = param_count(reduced_flux_config(19, 38))
    result.set(scaled=scale(outputs, full), full_params=full)


def param_count(config: dict) -> int:
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return sum(p.numel() for p in FluxTransformer2DModel(**config).parameters())


def phase_lora(args, result: Result) -> None:
    cuda = args.device == "cuda"
    blocks = (19, 38) if cuda else (1, 1)
    extra = ["--config", str(ROOT / "configs/g2rpo_hps_clip_1gpu_lora.yaml"), "--warmup-steps", "0",
             "--num-steps", "16" if cuda else "4", "--branch-steps", "0"]
    cmd, out, env = memory_run(args, *blocks, (os.cpu_count() or 1) if cuda else 1, extra)
    result.set(command=" ".join(cmd[1:]), blocks=blocks)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    result.set(run=read_json(out))
    if rc:
        raise SystemExit(f"bench_memory.py (LoRA recipe) failed (rc {rc})")


RUNNERS = {"env": phase_env, "e2e": phase_e2e, "rollout": phase_rollout, "sd3": phase_sd3, "memory": phase_memory,
           "lora": phase_lora}


# --------------------------------------------------------------------------------------------
# What summary.md shows of each phase
# --------------------------------------------------------------------------------------------


def _env_headline(r: dict) -> str:
    where = r.get("gpu") or f"{r.get('cpu_count')} CPUs"
    return (f"{where}, torch {r.get('torch')} (CUDA {r.get('cuda')}, NCCL {r.get('nccl', '-')}), "
            f"bf16 matmul {r.get('matmul_bf16_tflops', '-')} TFLOP/s")


def _e2e_headline(r: dict) -> str:
    return (f"{r.get('backend')}, {r.get('dtype')}: " + ", ".join(f"{s['step']} {s['seconds']} s" for s in r.get("steps", []))
            + (f"; checkpoints {', '.join(r['checkpoints'])}" if r.get("checkpoints") else ""))


def _rollout_rows(r: dict) -> dict:
    return (r.get("bench") or {}).get("rows", {})


def _rollout_headline(r: dict) -> str:
    rows = _rollout_rows(r)
    parts = [f"{name} {row['rollout_s']:.1f} s" + (f" ({row['MFU']:.0%} MFU)" if "MFU" in row else "")
             for name, row in rows.items()]
    return "rollout " + ", ".join(parts) if parts else "no row finished"


def _rollout_table(r: dict) -> list[str]:
    bench = r.get("bench") or {}
    if not bench.get("rows"):
        return []
    cols = ["calls", "sample_forwards", "rollout_s", "update_s", "peak_mem_gb", "rollout_TFLOP/s", "MFU"]
    lines = [f"{bench.get('gpu') or bench['device']}, {bench['height']}², T = {bench['num_steps']}, "
             f"K = {bench['branch_steps']}, G = {bench['granularities']}, N = {bench['group_size']}, "
             f"{bench['params']:,} parameters, {bench['forward_tflop_per_sample']:.2f} TFLOP per sample-forward; "
             f"max |Δ completions| vs the reference: {bench.get('agree') or '-'}", "",
             "| order | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in bench["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if "compiled_first_iteration_rollout_s" in bench:
        lines += ["", f"compiled, first iteration (compiling): {bench['compiled_first_iteration_rollout_s']:.1f} s"]
    return lines


def _memory_table(run: dict) -> list[str]:
    cuda = run["device"] == "cuda"
    keys = ["peak_rss_gb"] + (["peak_cuda_gb"] if cuda else []) + ["seconds"]
    lines = [f"{run['double']} + {run['single']} blocks ({run['params'] / 1e9:.2f} B parameters), {run['height']}², "
             f"{run['text_tokens']} text tokens, N = {run['group_size']}, T = {run.get('num_steps')}, "
             f"K = {run.get('branch_steps')}" + (f", LoRA rank {run['lora_rank']}" if run.get("lora_rank") else ""), "",
             "| phase | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for phase in run["ranks"][0]:
        lines.append(f"| {phase} | " + " | ".join(_fmt(max(rank[phase].get(k, 0.0) for rank in run["ranks"]))
                                                  for k in keys) + " |")
    return lines


def _memory_headline(r: dict) -> str:
    scaled = r.get("scaled")
    if not scaled:
        return f"{len([x for x in r.get('runs', []) if x])} of 3 runs finished"
    return "19 + 38 blocks, measured / model GB: " + ", ".join(f"{p} {v['full']:.1f} / {v['full_model']:.1f}"
                                                              for p, v in scaled.items())


def _memory_tables(r: dict) -> list[str]:
    lines = []
    if r.get("scaled"):
        lines += ["| phase | per double block: measured / model | per single block: measured / model | "
                  "19 + 38 blocks: measured / model |", "|---|---|---|---|"]
        lines += [f"| {p} | {v['double']:.2f} / {v['double_model']:.2f} | {v['single']:.2f} / {v['single_model']:.2f} | "
                  f"{v['full']:.1f} / {v['full_model']:.1f} |" for p, v in r["scaled"].items()]
    for run in r.get("runs") or []:
        if run:
            lines += ["", *_memory_table(run)]
    return lines


def _lora_headline(r: dict) -> str:
    run = r.get("run")
    if not run:
        return "did not finish"
    phases = ("rollout", "decode+reward", "update")
    worst = {p: max(rank[p].get("peak_cuda_gb", rank[p].get("peak_rss_gb", 0.0)) for rank in run["ranks"])
             for p in phases if p in run["ranks"][0]}
    seconds = sum(run["ranks"][0][p]["seconds"] for p in phases if p in run["ranks"][0])
    return f"step {seconds:.1f} s (K = {run.get('branch_steps')}); peak GB " + ", ".join(f"{p} {v:.1f}" for p, v in worst.items())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


HEADLINES = {"env": _env_headline, "e2e": _e2e_headline, "rollout": _rollout_headline, "sd3": _rollout_headline,
             "memory": _memory_headline, "lora": _lora_headline}
TABLES = {"env": lambda r: [f"```\n{json.dumps(r, indent=1)}\n```"], "e2e": lambda r: [],
          "rollout": _rollout_table, "sd3": _rollout_table, "memory": _memory_tables,
          "lora": lambda r: _memory_table(r["run"]) if r.get("run") else []}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_phase is None:
        return run_phases(args)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    RUNNERS[args.run_phase](args, Result(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())

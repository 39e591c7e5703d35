"""scripts/benchmark/: bench_rollout's analytic FLOP count, and the smoke runs CI does of both benchmarks."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, TORCHRUN, model_overrides
from g2rpo.config import SamplingConfig
from g2rpo.rollout import expected_cost
from g2rpo.tiny import TINY_TRANSFORMER_CONFIG

sys.path.insert(0, str(ROOT / "scripts" / "benchmark"))
import bench_rollout  # noqa: E402
from bench_rollout import transformer_flops  # noqa: E402


@pytest.mark.parametrize("extra", [{}, dict(num_layers=2, num_single_layers=3, attention_head_dim=32,
                                            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=48,
                                            axes_dims_rope=(8, 12, 12))])
@pytest.mark.parametrize("tokens", [(16, 512), (64, 40)])
def test_flop_formula_matches_torch_flop_counter(extra, tokens):
    from diffusers import FluxTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(TINY_TRANSFORMER_CONFIG, **extra)
    model = FluxTransformer2DModel(**config).eval()
    image, text = tokens
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(hidden_states=torch.randn(1, image, 64), encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"]),
              pooled_projections=torch.randn(1, config["pooled_projection_dim"]), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3), guidance=torch.tensor([3.5]))
    assert transformer_flops(config, image, text) == pytest.approx(counter.get_total_flops(), rel=5e-3)


def _table(stdout: str, header: str) -> dict[str, list[str]]:
    """A benchmark's markdown table: first cell -> the other cells, for every row below the ``header`` row."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in stdout.splitlines() if line.startswith("| ") and not line.startswith(f"| {header} |")}


@pytest.mark.parametrize("extra", [{}, dict(num_layers=3, dual_attention_layers=(0, 1), caption_projection_dim=64,
                                            attention_head_dim=16)])
@pytest.mark.parametrize("latent, text", [((8, 8), 93), ((16, 8), 40)])
def test_flop_formula_matches_torch_flop_counter_on_sd3(extra, latent, text):
    """SD3's joint blocks (MMDiT-X's second image attention, the last block's text stream ending at attention)."""
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from g2rpo.tiny import TINY_SD3_TRANSFORMER_CONFIG

    config = dict(TINY_SD3_TRANSFORMER_CONFIG, **extra)
    model = SD3Transformer2DModel(**config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(hidden_states=torch.randn(1, 16, *latent), encoder_hidden_states=torch.randn(1, text, 64),
              pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    image = (latent[0] // 2) * (latent[1] // 2)
    assert transformer_flops(config, image, text) == pytest.approx(counter.get_total_flops(), rel=5e-3)


@pytest.mark.parametrize("model", ["flux", "sd3"])
def test_benchmark_smoke_run_agrees_and_counts(capsys, model):
    bench_rollout.main(["--smoke", "--model", model])  # in process: the script is plain Python, one process
    stdout = capsys.readouterr().out
    assert "reference and shared completions agree" in stdout
    rows = _table(stdout, "order")
    smoke = SamplingConfig(num_steps=8, branch_steps=[0, 1, 2], group_size=4, height=32, width=32)
    for order in ("reference", "shared"):
        cost = expected_cost(dataclasses.replace(smoke, order=order))  # SD3: the same calls, two rows each (CFG)
        assert [int(rows[order][0]), int(rows[order][1])] == [cost["calls"], cost["sample_forwards"]]
        assert int(rows[order][2]) == 4 * 3 * 2  # VAE decodes: N x K x G
    assert int(rows["shared"][3]) < int(rows["reference"][3])  # batched reward calls


def test_train_step_benchmark_smoke_run(tiny_models, tiny_embeddings, tmp_path, capsys):
    """Through the real Trainer (in process, one FSDP rank; the gathered == sharded rollouts of two ranks are
    test_rollout_weights.py's): the three variants agree and count as the closed form says."""
    import bench_train_step

    bench_train_step.benchmark(["--smoke", *model_overrides(tiny_models), f"data.index={tiny_embeddings / 'index.jsonl'}",
                                f"output_dir={tmp_path / 'out'}"])
    rows = _table(capsys.readouterr().out, "variant")
    assert list(rows) == ["reference", "shared", "shared+gathered"]
    smoke = SamplingConfig(num_steps=6, branch_steps=[0, 2], group_size=3, height=32, width=32)
    for name, order in (("reference", "reference"), ("shared", "shared"), ("shared+gathered", "shared")):
        cost = expected_cost(dataclasses.replace(smoke, order=order))
        assert [int(rows[name][0]), int(rows[name][1])] == [cost["calls"], cost["sample_forwards"]]
        assert float(rows[name][-1]) < 1e-5  # max |Δ completions| against the reference order
    assert rows["shared"][4] == "-" and float(rows["reference"][4]) > 0
    assert rows["reference"][4] == rows["shared+gathered"][4]  # the official update is ours: timed once


def test_memory_scaling_recovers_per_block_costs():
    """--scale on runs whose peaks are exactly c + a·doubles + b·singles: per-block a and b, and c + 19a + 38b."""
    from bench_memory import STEP_PHASES, predicted_bytes_per_param, scale

    c, a, b = 4.0, 2.5, 1.0
    def run(doubles, singles, params):
        phases = {phase: {"peak_rss_gb": c + i + a * doubles + b * singles} for i, phase in enumerate(STEP_PHASES)}
        return {"double": doubles, "single": singles, "world_size": 2, "device": "cpu", "params": params,
                "ranks": [phases, {k: {"peak_rss_gb": v["peak_rss_gb"] - 0.5} for k, v in phases.items()}]}

    rows = scale([run(1, 1, 500), run(2, 1, 840), run(1, 2, 640)], full_params=11_900)
    for i, phase in enumerate(STEP_PHASES):
        assert rows[phase]["double"] == pytest.approx(a) and rows[phase]["single"] == pytest.approx(b)
        assert rows[phase]["full"] == pytest.approx(c + i + 19 * a + 38 * b)
        rate = predicted_bytes_per_param(phase, 2) / 1e9
        assert rows[phase]["double_model"] == pytest.approx(rate * 340)
        assert rows[phase]["full_model"] == pytest.approx(c + i + a + b + rate * (11_900 - 500))
    assert predicted_bytes_per_param("rollout", 16) == pytest.approx(12 / 16 + 2)  # shard + AdamW, + gathered bf16


def test_memory_benchmark_smoke_run(tiny_models, tmp_path):
    """bench_memory.py through the real trainer (tiny pipeline): every phase of both ranks is recorded."""
    import json

    import yaml

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({
        "hps": {"arch": tiny_models.hps.arch, "base_dir": tiny_models.hps.base_dir,
                "checkpoint": tiny_models.hps.checkpoint, "dtype": "float32", "preprocess": "tensor"},
        "clip_score": {"path": tiny_models.clip_score.path, "dtype": "float32", "preprocess": "tensor"}}))
    out = tmp_path / "memory.json"
    cmd = [*TORCHRUN, str(ROOT / "scripts/benchmark/bench_memory.py"), "--pipeline", tiny_models.base.path,
           "--models-config", str(models), "--workdir", str(tmp_path / "work"), "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    phases = ["wrap", "load", "vae+rewards", "first step", "rollout", "decode+reward", "update", "checkpoint"]
    assert [list(rank) for rank in measured["ranks"]] == [phases, phases]
    for rank in measured["ranks"]:
        for record in rank.values():
            assert record["peak_rss_gb"] >= max(record["rss_before_gb"], record["rss_after_gb"]) - 1e-3
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        tiny = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    assert measured["params"] == sum(p.numel() for p in tiny.parameters())
    assert (tmp_path / "work/run/checkpoint-1/COMMITTED").is_file()

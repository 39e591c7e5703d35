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


def test_benchmark_smoke_run_agrees_and_counts():
    result = subprocess.run([sys.executable, str(ROOT / "scripts/benchmark/bench_rollout.py"), "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference and shared completions agree" in result.stdout
    rows = _table(result.stdout, "order")
    smoke = SamplingConfig(num_steps=8, branch_steps=[0, 1, 2], group_size=4, height=32, width=32)
    for order in ("reference", "shared"):
        cost = expected_cost(dataclasses.replace(smoke, order=order))
        assert [int(rows[order][0]), int(rows[order][1])] == [cost["calls"], cost["sample_forwards"]]
        assert int(rows[order][2]) == 4 * 3 * 2  # VAE decodes: N x K x G
    assert int(rows["shared"][3]) < int(rows["reference"][3])  # batched reward calls


def test_train_step_benchmark_smoke_run(tiny_models, tiny_embeddings, tmp_path):
    """Two FSDP ranks through the real Trainer: the three variants agree and count as the closed form says."""
    cmd = [*TORCHRUN, str(ROOT / "scripts/benchmark/bench_train_step.py"), "--smoke", *model_overrides(tiny_models),
           f"data.index={tiny_embeddings / 'index.jsonl'}", f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _table(result.stdout, "variant")
    assert list(rows) == ["reference", "shared", "shared+gathered"]
    smoke = SamplingConfig(num_steps=6, branch_steps=[0, 2], group_size=3, height=32, width=32)
    for name, order in (("reference", "reference"), ("shared", "shared"), ("shared+gathered", "shared")):
        cost = expected_cost(dataclasses.replace(smoke, order=order))
        assert [int(rows[name][0]), int(rows[name][1])] == [cost["calls"], cost["sample_forwards"]]
        assert float(rows[name][-1]) < 1e-5  # max |Δ completions| against the reference order
    assert rows["shared"][4] == "-" and float(rows["reference"][4]) > 0 and float(rows["shared+gathered"][4]) > 0

"""Rollouts on gathered weights (engine.rollout_weights=gathered) == rollouts through the sharded engine."""

import json
import subprocess

import pytest
import torch

from conftest import ENV, ROOT, TORCHRUN
from g2rpo.config import EngineConfig, SamplingConfig
from g2rpo.engine import RolloutWeights
from g2rpo.models import load_transformer
from g2rpo.models.flux import PromptEmbedding
from g2rpo.rollout import expected_cost, singular_sde_rollout

CFG = SamplingConfig(num_steps=6, branch_steps=[0, 3], group_size=3, height=32, width=32)
CFG_HELPER = SamplingConfig(num_steps=6, branch_steps=[0, 2], group_size=3, height=32, width=32)  # the helper's


@pytest.fixture(scope="module")
def model(tiny_models):
    model = load_transformer(tiny_models.base.path, subfolder="transformer").eval()
    model.folder = tiny_models.base.path
    return model


@pytest.fixture(scope="module")
def embedding(model):
    g = torch.Generator().manual_seed(0)
    return PromptEmbedding(torch.randn(8, model.config.joint_attention_dim, generator=g),
                           torch.randn(model.config.pooled_projection_dim, generator=g), torch.zeros(8, 3))


def _rollout(policy, embedding):
    return singular_sde_rollout(policy, embedding, CFG, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_copy_matches_the_fp32_model_under_the_same_autocast(model, embedding, compute_dtype):
    """The dtype rule (Linear in the autocast dtype, RMSNorm scales in fp32) changes nothing but float rounding.

    Not bit for bit: even a deepcopy of the model differs by ~5e-7 here (CPU GEMM results depend on
    the weights' memory alignment); a wrong dtype rule would differ by bf16 rounding, ~1e-2.
    """
    copy = RolloutWeights(model, compute_dtype, torch.device("cpu"))
    copy.load(model.named_parameters(), version=0)
    assert {p.dtype for n, p in copy.module.named_parameters() if "norm_q" in n} == {torch.float32}
    assert copy.module.x_embedder.weight.dtype == (compute_dtype or torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype is not None):
        expected, got = _rollout(model, embedding), _rollout(copy.module, embedding)
    torch.testing.assert_close(got.completions, expected.completions, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.old_log_probs, expected.old_log_probs, atol=1e-5, rtol=0)
    if compute_dtype is not None:  # and bf16 really ran: it differs from fp32
        assert not torch.allclose(expected.completions, _rollout(model, embedding).completions, atol=1e-4)


def test_missing_unknown_or_repeated_parameters_are_named(model):
    copy = RolloutWeights(model, None, torch.device("cpu"))
    params = list(model.named_parameters())
    with pytest.raises(RuntimeError, match="no value gathered for .*x_embedder"):
        copy.load([(n, p) for n, p in params if not n.startswith("x_embedder")], version=0)
    with pytest.raises(RuntimeError, match=f"'{params[0][0]}' was gathered twice"):
        copy.load(params[:1] + params, version=0)
    with pytest.raises(RuntimeError, match="'extra.weight' was gathered but the copy has no such parameter"):
        copy.load(params + [("extra.weight", params[0][1])], version=0)
    assert copy.version == -1  # nothing was marked loaded


def test_rollout_weights_option_is_validated():
    with pytest.raises(ValueError, match="engine.rollout_weights='full'"):
        EngineConfig(rollout_weights="full")


# engine kind : torch.compile the gathered rollout (compiled == eager is test_compiled_rollouts_equal_eager_..., in
# process: a compile in each of two ranks costs more CI time than all the rest of this launch)
VARIANTS = ("fsdp:0", "deepspeed:0")


@pytest.fixture(scope="module")
def two_rank_rollouts(tiny_models, tmp_path_factory):
    """One 2-rank launch running every variant in turn (each engine built afresh in the same processes)."""
    out = tmp_path_factory.mktemp("rollout_weights") / "result.json"
    cmd = [*TORCHRUN, str(ROOT / "tests/helpers/rollout_weights.py"), tiny_models.base.path, ",".join(VARIANTS),
           str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_gathered_rollouts_equal_sharded_ones_and_follow_each_step(variant, two_rank_rollouts):
    """Two ranks (FSDP2, or ZeRO-3): same rollouts before and after a step, and the
    gathered rollout makes no collective call per forward (FSDP: none at all inside the rollout)."""
    measured = two_rank_rollouts[variant]
    assert max(measured["diff"]) < 1e-4, measured  # stale weights after the step differ by ~2 here
    if variant.startswith("fsdp"):
        calls = expected_cost(CFG_HELPER)["calls"]
        assert all(n >= calls for n in measured["collectives_sharded"]), measured  # gathers on every forward
        assert measured["collectives_gathered"] == [3, 3], measured  # one all-gather per unit (2 blocks + root)
    else:
        assert measured["copy_version"] == [0, 1], measured  # ZeRO-3's copy: refreshed once per step


def test_compile_rollout_needs_gathered_weights_under_zero3():
    with pytest.raises(ValueError, match="engine.compile_rollout=true with engine.kind=deepspeed and zero_stage=3"):
        EngineConfig(kind="deepspeed", zero_stage=3, compile_rollout=True, rollout_weights="sharded")
    EngineConfig(compile_rollout=True, rollout_weights="sharded")  # FSDP2 compiles the sharded module


@pytest.mark.slow
def test_compiled_rollouts_equal_eager_and_follow_each_step(model, embedding):
    """engine.compile_rollout: the compiled module rolls out as eager does, also after an optimiser step."""
    from pathlib import Path

    from g2rpo.config import OptimConfig
    from g2rpo.distributed import DistInfo
    from g2rpo.engine import FSDPEngine
    from g2rpo.rollout import policy_log_probs

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    engine = FSDPEngine(Path(model.folder) / "transformer", EngineConfig(device="cpu", mixed_precision="fp32",
                                                                         compile_rollout=True),
                        OptimConfig(lr=1e-2), 4, info)
    for _ in range(2):
        with engine.rollout_policy() as compiled:
            assert compiled is not engine.module and compiled._orig_mod is engine.module
            eager, got = _rollout(engine.module, embedding), _rollout(compiled, embedding)
        torch.testing.assert_close(got.completions, eager.completions, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.old_log_probs, eager.old_log_probs, atol=1e-3, rtol=1e-5)
        engine.backward(policy_log_probs(engine.module, embedding, eager, 0, CFG).mean())
        engine.step()
    assert not torch.equal(engine.module.x_embedder.weight.full_tensor(), model.x_embedder.weight)  # it trained

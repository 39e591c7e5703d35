"""The FSDP2 engine: sharded load from safetensors (both strategies), errors that name the tensor, the
parallel export, and the I/O group's own time-out."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ENV, ROOT, TORCHRUN
from g2rpo.checkpoint import file_owner, plan_export
from g2rpo.config import EngineConfig, OptimConfig
from g2rpo.distributed import DistInfo
from g2rpo.engine import FSDPEngine, shard_rows
from g2rpo.models import SafetensorsFolder, load_transformer, read_weights

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def test_shard_rows_is_torch_chunk():
    for rows in (0, 1, 5, 7, 64, 3072):
        for world in (1, 2, 3, 8, 16):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            for rank in range(world):
                start, end = shard_rows(rows, world, rank)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, end)) == expected, (rows, world, rank)


@pytest.fixture(scope="module")
def loaded(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine_load")
    cmd = [*TORCHRUN, str(ROOT / "tests/helpers/engine_load.py"), tiny_models.base.path, str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("strategy", ["slices", "broadcast"])
def test_each_rank_holds_exactly_its_rows_of_the_file(loaded, strategy):
    _, result = loaded
    ranks = result[strategy]
    assert [r["mismatched"] for r in ranks] == [[], []]
    assert sum(r["rows"] for r in ranks) == result["total_rows"]  # every row on exactly one rank
    assert all(0 < r["rows"] < result["total_rows"] for r in ranks)  # and really sharded


def test_two_rank_gradient_clipping_equals_torchs_on_the_plain_model(loaded):
    clip = loaded[1]["clip"]
    assert clip["norm"] == pytest.approx(clip["expected"], rel=1e-5)  # the norm over both ranks' shards
    assert clip["grad_diff"] < 1e-4 * clip["grad_scale"], clip  # and every shard scaled by the same factor


def test_parallel_export_is_the_model_in_bf16_and_fp32(loaded, tiny_models):
    out, _ = loaded
    source = load_transformer(tiny_models.base.path, subfolder="transformer").state_dict()
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        folder = out / name
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == [  # one shard per rank
            "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
        exported = read_weights(folder)
        assert exported.keys() == source.keys()
        for key, tensor in source.items():
            assert exported[key].dtype == dtype and torch.equal(exported[key], tensor.to(dtype)), (name, key)
        reloaded = load_transformer(folder, dtype)  # diffusers reads the sharded folder
        assert torch.equal(reloaded.x_embedder.weight, source["x_embedder.weight"].to(dtype))


def test_two_rank_lora_initialises_by_name_and_merges_across_shards(loaded, tiny_models):
    """LoRA under 2 FSDP ranks: each rank's adapter rows are the seeded, sharding-independent initialisation; the
    merged export is W + (alpha / rank) · B A of the file's W and the gathered adapters, under the base names."""
    out, result = loaded
    assert result["lora_mismatched"] == [[], []]
    source = read_weights(f"{tiny_models.base.path}/transformer")
    adapters = {n: torch.tensor(v) for n, v in json.loads((out / "lora.json").read_text()).items()}
    merged = read_weights(out / "lora_merged")
    assert merged.keys() == source.keys() and len(adapters) == 22  # A, B of 8 double- and 3 single-block projections
    layers = {n.removesuffix(".lora_A.default.weight") for n in adapters if ".lora_A." in n}
    for key, tensor in source.items():
        layer = key.removesuffix(".weight")
        if layer in layers:
            delta = 2.0 * adapters[f"{layer}.lora_B.default.weight"] @ adapters[f"{layer}.lora_A.default.weight"]
            assert delta.abs().max() > 0, layer
            torch.testing.assert_close(merged[key], tensor + delta, atol=1e-6, rtol=1e-6, msg=key)
        else:
            assert torch.equal(merged[key], tensor), key


def test_export_plan_is_contiguous_and_balanced():
    sizes = {f"p{i}": n for i, n in enumerate([10, 3, 7, 50, 2, 8, 20])}  # 100 in all
    for world in (1, 2, 3, 4):
        owners = plan_export(sizes, world)
        ranks = list(owners.values())
        assert ranks == sorted(ranks) and set(ranks) <= set(range(world))  # contiguous runs, in order
        load = [sum(n for name, n in sizes.items() if owners[name] == r) for r in range(world)]
        assert max(load) <= 100 / world + max(sizes.values())  # within one tensor of an even split
    many = {f"q{i}": 1 + i % 5 for i in range(200)}  # every tensor far smaller than a rank's share, as in FLUX
    assert set(plan_export(many, 16).values()) == set(range(16))  # then every rank writes one shard


def test_checkpoint_files_are_hashed_by_the_rank_that_wrote_them():
    assert file_owner("state/fsdp/__3_0.distcp", 8) == 3
    assert file_owner("state/rng_rank5.json", 8) == 5
    assert file_owner("state/deepspeed/state/zero_pp_rank_6_mp_rank_00_optim_states.pt", 8) == 6
    assert file_owner("transformer/diffusion_pytorch_model-00004-of-00008.safetensors", 8) == 3
    for shared in ("state/fsdp/.metadata", "state/scheduler.pt", "trainer_state.json", "transformer/config.json"):
        assert file_owner(shared, 8) == 0


def test_weights_that_do_not_match_the_model_are_named(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "transformer"
    shutil.copytree(f"{tiny_models.base.path}/transformer", folder)
    state = read_weights(folder)
    state.pop("x_embedder.bias")
    state["proj_out.weight"] = state["proj_out.weight"][:, :-1].contiguous()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    cfg = EngineConfig(device="cpu", mixed_precision="fp32")
    with pytest.raises(ValueError, match=r"do not match the model: missing \['x_embedder.bias'\]"):
        FSDPEngine(folder, cfg, OptimConfig(), 1, CPU)
    state["x_embedder.bias"] = torch.zeros(state["x_embedder.weight"].shape[0])
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: tensor 'proj_out.weight' has shape"):
        FSDPEngine(folder, cfg, OptimConfig(), 1, CPU)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors or .*index.json"):
        SafetensorsFolder(folder)


def test_one_process_engine_is_the_plain_model(tiny_models):
    """In one process FSDP2 wraps without sharding: same forward as the model loaded by diffusers, same names."""
    from g2rpo.models.flux import PromptEmbedding
    from g2rpo.rollout import singular_sde_rollout
    from g2rpo.config import SamplingConfig

    folder = f"{tiny_models.base.path}/transformer"
    engine = FSDPEngine(folder, EngineConfig(device="cpu", mixed_precision="fp32"), OptimConfig(), 1, CPU)
    plain = load_transformer(folder).eval()
    assert [n for n, _ in engine.module.named_parameters()] == [n for n, _ in plain.named_parameters()]
    g = torch.Generator().manual_seed(0)
    embedding = PromptEmbedding(torch.randn(8, 32, generator=g), torch.randn(32, generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=4, branch_steps=[0], group_size=2, height=32, width=32)
    with engine.rollout_policy() as policy:
        got = singular_sde_rollout(policy, embedding, cfg, torch.Generator().manual_seed(1))
    expected = singular_sde_rollout(plain, embedding, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(got.completions, expected.completions, atol=1e-6, rtol=0)


def test_io_group_outlasts_the_default_time_out(tmp_path):
    """A rank that is still writing for longer than the default group's time-out fails a default barrier,
    but not one in the I/O group (``io_timeout_minutes``)."""
    script = tmp_path / "io_timeout.py"
    script.write_text('''
import datetime, os, sys, time
import torch.distributed as dist
from g2rpo.distributed import io_group
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
group = io_group(minutes=0.5)
rank = dist.get_rank()
if rank == 1:
    time.sleep(4)  # "writing a checkpoint"
dist.barrier(group=group)
print(f"rank {rank}: io barrier ok", flush=True)
if rank == 1:
    time.sleep(4)
try:
    dist.barrier()
    print(f"rank {rank}: default barrier ok", flush=True)
except Exception as exc:
    print(f"rank {rank}: default barrier failed: {type(exc).__name__}", flush=True)
sys.stdout.flush()
os._exit(0)
''')
    result = subprocess.run([*TORCHRUN, str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert "rank 0: io barrier ok" in result.stdout and "rank 1: io barrier ok" in result.stdout, result.stderr[-3000:]
    assert "rank 0: default barrier failed" in result.stdout, result.stdout


def test_mixed_precision_modes_against_the_references_autocast(tiny_models):
    """``autocast`` is the reference's numerics: fp32 weights under bf16 autocast (== the plain model so run).
    ``bf16`` (MixedPrecisionPolicy) rounds every weight to bf16 as autocast does for matmuls, but also the
    RMSNorm scales and the activations between blocks: it differs at bf16 rounding level, no more."""
    from g2rpo.config import SamplingConfig
    from g2rpo.models.flux import PromptEmbedding
    from g2rpo.rollout import policy_log_probs, singular_sde_rollout

    folder = f"{tiny_models.base.path}/transformer"
    g = torch.Generator().manual_seed(0)
    embedding = PromptEmbedding(torch.randn(8, 32, generator=g), torch.randn(32, generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=4, branch_steps=[0, 1], group_size=3, height=32, width=32)
    plain = load_transformer(folder).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = singular_sde_rollout(plain, embedding, cfg, torch.Generator().manual_seed(1))
    fp32 = singular_sde_rollout(plain, embedding, cfg, torch.Generator().manual_seed(1))
    results = {}
    for mode in ("autocast", "bf16"):
        engine = FSDPEngine(folder, EngineConfig(device="cpu", mixed_precision=mode), OptimConfig(), 1, CPU)
        with engine.rollout_policy() as policy:
            results[mode] = singular_sde_rollout(policy, embedding, cfg, torch.Generator().manual_seed(1))
        with engine.autocast():  # the update's forward, with gradients, as the trainer runs it
            new = policy_log_probs(engine.module, embedding, results[mode], 0, cfg)
        torch.testing.assert_close(new.detach(), results[mode].old_log_probs[:, 0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(results["autocast"].completions, reference.completions, atol=1e-6, rtol=0)
    bf16_error = (results["bf16"].completions - reference.completions).abs().max().item()
    autocast_vs_fp32 = (reference.completions - fp32.completions).abs().max().item()
    assert 0 < bf16_error < 2 * autocast_vs_fp32, (bf16_error, autocast_vs_fp32)  # rounding level


def test_cpu_offload_trains_like_the_resident_engine(tiny_models):
    """``engine.offload`` (CPUOffloadPolicy, the one-GPU option): the same update as without it."""
    from g2rpo.config import SamplingConfig
    from g2rpo.models.flux import PromptEmbedding
    from g2rpo.rollout import policy_log_probs, singular_sde_rollout

    folder = f"{tiny_models.base.path}/transformer"
    g = torch.Generator().manual_seed(0)
    embedding = PromptEmbedding(torch.randn(8, 32, generator=g), torch.randn(32, generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=4, branch_steps=[0], group_size=2, height=32, width=32)
    weights = {}
    for offload in (False, True):
        engine = FSDPEngine(folder, EngineConfig(device="cpu", mixed_precision="fp32", offload=offload),
                            OptimConfig(lr=1e-2), 1, CPU)
        with engine.rollout_policy() as policy:
            rollout = singular_sde_rollout(policy, embedding, cfg, torch.Generator().manual_seed(1))
        engine.backward(policy_log_probs(engine.module, embedding, rollout, 0, cfg).mean())
        assert torch.isfinite(engine.clip_grad_norm())
        engine.step()
        weights[offload] = {n: p.full_tensor() for n, p in engine.module.named_parameters()}
    for name, tensor in weights[False].items():
        torch.testing.assert_close(weights[True][name], tensor, atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(weights[True]["x_embedder.weight"], load_transformer(folder).x_embedder.weight)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping active / inactive
def test_gradient_norm_and_clipping_equal_torchs_on_the_plain_model(tiny_models, max_norm):
    from g2rpo.config import SamplingConfig
    from g2rpo.models.flux import PromptEmbedding
    from g2rpo.rollout import policy_log_probs, singular_sde_rollout

    folder = f"{tiny_models.base.path}/transformer"
    g = torch.Generator().manual_seed(0)
    embedding = PromptEmbedding(torch.randn(8, 32, generator=g), torch.randn(32, generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=4, branch_steps=[0], group_size=2, height=32, width=32)
    engine = FSDPEngine(folder, EngineConfig(device="cpu", mixed_precision="fp32", activation_checkpointing=False),
                        OptimConfig(max_grad_norm=max_norm), 1, CPU)
    plain = load_transformer(folder)
    rollout = singular_sde_rollout(plain, embedding, cfg, torch.Generator().manual_seed(1))
    engine.backward(policy_log_probs(engine.module, embedding, rollout, 0, cfg).mean())
    policy_log_probs(plain, embedding, rollout, 0, cfg).mean().backward()
    norm = engine.clip_grad_norm()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=0)
    for name, param in engine.module.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), plain.get_parameter(name).grad, rtol=1e-4, atol=1e-9)


def test_a_truncated_weights_file_is_named(tiny_models, tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    source = Path(tiny_models.base.path) / "transformer" / "diffusion_pytorch_model.safetensors"
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(source.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: cannot read the safetensors header"):
        SafetensorsFolder(folder)

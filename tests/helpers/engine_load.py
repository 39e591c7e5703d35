"""torchrun helper for tests/test_engine.py: the FSDP2 engine's sharded load and parallel export.

    torchrun --nproc_per_node=2 tests/helpers/engine_load.py FLUX_DIR OUT_DIR

For both load strategies (every rank reads its slices; rank 0 reads and broadcasts), compares each
rank's local shard with the rows of the file it should hold, then exports the weights in bf16 and
fp32 with `checkpoint.export_transformer` (each rank one shard); then the same for a LoRA engine (its
adapters' rows of the seeded initialisation, the merged export across both ranks' shards, written as
``lora_merged/``, and the adapters, ``lora.json``). Rank 0 writes ``result.json``.
"""

import json
import sys
from pathlib import Path

import torch

from g2rpo.checkpoint import export_transformer
from g2rpo.config import EngineConfig, OptimConfig
from g2rpo.distributed import all_gather_object, barrier, init_distributed, teardown
from g2rpo.engine import FSDPEngine, shard_rows
from g2rpo.models import SafetensorsFolder


def clip_against_plain_model(engine, folder):
    """Both ranks backpropagate the same loss: FSDP2's averaged, sharded gradients must clip as torch clips the
    plain model's. Returns the norm difference and the largest clipped-gradient difference over ranks."""
    from g2rpo.config import SamplingConfig
    from g2rpo.models import load_transformer
    from g2rpo.models.flux import PromptEmbedding
    from g2rpo.rollout import policy_log_probs, singular_sde_rollout

    g = torch.Generator().manual_seed(0)
    embedding = PromptEmbedding(torch.randn(8, 32, generator=g), torch.randn(32, generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=4, branch_steps=[0], group_size=2, height=32, width=32)
    plain = load_transformer(folder)
    rollout = singular_sde_rollout(plain, embedding, cfg, torch.Generator().manual_seed(1))
    engine.max_grad_norm = 1e-3  # clipping active
    engine.backward(policy_log_probs(engine.module, embedding, rollout, 0, cfg).mean())
    policy_log_probs(plain, embedding, rollout, 0, cfg).mean().backward()
    norm = engine.clip_grad_norm()
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1e-3)
    grad_diff = max((p.grad.full_tensor() - plain.get_parameter(n).grad).abs().max().item()
                    for n, p in engine.module.named_parameters())
    return {"norm": norm.item(), "expected": expected.item(), "grad_diff": grad_diff,
            "grad_scale": max(p.grad.abs().max().item() for p in plain.parameters())}


def lora_engine(folder, info, out):
    """A rank-4 LoRA engine with its lora_B set to seeded values (so that the merge is not the identity): every
    rank's adapter rows against `initial_value`, then the merged export and the full adapters."""
    from g2rpo.config import LoRAConfig
    from g2rpo.lora import initial_value, is_lora

    lora = LoRAConfig(rank=4, alpha=8.0)
    engine = FSDPEngine(folder, EngineConfig(device="cpu", mixed_precision="fp32"), OptimConfig(), 1, info,
                        lora_cfg=lora, seed=3)
    mismatched = []
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if not is_lora(name):
                continue
            start, end = shard_rows(param.shape[0], info.world_size, info.rank)
            if not torch.equal(param.to_local(), initial_value(name, tuple(param.shape), 3)[start:end]):
                mismatched.append(name)
            if ".lora_B." in name:
                param.to_local().copy_(initial_value(name.replace("lora_B", "lora_A"), tuple(param.shape), 4)[start:end])
    export_transformer(engine, out / "lora_merged", torch.float32, info)
    adapters = {name: t.tolist() for name, t in engine.lora_state().items()}
    if info.is_main:
        (out / "lora.json").write_text(json.dumps(adapters))
    return all_gather_object(mismatched)


def main(flux_dir, out_dir):
    info = init_distributed("cpu")
    folder, out = Path(flux_dir) / "transformer", Path(out_dir)
    weights = SafetensorsFolder(folder)
    result = {}
    for strategy in ("slices", "broadcast"):
        cfg = EngineConfig(device="cpu", mixed_precision="fp32", load_strategy=strategy)
        engine = FSDPEngine(folder, cfg, OptimConfig(), 1, info)
        mismatched, rows_held = [], 0
        for name, param in engine.module.named_parameters():
            start, end = shard_rows(param.shape[0], info.world_size, info.rank)
            expected = weights.read(name).float()[start:end]
            if not torch.equal(param.to_local(), expected):
                mismatched.append(name)
            rows_held += end - start
        reports = all_gather_object({"mismatched": mismatched, "rows": rows_held})
        result[strategy] = reports
        if strategy == "slices":
            for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                export_transformer(engine, out / name, dtype, info)
            result["clip"] = clip_against_plain_model(engine, folder)
        del engine
    result["lora_mismatched"] = lora_engine(folder, info, out)
    barrier()
    if info.is_main:
        result["total_rows"] = sum(shape[0] if shape else 0 for shape in weights.shapes.values())
        (out / "result.json").write_text(json.dumps(result))
    teardown(0)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""torchrun helper for tests/test_rollout_weights.py: rollouts on the gathered weights == through the sharded engine.

    torchrun --nproc_per_node=2 tests/helpers/rollout_weights.py FLUX_DIR KIND:COMPILE[,KIND:COMPILE...] OUT_JSON

For each engine (KIND fsdp or deepspeed, COMPILE 1 to torch.compile the gathered rollout), one after the
other in the same processes: rolls out one group per rank with ``engine.rollout_weights=sharded`` (every
forward re-gathers) and with ``gathered``, takes one optimiser step, and does it again; rank 0 writes, per
engine, the largest differences over both ranks and the collective calls each way made per rollout.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from g2rpo.config import EngineConfig, OptimConfig, SamplingConfig
from g2rpo.distributed import all_reduce, init_distributed, teardown
from g2rpo.engine import DeepSpeedEngine, FSDPEngine
from g2rpo.models.flux import PromptEmbedding
from g2rpo.rollout import policy_log_probs, singular_sde_rollout

# every collective of torch.distributed (FSDP2 calls all_gather_single, DeepSpeed all_gather_into_tensor, ...)
COLLECTIVES = tuple(name for name in dir(dist) if callable(getattr(dist, name)) and not name.startswith("__")
                    and any(word in name for word in ("gather", "reduce", "broadcast", "barrier", "all_to_all"))
                    and name[0].islower())


@contextlib.contextmanager
def counting_collectives():
    calls = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def rollout(engine, embedding, cfg, weights):
    engine.cfg.rollout_weights = weights
    with counting_collectives() as calls, engine.rollout_policy() as policy:
        result = singular_sde_rollout(policy, embedding, cfg, torch.Generator().manual_seed(1))
    return result, len(calls)


def main(flux_dir, variants, out):
    info = init_distributed("cpu")
    results = {}
    for variant in variants.split(","):
        kind, compile_rollout = variant.split(":")
        results[variant] = run(info, flux_dir, kind, compile_rollout)
    if info.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    teardown(0)


def run(info, flux_dir, kind, compile_rollout):
    torch.manual_seed(0)
    engine_cfg = EngineConfig(kind=kind, zero_stage=3, device="cpu", mixed_precision="fp32",
                              compile_rollout=compile_rollout == "1")
    engine_cls = FSDPEngine if kind == "fsdp" else DeepSpeedEngine
    engine = engine_cls(Path(flux_dir) / "transformer", engine_cfg, OptimConfig(lr=1e-2), 4, info)
    g = torch.Generator().manual_seed(100 + info.rank)  # a different prompt per rank
    config = engine.config
    embedding = PromptEmbedding(torch.randn(8, config["joint_attention_dim"], generator=g),
                                torch.randn(config["pooled_projection_dim"], generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=6, branch_steps=[0, 2], group_size=3, height=32, width=32)
    result = {"diff": [], "collectives_sharded": [], "collectives_gathered": [], "copy_version": []}
    for _ in range(2):
        sharded, calls_sharded = rollout(engine, embedding, cfg, "sharded")
        gathered, calls_gathered = rollout(engine, embedding, cfg, "gathered")
        diff = max((getattr(sharded, f) - getattr(gathered, f)).abs().max().item()
                   for f in ("anchor_latents", "next_latents", "old_log_probs", "completions"))
        result["diff"].append(all_reduce(torch.tensor(diff), "max").item())
        result["collectives_sharded"].append(calls_sharded)
        result["collectives_gathered"].append(calls_gathered)
        replica = getattr(engine, "replica", None)  # ZeRO-3's copy (DeepSpeed's collectives are not counted here)
        result["copy_version"].append(replica.version if replica is not None else None)
        with engine.autocast():
            loss = policy_log_probs(engine.module, embedding, sharded, 0, cfg).mean()
        engine.backward(loss)
        engine.step()
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])

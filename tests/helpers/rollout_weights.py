"""torchrun helper for tests/test_rollout_weights.py: rollouts on the gathered copy == through the sharded wrapper.

    torchrun --nproc_per_node=2 tests/helpers/rollout_weights.py FLUX_DIR KIND COMPILE OUT_JSON

Rolls out one group per rank through ``engine.module`` (re-gathering per forward) and through
``engine.rollout_policy()`` (compiled if COMPILE is 1), takes one optimiser step, and does it again;
rank 0 writes the largest differences over both ranks, and the copy's version after each refresh.
"""

import json
import sys

import torch

from g2rpo.config import EngineConfig, OptimConfig, SamplingConfig
from g2rpo.distributed import PolicyEngine, all_reduce, init_distributed, teardown
from g2rpo.models import load_transformer
from g2rpo.rollout import PromptEmbedding, policy_log_probs, singular_sde_rollout


def rollout_difference(engine, embedding, cfg):
    with engine.autocast():
        sharded = singular_sde_rollout(engine.module, embedding, cfg, torch.Generator().manual_seed(1))
    with engine.rollout_policy() as policy:
        gathered = singular_sde_rollout(policy, embedding, cfg, torch.Generator().manual_seed(1))
    diff = max((getattr(sharded, f) - getattr(gathered, f)).abs().max().item()
               for f in ("anchor_latents", "next_latents", "old_log_probs", "completions"))
    return all_reduce(torch.tensor(diff), "max").item(), sharded


def main(flux_dir, kind, compile_rollout, out):
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = load_transformer(flux_dir, subfolder="transformer")
    engine_cfg = EngineConfig(kind=kind, zero_stage=3, device="cpu", compile_rollout=compile_rollout == "1")
    engine = PolicyEngine(model, engine_cfg, OptimConfig(lr=1e-2), 4, info)
    g = torch.Generator().manual_seed(100 + info.rank)  # a different prompt per rank
    config = engine.replica.module.config
    embedding = PromptEmbedding(torch.randn(8, config.joint_attention_dim, generator=g),
                                torch.randn(config.pooled_projection_dim, generator=g), torch.zeros(8, 3))
    cfg = SamplingConfig(num_steps=6, branch_steps=[0, 2], group_size=3, height=32, width=32)
    result = {"diff": [], "version": []}
    for _ in range(2):
        diff, rollout = rollout_difference(engine, embedding, cfg)
        result["diff"].append(diff)
        result["version"].append(engine.replica.version)
        with engine.autocast():
            loss = policy_log_probs(engine.module, embedding, rollout, 0, cfg).mean()
        engine.backward(loss)
        engine.step()
    if info.is_main:
        with open(out, "w") as f:
            json.dump(result, f)
    teardown(0)


if __name__ == "__main__":
    main(*sys.argv[1:])

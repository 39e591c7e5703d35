"""Benchmark one G2RPO step's phases in the reference order and in ours, on the same model and noise.

    python scripts/benchmark/bench_rollout.py                 # tiny model on CPU (builds ckpt/tiny if missing)
    python scripts/benchmark/bench_rollout.py --smoke         # tiny, small grid, one iteration (CI: in process)
    python scripts/benchmark/bench_rollout.py --device cuda   # true-size FLUX.1-dev transformer, random bf16 weights
    python scripts/benchmark/bench_rollout.py --compile       # plus our order on the torch.compiled transformer
    python scripts/benchmark/bench_rollout.py --device cuda --branch-steps 0 1 --compile --json rollout.json
    python scripts/benchmark/bench_rollout.py --model sd3 --device cuda --skip-reference   # SD3.5-Medium, 512^2

Phases: rollout (singular-SDE sampling with multi-granularity completions), decode (VAE) and reward
(HPS-v2.1) of every completion, and the update's forwards/backwards. "reference" = the reference
recipe's order (per generation, batch 1, nothing shared; one image decoded and scored at a time);
"ours" = the default (shared evaluations, batched completions, batched decode and scoring). Both
runs use the same generator seed and are checked to agree. Prints a markdown table with transformer
calls, sample-forwards, VAE decodes, reward calls, wall time per phase, peak memory and the ratio;
on CUDA also achieved TFLOP/s and MFU against --peak-tflops. ``--branch-steps`` samples fewer branching steps
than the recipe's K = 0..7 (the rest of the recipe unchanged), for a GPU lease too short for the whole step;
``--json`` rewrites its file after every row, so a run cut short keeps the rows it finished. On CUDA the update
uses activation checkpointing, as the trainer's engine does. ``--model sd3``: the same step on SD3 (the tiny SD3
pipeline on CPU; SD3.5-Medium's true-size transformer with random bf16 weights on CUDA) at the SD3.5-M recipes'
sampling -- 512x512, T = 10 on the scheduler's grid, classifier-free guidance 4.5 (two rows per sample in every
forward), sigma*1000 unrounded -- with G2RPO's K = 0..7, G = {1, 2}, N = 12.
"""

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import torch

from g2rpo.config import ModelsConfig, SamplingConfig, load_config
from g2rpo.models.flux import PromptEmbedding
from g2rpo.rollout import policy_log_probs, singular_sde_rollout
from g2rpo.tiny import FLUX_DEV_TRANSFORMER_CONFIG, SD35M_TRANSFORMER_CONFIG

ROOT = Path(__file__).resolve().parents[2]



def transformer_flops(config: dict, image_tokens: int, text_tokens: int = 512) -> float:
    """Forward FLOPs of one sample, counted from the architecture (multiply-add = 2 FLOPs).

    Each token goes through 12·d² matmul weights per block (double blocks: its own stream's qkv 3d²,
    out d², MLP 8d²; single blocks: qkv 3d², MLP-in 4d², fused out 5d²), plus attention 4·L²·d per
    block, the embedders/projection per token and the adaLN modulation per sample. Note that
    "2·params·tokens" would double-count FLUX's dual-stream blocks (a token uses one stream's weights):
    for FLUX.1-dev it is ~1.85x this count. tests/test_benchmark.py checks this against
    torch.utils.flop_counter on a small FLUX.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = image_tokens + text_tokens
    single = config.get("num_single_layers", 0)  # SD3: joint blocks only
    blocks = config["num_layers"] + single
    per_token = 2 * 12 * d * d * blocks * tokens
    attention = 4 * tokens * tokens * d * blocks
    dual = len(config.get("dual_attention_layers") or ())  # SD3.5's MMDiT-X: a second attention over the image
    per_token += 2 * 4 * d * d * dual * image_tokens
    attention += 4 * image_tokens * image_tokens * d * dual
    if not single:  # SD3: the last joint block's text stream ends after attention (no out projection, no MLP)
        per_token -= 2 * 9 * d * d * text_tokens
    patch_features = config["in_channels"] * config.get("patch_size", 1) ** 2
    embed = 2 * d * (image_tokens * patch_features * 2 + text_tokens * config["joint_attention_dim"])
    modulation = 2 * d * d * (12 * config["num_layers"] + 3 * single + 2)  # adaLN, per sample
    if not single:  # SD3: MMDiT-X blocks modulate 9d (not 6d) for the image; the last block's text stream 2d
        modulation += 2 * d * d * (3 * dual - 4)
    conditioning = 2 * d * (256 + d) * (3 if config.get("guidance_embeds") else 2) \
        + 2 * d * config["pooled_projection_dim"]  # timestep, guidance and pooled-text MLPs
    return per_token + attention + embed + modulation + conditioning


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (tiny model) or cuda (true-size FLUX.1-dev, random weights)")
    p.add_argument("--smoke", action="store_true", help="tiny grid, one iteration: checks the script runs and agrees")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--height", type=int, default=None, help="default: 64 on CPU, 720 on CUDA")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    p.add_argument("--skip-reference", action="store_true", help="time only our order")
    p.add_argument("--compile", action="store_true", help="also time our order with the transformer torch.compiled "
                   "(engine.compile_rollout); its first iteration compiles and is not reported")
    p.add_argument("--branch-steps", type=int, nargs="+", default=None,
                   help="branching steps to sample (default: the recipe's 0..7; --smoke: 0 1 2)")
    p.add_argument("--json", default=None, help="write the rows here, rewritten after each one")
    p.add_argument("--model", choices=("flux", "sd3"), default="flux",
                   help="flux (FLUX.1-dev / the tiny FLUX) or sd3 (SD3.5-Medium / the tiny SD3)")
    return p.parse_args(argv)


def build(device: str, cfg: SamplingConfig, model: str = "flux"):
    """(transformer, vae, reward, embedding, dtype) for the benchmark."""
    from g2rpo.models import load_transformer, load_vae
    from g2rpo.reward_registry import build_reward

    if model == "sd3":
        return build_sd3(device)

    if device == "cpu":
        from g2rpo.data import read_prompt_file
        from g2rpo.models.flux import load_flux_pipeline
        from g2rpo.tiny import prepare_tiny_checkpoints

        prepare_tiny_checkpoints(ROOT / "ckpt/tiny", read_prompt_file(ROOT / "data/example_prompts.txt"))
        models = load_config(ModelsConfig, ROOT / "configs/models/tiny.yaml",
                             [f"{k}={ROOT / v}" for k, v in (("base.path", "ckpt/tiny/flux"),
                                                             ("hps.base_dir", "ckpt/tiny/hps/open_clip_base"),
                                                             ("hps.checkpoint", "ckpt/tiny/hps/HPS_v2.1_compressed.pt"))])
        pipe = load_flux_pipeline(models.base.path)
        with torch.no_grad():
            embeds, pooled, ids = pipe.encode_prompt("A red fox curled up asleep in fresh snow", None)
        embedding = PromptEmbedding.from_batched(embeds, pooled, ids)
        transformer = load_transformer(models.base.path, subfolder="transformer").eval()
        return transformer, load_vae(models.base.path), build_reward("hps", models), embedding, torch.float32
    from diffusers import FluxTransformer2DModel

    from g2rpo.models import default_dtype

    torch.manual_seed(0)
    with torch.device("cuda"), default_dtype(torch.bfloat16):  # never an fp32 copy (47.6 GB) on the GPU
        transformer = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER_CONFIG).eval()
    transformer.enable_gradient_checkpointing()  # the engine's activation checkpointing (training forwards only)
    embedding = PromptEmbedding(torch.randn(512, 4096, device="cuda"), torch.randn(768, device="cuda"),
                                torch.zeros(512, 3, device="cuda"))
    return transformer, None, None, embedding, torch.bfloat16


def build_sd3(device: str):
    from g2rpo.models import load_transformer, load_vae
    from g2rpo.models.sd3 import FAMILY, SD3Embedding
    from g2rpo.reward_registry import build_reward

    if device == "cpu":
        from g2rpo.data import read_prompt_file
        from g2rpo.tiny import prepare_tiny_checkpoints

        prepare_tiny_checkpoints(ROOT / "ckpt/tiny", read_prompt_file(ROOT / "data/example_prompts.txt"),
                                 only=("sd3", "hps", "clip_score"))
        models = load_config(ModelsConfig, ROOT / "configs/models/tiny_sd3.yaml",
                             [f"{k}={ROOT / v}" for k, v in (("base.path", "ckpt/tiny/sd3"),
                                                             ("hps.base_dir", "ckpt/tiny/hps/open_clip_base"),
                                                             ("hps.checkpoint", "ckpt/tiny/hps/HPS_v2.1_compressed.pt"))])
        pipe = FAMILY.load_pipeline(models.base.path)
        with torch.no_grad():
            prompt, negative = (FAMILY.encode(pipe, [text], "cpu", 16)[0] for text in
                                ("A red fox curled up asleep in fresh snow", ""))
        transformer = load_transformer(models.base.path, subfolder="transformer").eval()
        return (transformer, load_vae(models.base.path), build_reward("hps", models),
                FAMILY.conditioning(prompt, negative), torch.float32)
    from diffusers import SD3Transformer2DModel

    from g2rpo.models import default_dtype

    torch.manual_seed(0)
    with torch.device("cuda"), default_dtype(torch.bfloat16):
        transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER_CONFIG).eval()
    transformer.enable_gradient_checkpointing()
    text = 77 + FAMILY.max_sequence_length  # CLIP-L/G's 77 positions + T5's 128
    embedding = SD3Embedding(torch.randn(text, 4096, device="cuda"), torch.randn(2048, device="cuda"),
                             torch.randn(text, 4096, device="cuda"), torch.randn(2048, device="cuda"))
    return transformer, None, None, embedding, torch.bfloat16


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_order(order, transformer, vae, reward, embedding, cfg, dtype, device, decode_batch, policy=None):
    cfg = dataclasses.replace(cfg, order=order)
    policy = transformer if policy is None else policy
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype) if device == "cuda" else torch.autocast("cpu", enabled=False):
        result, t_rollout = timed(lambda: singular_sde_rollout(policy, embedding, cfg, torch.Generator().manual_seed(0),
                                                               device=device), device)
    row = {"order": order if policy is transformer else f"{order}+compiled", "calls": result.num_calls,
           "sample_forwards": result.num_sample_forwards, "rollout_s": t_rollout}
    latents = result.completions.flatten(0, 2)
    if vae is not None:
        batch = decode_batch if order == "shared" else 1
        images, row["decode_s"] = timed(lambda: embedding.family.decode(vae, latents, cfg.height, cfg.width, batch),
                                        device)
        prompts = ["A red fox curled up asleep in fresh snow"] * len(images)
        reward.batch_size = decode_batch if order == "shared" else 1
        _, row["reward_s"] = timed(lambda: reward.score(images, prompts), device)
        row["decodes"] = len(images)
        row["reward_calls"] = -(-len(images) // reward.batch_size)

    def update():
        for ki in range(len(cfg.branch_steps)):
            policy_log_probs(transformer, embedding, result, ki, cfg).mean().backward()

    transformer.train()
    _, row["update_s"] = timed(update, device)
    transformer.zero_grad(set_to_none=True)
    transformer.eval()
    row["peak_mem_gb"] = (torch.cuda.max_memory_allocated() if device == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return row, result


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    if args.smoke:
        cfg = SamplingConfig(num_steps=8, branch_steps=args.branch_steps or [0, 1, 2], group_size=4, height=32, width=32)
    else:
        height = args.height or (64 if device == "cpu" else 512 if args.model == "sd3" else 720)
        cfg = SamplingConfig(height=height, width=height)  # the reference: T=16, K=0..7, G={1,2}, N=12
        if args.branch_steps:
            cfg = dataclasses.replace(cfg, branch_steps=args.branch_steps)
    if args.model == "sd3":  # the SD3.5-M recipes' sampling
        cfg = dataclasses.replace(cfg, num_steps=10 if not args.smoke else cfg.num_steps, guidance=4.5,
                                  grid="scheduler", timestep="exact")
    transformer, vae, reward, embedding, dtype = build(device, cfg, args.model)
    tokens = (cfg.height // 16) * (cfg.width // 16)
    config = dict(transformer.config)
    text_tokens = embedding.prompt_embeds.shape[0]
    rows_per_sample = embedding.family.rows_per_sample(cfg.guidance)  # 2 under classifier-free guidance
    flops = transformer_flops(config, tokens, text_tokens) * rows_per_sample
    params = sum(p.numel() for p in transformer.parameters())
    report = {"device": device, "model": args.model, "rows_per_sample": rows_per_sample,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "height": cfg.height, "width": cfg.width, "image_tokens": tokens, "num_steps": cfg.num_steps,
              "branch_steps": cfg.branch_steps, "granularities": cfg.granularities, "group_size": cfg.group_size,
              "params": params, "forward_tflop_per_sample": flops / 1e12, "peak_tflops": args.peak_tflops,
              "rows": {}, "agree": {}}

    def record(name, row):
        if device == "cuda":
            row["rollout_TFLOP/s"] = row["sample_forwards"] * flops / row["rollout_s"] / 1e12
            row["MFU"] = row["rollout_TFLOP/s"] / args.peak_tflops
        report["rows"][name] = row
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))

    orders = ["shared"] if args.skip_reference else ["reference", "shared"]
    rows, results = {}, {}
    for order in orders:
        for _ in range(args.iters):  # keep the last iteration (the first warms up allocators and kernels)
            rows[order], results[order] = run_order(order, transformer, vae, reward, embedding, cfg, dtype, device, 16)
        record(order, rows[order])
    if args.compile:
        compiled = torch.compile(transformer)
        for i in range(max(2, args.iters)):
            rows["compiled"], results["compiled"] = run_order("shared", transformer, vae, reward, embedding, cfg, dtype,
                                                              device, 16, policy=compiled)
            if i == 0:
                report["compiled_first_iteration_rollout_s"] = rows["compiled"]["rollout_s"]  # includes compiling
        record("compiled", rows["compiled"])
    others = [name for name in rows if name != "reference"] if "reference" in rows else []
    for name in others:
        diff = (results["reference"].completions - results[name].completions).abs().max().item()
        report["agree"][name] = diff
        record(name, rows[name])
        assert diff < (1e-4 if device == "cpu" else 5e-2), f"{name} disagrees: max |Δ completions| = {diff}"
        print(f"reference and {rows[name]['order']} completions agree: max |Δ| = {diff:.2e}")
    columns = ["order", "calls", "sample_forwards", "decodes", "reward_calls", "rollout_s", "decode_s", "reward_s",
               "update_s", "peak_mem_gb"]
    if device == "cuda":
        columns += ["rollout_TFLOP/s", "MFU"]
    print(f"\n{device}, {cfg.height}x{cfg.width} ({tokens} image tokens), T={cfg.num_steps}, K={cfg.branch_steps}, "
          f"G={cfg.granularities}, N={cfg.group_size}, {params:,} params\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows.values():
        print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
                                for c in columns) + " |")
    for name in others:
        ratio = {k: rows["reference"][k] / rows[name][k]
                 for k in ("rollout_s", "decode_s", "reward_s") if k in rows[name]}
        print(f"\nreference / {rows[name]['order']}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

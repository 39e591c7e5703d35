"""Encode a prompt file once with the FLUX pipeline's text encoders; training reads only the results.

Only the text encoders and tokenizers are loaded (not the transformer or the VAE).

    torchrun --nproc_per_node=8 -m g2rpo.preprocess --model ckpt/flux --prompts data/prompts.txt \
        --out data/rl_embeddings
    python -m g2rpo.preprocess --model ckpt/tiny/flux --prompts data/example_prompts.txt --out data/tiny_embeddings

Writes ``<out>/embeddings/NNNNN.safetensors`` (``prompt_embeds [512, D]``, ``pooled_prompt_embeds [P]``,
``text_ids [512, 3]``, caption in the metadata) and ``<out>/index.jsonl`` in prompt-file order.
Prompts are sharded across ranks (prompt i on rank i mod world). Resumable: a prompt whose file
already exists is skipped. The prompt file is validated (empty, blank lines, non-UTF-8 are errors;
duplicates are reported and kept), and every written embedding's shapes are checked.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from g2rpo.data import read_prompt_file, validate_embedding, write_embedding
from g2rpo.io import atomic_write_text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("ckpt/flux"), help="diffusers FLUX pipeline folder")
    p.add_argument("--prompts", type=Path, required=True, help="UTF-8 prompt file, one per line")
    p.add_argument("--out", type=Path, required=True, help="output folder (embeddings/ and index.jsonl)")
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    p.add_argument("--dtype", default="bfloat16", help="text-encoder and stored dtype: float32 | bfloat16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def duplicate_report(prompts: list[str]) -> dict[str, list[int]]:
    lines = defaultdict(list)
    for number, prompt in enumerate(prompts, start=1):
        lines[prompt].append(number)
    return {prompt: numbers for prompt, numbers in lines.items() if len(numbers) > 1}


def main(argv=None) -> None:
    from g2rpo.distributed import barrier, init_distributed, print0, teardown
    from g2rpo.models import load_text_encoders, resolve_dtype

    args = parse_args(argv)
    prompts = read_prompt_file(args.prompts)
    for prompt, numbers in duplicate_report(prompts).items():
        print0(f"warning: {args.prompts}: lines {numbers} repeat the prompt {prompt[:60]!r} (kept)")
    info = init_distributed(args.device)
    dtype = resolve_dtype(args.dtype)
    folder = args.out / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(len(prompts)) if i % info.world_size == info.rank]
    todo = [i for i in mine if not (folder / f"{i:05d}.safetensors").is_file()]
    print(f"{len(prompts)} prompts, {info.world_size} rank(s); rank {info.rank} encodes {len(todo)} of its {len(mine)}")
    if todo:
        pipe = load_text_encoders(args.model, dtype).to(info.device)
        with torch.no_grad():
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                embeds, pooled, text_ids = pipe.encode_prompt([prompts[i] for i in batch], None, device=info.device,
                                                              max_sequence_length=args.max_sequence_length)
                for row, i in enumerate(batch):
                    tensors = {"prompt_embeds": embeds[row].cpu(), "pooled_prompt_embeds": pooled[row].cpu(),
                               "text_ids": text_ids.cpu()}
                    validate_embedding(tensors, f"prompt {i + 1} of {args.prompts}")
                    if tensors["prompt_embeds"].shape[0] != args.max_sequence_length:
                        raise ValueError(f"prompt {i + 1}: expected {args.max_sequence_length} T5 positions, got "
                                         f"{tensors['prompt_embeds'].shape[0]}")
                    write_embedding(folder / f"{i:05d}.safetensors", caption=prompts[i], **tensors)
    barrier()
    if info.is_main:
        lines = [json.dumps({"index": i, "caption": p, "file": f"embeddings/{i:05d}.safetensors"})
                 for i, p in enumerate(prompts)]
        missing = [i for i in range(len(prompts)) if not (folder / f"{i:05d}.safetensors").is_file()]
        if missing:
            raise RuntimeError(f"embeddings missing for prompts {missing[:10]}... after all ranks finished")
        atomic_write_text(args.out / "index.jsonl", "\n".join(lines) + "\n")
        print0(f"wrote {args.out / 'index.jsonl'} ({len(lines)} prompts)")
    teardown(0)


if __name__ == "__main__":
    main()

"""Encode a prompt file once with the base model's text encoders; training reads only the results.

Only the text encoders and tokenizers are loaded (not the transformer or the VAE); the pipeline folder's family
(g2rpo.models) decides the encoders and the file layout.

    torchrun --nproc_per_node=8 -m g2rpo.preprocess --model ckpt/flux --prompts data/prompts.txt \
        --out data/rl_embeddings
    python -m g2rpo.preprocess --model ckpt/tiny/flux --prompts data/example_prompts.txt --out data/tiny_embeddings

Writes ``<out>/embeddings/NNNNN.safetensors`` (FLUX: ``prompt_embeds [512, D]``, ``pooled_prompt_embeds [P]``,
``text_ids [512, 3]``; SD3: ``prompt_embeds [77 + L, D]``, ``pooled_prompt_embeds [P]``; the caption in the
metadata) and ``<out>/index.jsonl`` in prompt-file order; a family with classifier-free guidance also the empty
prompt's as ``<out>/negative.safetensors``.
Prompts are sharded across ranks (prompt i on rank i mod world). The prompt file is validated
(empty, blank lines, non-UTF-8 are errors; duplicates are reported and kept), and every written
embedding's shapes are checked.

``<out>/fingerprint.json`` records what the embeddings are made from (SHA-256 of the prompt file,
the text encoders' and tokenizers' identity, ``--max-sequence-length``, ``--dtype``); it is written
before the first embedding. A run whose inputs match resumes: a prompt whose file already exists
(and whose stored caption is that prompt) is skipped. A run whose inputs differ is refused, naming
what changed; ``--overwrite`` deletes the old embeddings, index and fingerprint first.

Prompts longer than CLIP's 77 tokens or T5's ``--max-sequence-length`` (default: the family's, FLUX 512, SD3 128
as Flow-GRPO trains it) are truncated, as the reference pipeline does; one summary line per encoder reports how
many and the longest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from g2rpo.data import NEGATIVE, read_prompt_file, validate_embedding, write_embedding
from g2rpo.fingerprint import FINGERPRINT, StaleOutputsError, check_reuse, read_fingerprint, sha256_file, \
    weights_identity, write_fingerprint
from g2rpo.io import atomic_write_text

INDEX = "index.jsonl"
EMBEDDINGS = "embeddings"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("ckpt/flux"), help="diffusers pipeline folder (FLUX, SD3)")
    p.add_argument("--prompts", type=Path, required=True, help="UTF-8 prompt file, one per line")
    p.add_argument("--out", type=Path, required=True, help="output folder (embeddings/ and index.jsonl)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default: the family's; FLUX.1-dev 512, SD3 128)")
    p.add_argument("--dtype", default="bfloat16", help="text-encoder and stored dtype: float32 | bfloat16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--overwrite", action="store_true",
                   help="delete <out>/embeddings, <out>/index.jsonl and <out>/fingerprint.json first (needed when "
                        "<out> holds embeddings made from another prompt file, model, length or dtype)")
    return p.parse_args(argv)


def duplicate_report(prompts: list[str]) -> dict[str, list[int]]:
    lines = defaultdict(list)
    for number, prompt in enumerate(prompts, start=1):
        lines[prompt].append(number)
    return {prompt: numbers for prompt, numbers in lines.items() if len(numbers) > 1}


# --------------------------------------------------------------------------------------------
# What the output folder was made from
# --------------------------------------------------------------------------------------------


def expected_fingerprint(model: Path, prompt_file: Path, max_sequence_length: int, dtype: torch.dtype,
                         family=None) -> dict:
    """The inputs that decide the embeddings: prompt bytes, text encoders and tokenizers (the family's
    ``text_parts``), length, dtype, and -- for every family but FLUX, whose folders predate the field -- the family."""
    from g2rpo.models import family_of

    family = family or family_of(model)
    identity = {"prompt_file": {"sha256": sha256_file(prompt_file)},
                "text_encoders": {part: weights_identity(model / part) for part in family.text_parts},
                "max_sequence_length": max_sequence_length,
                "dtype": str(dtype).removeprefix("torch.")}
    if family.kind != "flux":
        identity["family"] = family.kind
    return identity


def outputs_present(out: Path) -> bool:
    """True when ``out`` holds an embedding file or an index (a fingerprint alone describes nothing)."""
    return (out / INDEX).is_file() or any((out / EMBEDDINGS).glob("*.safetensors"))


def remove_outputs(out: Path) -> list[str]:
    """Delete ``<out>/embeddings``, ``<out>/index.jsonl`` and the fingerprint; returns what was removed."""
    removed = []
    if (out / EMBEDDINGS).exists():
        shutil.rmtree(out / EMBEDDINGS)
        removed.append(f"{EMBEDDINGS}/")
    for name in (INDEX, FINGERPRINT, NEGATIVE):
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    return removed


def claim_output_folder(out: Path, expected: dict, overwrite: bool) -> str:
    """Make ``out`` hold embeddings of ``expected`` (rank 0 only); returns a line saying what was done.

    Raises `StaleOutputsError` when ``out`` holds outputs made from other inputs (or of unknown
    origin) and ``overwrite`` is off. The fingerprint is written before any embedding, so a run that
    is interrupted and started again with the same inputs matches it and resumes.
    """
    removed = remove_outputs(out) if overwrite else []
    if outputs_present(out):  # without outputs, a left-over fingerprint describes nothing and is replaced
        try:
            check_reuse(out, expected, "prompt embeddings", "--overwrite", has_outputs=True)
        except StaleOutputsError as exc:
            raise StaleOutputsError(f"{exc} (a new folder: --out; with scripts/preprocess/"
                                    f"preprocess_flux_rl_embeddings.sh: OUT=<new folder> or OVERWRITE=1)") from None
    (out / EMBEDDINGS).mkdir(parents=True, exist_ok=True)
    if read_fingerprint(out) != expected:
        write_fingerprint(out, expected)
    return f"--overwrite: removed {', '.join(removed)} from {out}" if removed else ""


def agree_on_output_folder(args, dtype: torch.dtype, is_main: bool) -> None:
    """Rank 0 checks (and with --overwrite clears) the output folder; an error there is raised on every
    rank (`g2rpo.distributed.agreed`), so none waits in a later collective."""
    from g2rpo.distributed import agreed, print0

    note = agreed(lambda: claim_output_folder(args.out, expected_fingerprint(args.model, args.prompts,
                                                                            args.max_sequence_length, dtype,
                                                                            args.family),
                                              args.overwrite) if is_main else "")
    if note:
        print0(note)


def stored_caption_problem(folder: Path, prompts: list[str], indices: list[int], prompt_file: Path) -> str | None:
    """The first existing embedding file among ``indices`` whose stored caption is not its prompt, as a
    message naming the file and the prompt-file line (None when all match). Reads only the headers."""
    from safetensors import safe_open

    for i in indices:
        path = folder / f"{i:05d}.safetensors"
        if not path.is_file():
            continue
        try:
            with safe_open(path, framework="pt") as f:
                caption = (f.metadata() or {}).get("caption")
        except Exception as exc:  # noqa: BLE001 -- any unreadable header is reported by name
            return f"{path}: cannot read its header ({exc}); delete the file to have it encoded again"
        if caption != prompts[i]:
            stored = "no caption" if caption is None else f"the caption {caption[:60]!r}"
            return (f"{path}: holds {stored}, but line {i + 1} of {prompt_file} is {prompts[i][:60]!r}; the file "
                    f"was not made from this prompt file: pass --overwrite (or delete the file)")
    return None


# --------------------------------------------------------------------------------------------
# Prompts longer than the encoders take
# --------------------------------------------------------------------------------------------


def token_counts(tokenizer, prompts: list[str], chunk: int = 1024) -> list[int]:
    """Tokens per prompt, special tokens included, untruncated; batched, without the library's warning."""
    counts = []
    for start in range(0, len(prompts), chunk):
        ids = tokenizer(prompts[start:start + chunk], padding=False, truncation=False, verbose=False,
                        return_attention_mask=False)["input_ids"]
        counts.extend(len(row) for row in ids)
    return counts


def overlong(counts: list[int], lines: list[int], limit: int) -> dict:
    """``{"limit", "count", "longest": [tokens, line] | None}`` over prompts with more than ``limit`` tokens."""
    over = [(tokens, line) for tokens, line in zip(counts, lines) if tokens > limit]
    longest = max(over, key=lambda item: (item[0], -item[1])) if over else None
    return {"limit": limit, "count": len(over), "longest": list(longest) if longest else None}


def truncation_stats(pipe, prompts: list[str], indices: list[int], max_sequence_length: int, family) -> dict:
    """Per encoder of the family (FLUX: CLIP, T5), the prompts among ``indices`` that it truncates."""
    texts, lines = [prompts[i] for i in indices], [i + 1 for i in indices]
    return {name: overlong(token_counts(tokenizer, texts), lines, limit or max_sequence_length)
            for name, (tokenizer, limit) in family.token_counters(pipe).items()}


def merge_truncation_stats(parts: list[dict]) -> dict:
    """The ranks' `truncation_stats` as one: counts added, the longest prompt kept (ties: first line)."""
    def rank(longest):  # more tokens first, then the earlier line
        return (-1, 0) if longest is None else (longest[0], -longest[1])

    merged = {}
    for part in parts:
        for encoder, stats in part.items():
            into = merged.setdefault(encoder, {"limit": stats["limit"], "count": 0, "longest": None})
            into["count"] += stats["count"]
            into["longest"] = max(into["longest"], stats["longest"], key=rank)
    return merged


def truncation_report(merged: dict, prompt_file: Path, title: str) -> list[str]:
    """One warning line per encoder that truncates any prompt."""
    lines = []
    for encoder, stats in merged.items():
        if stats["count"]:
            tokens, line = stats["longest"]
            lines.append(f"warning: {prompt_file}: {stats['count']} prompt(s) longer than {encoder}'s {stats['limit']} "
                         f"tokens (longest: line {line}, {tokens} tokens); they are truncated to {stats['limit']} "
                         f"tokens, as the reference {title} pipeline does")
    return lines


@contextlib.contextmanager
def library_truncation_warnings_silenced(pipe):
    """Mute the pipeline's and the tokenizers' own per-prompt truncation warnings (our summary replaces them)."""
    loggers = [logging.getLogger(type(pipe).__module__), logging.getLogger("transformers.tokenization_utils_base")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def encode(pipe, prompts: list[str], todo: list[int], folder: Path, args, device) -> None:
    """Encode the prompts ``todo`` in batches and write each one's checked embedding file."""
    family = args.family
    with torch.no_grad(), library_truncation_warnings_silenced(pipe):
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            encoded = family.encode(pipe, [prompts[i] for i in batch], device, args.max_sequence_length)
            for tensors, i in zip(encoded, batch):
                validate_embedding(tensors, f"prompt {i + 1} of {args.prompts}", family=family)
                positions = family.sequence_length(args.max_sequence_length)
                if tensors["prompt_embeds"].shape[0] != positions:
                    raise ValueError(f"prompt {i + 1}: expected {positions} text positions, got "
                                     f"{tensors['prompt_embeds'].shape[0]}")
                write_embedding(folder / f"{i:05d}.safetensors", caption=prompts[i], **tensors)


def write_negative(pipe, out: Path, args, device) -> None:
    """The empty prompt's conditioning (``negative.safetensors``), for a family with classifier-free guidance."""
    with torch.no_grad():
        tensors = args.family.encode(pipe, [""], device, args.max_sequence_length)[0]
    validate_embedding(tensors, "the empty (negative) prompt", family=args.family)
    write_embedding(out / NEGATIVE, caption="", **tensors)


def run(argv=None) -> dict:
    """The whole job, callable in-process (the CLI adds the process teardown).

    Returns ``{"prompts": N, "encoded": this rank's newly encoded prompts, "reused": its kept files}``.
    """
    from g2rpo.distributed import all_gather_object, barrier, init_distributed, print0
    from g2rpo.models import family_of, resolve_dtype

    args = parse_args(argv)
    prompts = read_prompt_file(args.prompts)
    if not (args.model / "model_index.json").is_file():
        raise FileNotFoundError(f"pipeline not found: {args.model / 'model_index.json'} is missing "
                                f"(--model must be a diffusers pipeline folder, e.g. ckpt/flux)")
    args.family = family_of(args.model)
    if args.max_sequence_length is None:
        args.max_sequence_length = args.family.max_sequence_length
    for prompt, numbers in duplicate_report(prompts).items():
        print0(f"warning: {args.prompts}: lines {numbers} repeat the prompt {prompt[:60]!r} (kept)")
    info = init_distributed(args.device)
    dtype = resolve_dtype(args.dtype)
    agree_on_output_folder(args, dtype, info.is_main)
    folder = args.out / EMBEDDINGS
    mine = [i for i in range(len(prompts)) if i % info.world_size == info.rank]
    problems = all_gather_object(stored_caption_problem(folder, prompts, mine, args.prompts))
    if any(problems):
        raise StaleOutputsError(next(p for p in problems if p))
    todo = [i for i in mine if not (folder / f"{i:05d}.safetensors").is_file()]
    counts = all_gather_object((len(todo), len(mine)))
    print0(f"{len(prompts)} prompts, {info.world_size} rank(s): " + ", ".join(
        f"rank {r} encodes {todo_r} of its {mine_r}" for r, (todo_r, mine_r) in enumerate(counts)))
    negative = args.family.negative and info.is_main and not (args.out / NEGATIVE).is_file()
    pipe = args.family.load_text_encoders(args.model, dtype).to(info.device) if todo or negative else None
    stats = truncation_stats(pipe, prompts, todo, args.max_sequence_length, args.family) if todo else {}
    for line in truncation_report(merge_truncation_stats(all_gather_object(stats)), args.prompts, args.family.title):
        print0(line)
    if todo:
        encode(pipe, prompts, todo, folder, args, info.device)
    if negative:
        write_negative(pipe, args.out, args, info.device)
    barrier()
    if info.is_main:
        lines = [json.dumps({"index": i, "caption": p, "file": f"{EMBEDDINGS}/{i:05d}.safetensors"})
                 for i, p in enumerate(prompts)]
        missing = [i for i in range(len(prompts)) if not (folder / f"{i:05d}.safetensors").is_file()]
        if missing:
            raise RuntimeError(f"embeddings missing for prompts {missing[:10]}... after all ranks finished")
        atomic_write_text(args.out / INDEX, "\n".join(lines) + "\n")
        print0(f"wrote {args.out / INDEX} ({len(lines)} prompts)")
    return {"prompts": len(prompts), "encoded": len(todo), "reused": len(mine) - len(todo)}


def main(argv=None) -> None:
    from g2rpo.distributed import teardown

    run(argv)
    teardown(0)


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)

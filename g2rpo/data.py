"""Prompt files and (later) the embedding dataset.

A prompt file is UTF-8 text with one prompt per line. Blank lines are an error, not skipped: in a
prompt file they are almost always a mistake that would silently shift every index after them.
"""

from __future__ import annotations

from pathlib import Path


def read_prompt_file(path: str | Path) -> list[str]:
    """Read one prompt per line; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # tolerate a byte-order mark
    lines = text.splitlines()
    if not lines:
        raise ValueError(f"{path}: the prompt file is empty; expected one prompt per line")
    prompts = []
    for number, line in enumerate(lines, start=1):
        prompt = line.strip()
        if not prompt:
            raise ValueError(f"{path}:{number}: blank line; expected one prompt per line (remove the empty line)")
        prompts.append(prompt)
    return prompts


# --------------------------------------------------------------------------------------------
# Embedding files and their index
# --------------------------------------------------------------------------------------------

EMBEDDING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "text_ids")


def write_embedding(path: str | Path, prompt_embeds, pooled_prompt_embeds, text_ids, caption: str) -> None:
    """One prompt's conditioning as safetensors (``[S, D]``, ``[P]``, ``[S, 3]``), written atomically."""
    from g2rpo.io import save_safetensors

    save_safetensors({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                      "text_ids": text_ids}, path, metadata={"caption": caption})


def _check_layout(shapes: dict, floats: dict, where: str, dims: tuple[int, int] | None) -> None:
    """Keys, ranks, matching lengths, floating dtypes and (optionally) the model's dims of one embedding
    file, from its tensors' shapes (``{key: shape}``) and whether each is floating point."""
    missing = [k for k in EMBEDDING_KEYS if k not in shapes]
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing)}; expected {', '.join(EMBEDDING_KEYS)}")
    embeds, pooled, ids = (tuple(shapes[k]) for k in EMBEDDING_KEYS)
    if len(embeds) != 2 or len(pooled) != 1 or len(ids) != 2 or ids != (embeds[0], 3):
        raise ValueError(f"{where}: shapes prompt_embeds {embeds}, pooled_prompt_embeds {pooled}, text_ids {ids}; "
                         f"expected [S, D], [P], [S, 3]")
    if not (floats["prompt_embeds"] and floats["pooled_prompt_embeds"]):
        raise ValueError(f"{where}: embeddings must be floating point")
    if dims is not None and (embeds[1], pooled[0]) != tuple(dims):
        raise ValueError(f"{where}: embedding dims (D={embeds[1]}, P={pooled[0]}) do not match the "
                         f"transformer (joint_attention_dim={dims[0]}, pooled_projection_dim={dims[1]})")


def validate_embedding(tensors: dict, where: str, dims: tuple[int, int] | None = None):
    """Check keys, ranks, matching lengths, finiteness and (optionally) the model's dims; name ``where``."""
    import torch

    _check_layout({k: t.shape for k, t in tensors.items()}, {k: t.is_floating_point() for k, t in tensors.items()},
                  where, dims)
    if not (torch.isfinite(tensors["prompt_embeds"]).all() and torch.isfinite(tensors["pooled_prompt_embeds"]).all()):
        raise ValueError(f"{where}: embeddings contain NaN or inf")


def check_embedding_header(path: str | Path, dims: tuple[int, int] | None = None) -> None:
    """`validate_embedding`'s layout checks from the safetensors header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            floats = {key: s.get_dtype().startswith(("F", "BF")) for key, s in slices.items()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read embedding file ({exc}); re-run the preprocessing step") from None
    _check_layout(shapes, floats, str(path), dims)


class EmbeddingDataset:
    """Prompt embeddings listed in a JSONL index (``{"index", "caption", "file"}`` per line).

    ``file`` is relative to the index's folder. Entries are checked when the index is read (fields,
    files present) and each file when it is loaded (shapes, dtypes, finiteness, model dims).
    """

    def __init__(self, index_path: str | Path, dims: tuple[int, int] | None = None):
        import json

        self.index_path = Path(index_path)
        self.dims = dims
        if not self.index_path.is_file():
            raise FileNotFoundError(f"embedding index not found: {self.index_path} (run the preprocessing step)")
        self.entries = []
        for number, line in enumerate(self.index_path.read_text(encoding="utf-8").splitlines(), start=1):
            where = f"{self.index_path}:{number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("caption"), str) \
                    or not isinstance(entry.get("file"), str):
                raise ValueError(f"{where}: expected an object with string fields 'caption' and 'file'")
            if not (self.index_path.parent / entry["file"]).is_file():
                raise FileNotFoundError(f"{where}: embedding file {self.index_path.parent / entry['file']} is missing")
            self.entries.append(entry)
        if not self.entries:
            raise ValueError(f"{self.index_path}: the index is empty")

    def __len__(self) -> int:
        return len(self.entries)

    def check_files(self, rank: int = 0, world_size: int = 1) -> int:
        """Check every embedding file's header (tensors, shapes, dtypes, model dims) before training
        starts, rather than when the schedule first reaches it; ranks split the files. Returns the count."""
        mine = range(rank, len(self.entries), world_size)
        for i in mine:
            check_embedding_header(self.index_path.parent / self.entries[i]["file"], self.dims)
        return len(mine)

    def split(self, holdout: int) -> tuple["EmbeddingDataset", "EmbeddingDataset | None"]:
        """``(train, heldout)``: the last ``holdout`` entries form the held-out set (None when 0)."""
        if holdout == 0:
            return self, None
        if holdout >= len(self.entries):
            raise ValueError(f"{self.index_path}: data.holdout={holdout} leaves no training prompts "
                             f"(the index has {len(self.entries)})")
        train, held = object.__new__(EmbeddingDataset), object.__new__(EmbeddingDataset)
        for part, entries in ((train, self.entries[:-holdout]), (held, self.entries[-holdout:])):
            part.index_path, part.dims, part.entries = self.index_path, self.dims, entries
        return train, held

    def caption(self, i: int) -> str:
        return self.entries[i]["caption"]

    def __getitem__(self, i: int):
        from safetensors.torch import load_file

        from g2rpo.rollout import PromptEmbedding

        path = self.index_path.parent / self.entries[i]["file"]
        try:
            tensors = load_file(path)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read embedding file ({exc})") from exc
        validate_embedding(tensors, str(path), self.dims)
        return PromptEmbedding(*(tensors[k] for k in EMBEDDING_KEYS)), self.entries[i]["caption"]


class GroupSchedule:
    """Which dataset item each rank's prompt groups use at each step; the same for any world size.

    Positions run through a seeded permutation of the dataset (a new one each epoch). At step ``s``,
    rank ``r`` takes positions ``world·(s·per_rank + j) + r`` for ``j < per_rank``, so one process
    with ``per_rank = 2`` sees the same groups as two ranks with ``per_rank = 1`` (and each group's
    sampling seed is keyed by its position, not by the rank).
    """

    def __init__(self, size: int, world_size: int, per_rank: int, seed: int, shuffle: bool = True):
        self.size, self.world_size, self.per_rank, self.seed, self.shuffle = size, world_size, per_rank, seed, shuffle

    def _order(self, epoch: int):
        import torch

        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def positions(self, step: int, rank: int) -> list[int]:
        return [self.world_size * (step * self.per_rank + j) + rank for j in range(self.per_rank)]

    def item(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return self._order(epoch)[offset]

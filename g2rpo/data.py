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

NEGATIVE = "negative.safetensors"  # the empty prompt's conditioning, beside the index (families with CFG)


def write_embedding(path: str | Path, prompt_embeds=None, pooled_prompt_embeds=None, text_ids=None, caption: str = "",
                    **tensors) -> None:
    """One prompt's conditioning as safetensors (its family's ``embedding_keys``; FLUX: ``[S, D]``, ``[P]``,
    ``[S, 3]``), written atomically."""
    from g2rpo.io import save_safetensors

    named = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds, "text_ids": text_ids}
    save_safetensors({**{k: t for k, t in named.items() if t is not None}, **tensors}, path,
                     metadata={"caption": caption})


def _family(family):
    from g2rpo.models import family as by_kind

    return by_kind("flux") if family is None else family


def _config(dims) -> dict | None:
    """A transformer config (or the ``(joint_attention_dim, pooled_projection_dim)`` pair) as a dict."""
    if dims is None or isinstance(dims, dict):
        return dims
    return {"joint_attention_dim": dims[0], "pooled_projection_dim": dims[1]}


def validate_embedding(tensors: dict, where: str, dims=None, family=None):
    """Check keys, ranks, matching lengths, finiteness and (optionally) the model's widths (``dims``: the
    transformer config, or its ``(joint_attention_dim, pooled_projection_dim)``); name ``where``."""
    import torch

    _family(family).check_layout({k: t.shape for k, t in tensors.items()},
                                 {k: t.is_floating_point() for k, t in tensors.items()}, where, _config(dims))
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise ValueError(f"{where}: embeddings contain NaN or inf")


def check_embedding_header(path: str | Path, dims=None, family=None) -> None:
    """`validate_embedding`'s layout checks from the safetensors header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            floats = {key: s.get_dtype().startswith(("F", "BF")) for key, s in slices.items()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read embedding file ({exc}); re-run the preprocessing step") from None
    _family(family).check_layout(shapes, floats, str(path), _config(dims))


def embeddings_family(index_path: str | Path):
    """The family an embedding folder was made for: its fingerprint's ``family`` (folders of FLUX, the first
    family, have none), or None without a fingerprint."""
    import json

    from g2rpo.models import family

    fingerprint = Path(index_path).parent / "fingerprint.json"
    if not fingerprint.is_file():
        return None
    try:
        kind = json.loads(fingerprint.read_text(encoding="utf-8")).get("family", "flux")
    except ValueError:
        return None
    return family(kind)


class EmbeddingDataset:
    """Prompt embeddings listed in a JSONL index (``{"index", "caption", "file"}`` per line), for one model family
    (``family``; default: the one the folder's fingerprint names, else FLUX).

    ``file`` is relative to the index's folder. Entries are checked when the index is read (fields,
    files present) and each file when it is loaded (shapes, dtypes, finiteness, model widths: ``dims``, the
    transformer config or its ``(joint_attention_dim, pooled_projection_dim)``). A family with classifier-free
    guidance reads the empty prompt's conditioning once, from ``negative.safetensors`` beside the index.
    """

    def __init__(self, index_path: str | Path, dims=None, family=None):
        import json

        self.index_path = Path(index_path)
        self.dims = _config(dims)
        if not self.index_path.is_file():
            raise FileNotFoundError(f"embedding index not found: {self.index_path} (run the preprocessing step)")
        made_for = embeddings_family(self.index_path)
        if family is not None and made_for is not None and made_for is not family:
            raise ValueError(f"{self.index_path.parent}: embeddings of {made_for.title} (models.kind={made_for.kind}), "
                             f"but the base model is {family.title} (models.kind={family.kind}); preprocess the prompts "
                             f"with the base model's pipeline (python -m g2rpo.preprocess --model <its folder>)")
        self.family = _family(family or made_for)
        self._negative = None
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
            check_embedding_header(self.index_path.parent / self.entries[i]["file"], self.dims, self.family)
        if self.family.negative:
            negative = self.index_path.parent / NEGATIVE
            if not negative.is_file():
                raise FileNotFoundError(f"{negative}: missing; {self.family.title} samples with classifier-free "
                                        f"guidance and reads the empty prompt's embedding from it (re-run the "
                                        f"preprocessing step)")
            check_embedding_header(negative, self.dims, self.family)
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
            part.family, part._negative = self.family, self._negative
        return train, held

    def caption(self, i: int) -> str:
        return self.entries[i]["caption"]

    def _load(self, path: Path) -> dict:
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read embedding file ({exc})") from exc
        validate_embedding(tensors, str(path), self.dims, self.family)
        return tensors

    def negative(self) -> dict | None:
        """The empty prompt's tensors (families with classifier-free guidance), read once."""
        if self.family.negative and self._negative is None:
            self._negative = self._load(self.index_path.parent / NEGATIVE)
        return self._negative

    def __getitem__(self, i: int):
        tensors = self._load(self.index_path.parent / self.entries[i]["file"])
        return self.family.conditioning(tensors, self.negative()), self.entries[i]["caption"]


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

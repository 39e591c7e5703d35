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

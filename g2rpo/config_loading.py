"""Strict loading: nested dataclasses from YAML, with dotted command-line overrides.

Unknown keys, wrong types and invalid values raise ``ValueError`` naming the source (the file, or the
command-line override that set the value), the dotted field and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from g2rpo.config_models import ModelsConfig

T = TypeVar("T")


# Fields that moved: (dataclass, old key) -> where it is now (named in the unknown-key error).
RENAMED = {(ModelsConfig, "flux"): "base (models.base.path, models.base.dtype: any model family)"}


def from_dict(cls: type[T], data: Any, where: str = "config", nested: bool = False) -> T:
    """Build dataclass ``cls`` from a mapping; ``where`` prefixes every error: the source (a file), then
    ``: `` and the dotted path of the field (``configs/tiny.yaml: ema.decay``)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of fields, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        renamed = "".join(f" ({old} is now {RENAMED[cls, old]})" for old in unknown if (cls, old) in RENAMED)
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are {', '.join(sorted(fields))}"
                         f"{renamed}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if nested else f"{where}: {name}")
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a field check of the section; its message usually names the field in full
        source, _, section = where.partition(": ")
        text = str(exc)
        raise ValueError(f"{source}: {text}" if section and text.startswith(f"{section}.") else f"{where}: {text}") \
            from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, nested=True)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # PyYAML reads "1e-3" (no dot) as a string; accept what Python reads as a float
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected the form section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus dotted overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if path is not None and isinstance(data, dict) and isinstance(data.get("models"), str):
        data["models"] = _models_file(data["models"], path)
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data, where)
    except ValueError as exc:
        raise ValueError(attribute_error(str(exc), where, overrides or [])) from None


def _models_file(name: str, config: Path) -> dict:
    """``models: configs/models/flux_dev.yaml`` in a training config: that file is its models section, the one
    place that names the weights for training and evaluation alike (``MODELS=`` of run_eval.sh). Relative to the
    working directory, else to the config's folder or the one above it (the repository root)."""
    for candidate in (Path(name), config.parent / name, config.parent.parent / name):
        if candidate.is_file():
            try:
                return yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
            except (UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ValueError(f"{candidate}: not valid YAML ({exc})") from exc
    raise FileNotFoundError(f"{config}: models: {name}: file not found (a models config such as "
                            f"configs/models/flux_dev.yaml)")


def _unknown_keys(text: str) -> list[str]:
    return text.partition(";")[0].removeprefix("unknown key(s) ").split(", ") if text.startswith("unknown key(s) ") \
        else []


def attribute_error(message: str, source: str, overrides: list[str]) -> str:
    """``message`` (``"<source>: <field path>: <what is wrong>"`` or ``"<source>: <what is wrong>"``) with its source
    named as the command-line override where the value came from one: the field path is the overridden key (or
    below it), or the message names an overridden field of its section (``num_steps=1``, ``ema.decay=1.5``, an
    unknown key)."""
    if not message.startswith(f"{source}: ") or not overrides:
        return message
    rest = message[len(source) + 2:]
    path, sep, what = rest.partition(": ")
    path = path.partition("=")[0] if sep and " " not in path else ""  # "ema.decay" of "ema.decay=1.5: ..."
    for override in overrides:
        key = override.partition("=")[0]
        parent, _, leaf = key.rpartition(".")
        if path and (path == key or path.startswith((f"{key}.", f"{key}[")) or (
                parent == path and (what.startswith(f"{leaf}=") or leaf in _unknown_keys(what)))):
            return f"command-line override {override}: {what}"
        if not path and (any(f"{name}{c}" in rest for name in (leaf, key) for c in ("=", " "))
                         or key.split(".")[0] in _unknown_keys(rest)):
            return f"command-line override {override}: {rest}"
    return message


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)

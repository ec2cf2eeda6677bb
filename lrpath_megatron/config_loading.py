"""Dataclass configs from YAML: building a dataclass from a mapping (unknown keys and wrong types refused, the
field named), ``--set a.b=c`` overrides, where a bad value came from, and serialising back to plain data.
Knows no section: :mod:`lrpath_megatron.config` and the plan's schema define them."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import shlex
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration or plan is invalid. The message says which field, why, and how to fix it."""


# Field metadata of settings added after configs were first written: :func:`to_dict` leaves such a field out
# while it is None, so a config that does not set it serialises, and a plan hashes, as before it existed.
OMITTED_WHEN_UNSET = {"omitted_when_unset": True}


# Types of list elements that are dataclasses (kept explicit: the list fields are typed `list` so that
# dataclass defaults stay simple).
_LIST_ITEM_TYPES: dict[tuple[type, str], type] = {}


def register_list_item_type(owner: type, field_name: str, item_type: type) -> None:
    """Declare that ``owner.field_name`` is a list of ``item_type`` dataclasses (for other config files)."""
    _LIST_ITEM_TYPES[(owner, field_name)] = item_type


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(_join(where, k) for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(cls, name, hints[name], value, _join(where, name))
    return cls(**kwargs)


def _coerce(owner: type, name: str, hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        item = _LIST_ITEM_TYPES.get((owner, name))
        if item is not None:
            return [from_dict(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.hidden_size=256")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(item, raw)
    return data


def _parse_value(item: str, raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem, mark = getattr(exc, "problem", None) or exc, getattr(exc, "problem_mark", None)
        if mark is not None:
            problem = f"{problem} at character {mark.column + 1}"
        raise ConfigError(
            f"--set {shlex.quote(item)}: the value {raw!r} is not valid YAML ({problem}); give a YAML value, "
            f"e.g. 256, [1, 2], or a quoted string"
        ) from None
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


@contextlib.contextmanager
def config_source(path: str | Path | None, overrides: list[str] | None = None):
    """Prefix a ConfigError raised inside with where its value came from: the config file, and the
    ``--set`` arguments of the fields the message names (the file alone would send the reader to a
    value it does not hold). Wraps loading, and the checks made only at run time (e.g. the world size)."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        sets = [shlex.quote(o) for o in overrides or [] if o.split("=", 1)[0].strip() in message]
        where = " with ".join(filter(None, [str(path or ""), " ".join(f"--set {o}" for o in sets)]))
        raise ConfigError(f"{where}: {message}" if where else message) from None


def to_dict(cfg: Any) -> dict:
    """``dataclasses.asdict(cfg)``, without the fields marked :data:`OMITTED_WHEN_UNSET` that are None."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omitted_when_unset") and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return type(value)((_plain(k), _plain(v)) for k, v in value.items())
    return copy.deepcopy(value)

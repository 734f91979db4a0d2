"""Config dataclasses from YAML and dicts: one type-driven loader for every config of the project.

`load(cls, data, where)` walks the dataclass's resolved type hints (nested dataclasses, `X | None`, `list[T]`,
`tuple[T, ...]`, `dict[str, T]`, `Literal[...]`, enums), refuses unknown keys with the allowed ones, and raises
one error naming the file and the field path:

    jobs/configs/demo.yaml: stages.stage2.overrides: ...
    jobs/configs/tiny/stage1.yaml: lr: expected a number, got 'abc'

Each config class keeps its own `__post_init__` checks; a `ValueError` one of them raises while nested is re-raised
with the file and path in front. `key=value` overrides (values parsed as YAML, dotted keys reaching into nested
dataclasses) go through `parse_overrides` and `apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigLoadError(ValueError):
    """A config key or value that is not accepted; the message names the file and the field path."""


class _Invalid(Exception):
    """Raised inside the walk; `load` turns it into the caller's error type with the file in front."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path, self.message = path, message


def load(
    cls: type[T], data: Mapping[str, Any], where: str = "config", error: type[Exception] = ConfigLoadError, **given: Any
) -> T:
    """Build the dataclass `cls` from `data`, converting and checking every value by its type hint.

    Args:
        cls: a dataclass; nested dataclass fields are built from nested mappings.
        data: the mapping read from YAML (or a dict), keys as the field names.
        where: what the data came from (a file path), the first part of every message.
        error: the exception type raised (a subclass of ValueError, e.g. a config class's own error).
        **given: constructor arguments that do not come from the data (not accepted as keys in it).

    Raises:
        error: an unknown or missing key, or a value of the wrong type, naming `where` and the field path.
    """
    try:
        return _build(cls, data, "", given)
    except _Invalid as e:
        raise error(f"{where}: {e.path}: {e.message}" if e.path else f"{where}: {e.message}") from e.__cause__


def load_yaml_mapping(path: str | Path, error: type[Exception] = ConfigLoadError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (every config file of the project); failures raise `error` naming
    the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())  # safe_load: config is data, never code
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def dump(config: Any) -> dict[str, Any]:
    """A config dataclass as plain data (tuples as lists), the form `load` reads back."""
    return _plain(dataclasses.asdict(config))


def parse_overrides(items: Iterable[str], error: type[Exception] = ConfigLoadError) -> dict[str, Any]:
    """`key=value` strings → {key: value}; values are YAML (`lr=1e-3`, `trainable=[llm]`); keys may be dotted.

    Raises:
        error: an item without `=` or without a key.
        yaml.YAMLError: a value that is not valid YAML (safe_load: never code).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise error(f"override {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `data` with each (dotted) override set: `a.b` reaches field `b` of the nested dataclass `a`, and
    in a `dict[str, T]` field the rest of the key is one dict key (`lr_groups.vision.stage5=1e-4`). Any other value
    is replaced whole. Keys are not checked here: `load` names an unknown one with its path."""
    out = dict(data)
    for key, value in overrides.items():
        _set(cls, out, key.split("."), value)
    return out


def _set(cls: type, data: dict[str, Any], parts: list[str], value: Any) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        data[head] = value
        return
    field = _hints(cls).get(head) if dataclasses.is_dataclass(cls) else None
    inner = _strip_optional(field)
    current = data.get(head)
    if dataclasses.is_dataclass(current):
        current = dump(current)
    if dataclasses.is_dataclass(inner):
        data[head] = dict(current or {})
        _set(inner, data[head], rest, value)
    elif typing.get_origin(inner) is dict:
        data[head] = {**(current or {}), ".".join(rest): value}
    else:  # not a nested field: keep the dotted key so `load` names it as unknown
        data[".".join(parts)] = value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, given: Mapping[str, Any] | None = None) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _Invalid(path, f"expected a mapping ({cls.__name__}), got {_show(data)}")
    given = given or {}
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in given]
    known = {f.name for f in fields}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise _Invalid(path, f"unknown key(s) {unknown}; known keys: {sorted(known)}")
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise _Invalid(path, f"missing required key(s) {missing}")
    hints = _hints(cls)
    kwargs = {name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs, **given)
    except _Invalid:
        raise
    except ValueError as e:
        if not path:  # the class's own message, with its own prefix
            raise
        raise _Invalid(path, str(e)) from e


def _convert(tp: Any, value: Any, path: str) -> Any:
    """`value` as type `tp`, or `_Invalid` naming `path`."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _convert(arms[0], value, path)
        for arm in arms:
            try:
                return _convert(arm, value, path)
            except _Invalid:
                continue
        raise _Invalid(path, f"expected {_name(tp)}, got {_show(value)}")
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Invalid(path, f"expected one of {list(args)}, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Invalid(path, f"expected a list, got {_show(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _Invalid(path, f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_convert(item, v, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"expected a mapping, got {_show(value)}")
        key_type, item = args if args else (Any, Any)
        if key_type is str and not all(isinstance(k, str) for k in value):
            raise _Invalid(path, f"expected string keys, got {[k for k in value if not isinstance(k, str)]}")
        return {k: _convert(item, v, _join(path, k)) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise _Invalid(path, f"expected one of {[m.value for m in tp]}, got {_show(value)}") from None
    if tp is float or tp is int:
        return _number(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(path, f"expected true or false, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(path, f"expected a string, got {_show(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Invalid(path, f"expected {tp.__name__}, got {_show(value)}")
    return value


def _number(tp: type, value: Any, path: str) -> int | float:
    """YAML 1.1 reads `2e-5` (no dot) as a string; users write it anyway, so number-like strings are numbers."""
    if isinstance(value, bool):
        raise _Invalid(path, f"expected a number, got {_show(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Invalid(path, f"expected a number, got {_show(value)}") from None
    if tp is int:
        if isinstance(value, int):
            return value
        if not number.is_integer():
            raise _Invalid(path, f"expected a whole number, got {_show(value)}")
        return int(number)
    return number


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, Mapping | list | tuple) else type(value).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value

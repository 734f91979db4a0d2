"""The config spine: one pydantic base model that every config of the project uses.

`ConfigModel` is a frozen pydantic v2 model that refuses unknown keys. It gives every config, once:

    Config.from_yaml(path, overrides=["lr=1e-3", "lr_groups.llm=2e-5"])   # YAML, then `key=value` overrides
    Config.from_dict(data, where="...")                                    # a mapping (what YAML or JSON gave)
    config.to_dict()                                                       # plain JSON-able data (tuples → lists)
    config.config_hash()                                                   # stable: keys sorted, 16 hex digits
    config.replace(lr=1e-4)                                                # a validated copy

and one error, `ConfigLoadError` (a ValueError), whose message names the file and the field path:

    jobs/configs/tiny/stage1.yaml: lr: Input should be a valid number, unable to parse string as a number (got 'abc')
    jobs/configs/demo.yaml: stages.stage2.overrides: lr: ...
    jobs/configs/tiny/stage1.yaml: override lr=abc: lr: Input should be a valid number, ...

Each config keeps its own checks as pydantic validators that raise `ValueError`; their message is used as it is.
Configs travel as objects; they become plain data (`to_dict`) only where they leave the process (Ray, JSON, MLflow).
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

Overrides = Iterable[str] | Mapping[str, Any]


class ConfigLoadError(ValueError):
    """A config key or value that is not accepted; the message names the file and the field path."""


class ConfigModel(BaseModel):
    """The base of every config: frozen, unknown keys refused, errors naming the file and the field path."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:  # built in code: the class names where
            raise ConfigLoadError(_describe(type(self), e, type(self).__name__)) from None

    # Only the error type changes here: pydantic validates nested configs on its own path (not through this
    # `__init__`), so their errors keep the full field path. pydantic marks its own `__init__` the same way.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_number_swap(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `true` as 1 for a number and 1, "yes" or "off" as a flag: `epochs: true` or
        `freeze: 1` is a mistake in a config, never the meaning. A flag must be true/false and a number must not be
        one. (Numbers written as strings stay accepted: PyYAML reads `lr: 1e-4` as the string '1e-4'.)"""
        field = cls.model_fields.get(info.field_name or "")
        kind = _scalar(field.annotation) if field else None
        if kind is bool and not isinstance(value, bool) and value is not None:
            raise ValueError(f"expected true or false (got {value!r})")
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(f"expected a number, not {str(value).lower()}")
        return value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config", overrides: Overrides | None = None) -> Self:
        """Build and validate from a mapping, after `overrides` (`key=value` strings or {dotted key: value}).

        Raises:
            ConfigLoadError: an unknown key, a missing one, a value of the wrong type or one the config's checks
                refuse, naming `where`, the override it came from and the field path.
        """
        items = _overrides(overrides, where)
        data = apply_overrides(cls, data, items)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigLoadError(_describe(cls, e, where, items)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Overrides | None = None) -> Self:
        """A YAML file (its top level a mapping), then `key=value` overrides (values parsed as YAML: `lr=1e-3`,
        `trainable=[llm]`; dotted keys reach nested configs: `preprocess.resolution=512`)."""
        return cls.from_dict(load_yaml_mapping(path), str(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples as lists), the form `from_dict` reads back."""
        return self.model_dump(mode="json")

    def config_hash(self) -> str:
        """The configuration's hash: the same for equal configs whatever the order of their mappings' keys."""
        return stable_hash(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> Self:
        """A copy with `changes` applied (dotted keys as in overrides: `lr_groups.llm=2e-5`), validated again."""
        return self.with_overrides(changes, f"{type(self).__name__}.replace")

    def with_overrides(self, overrides: Overrides, where: str) -> Self:
        """A copy with `overrides` applied, validated again; errors name `where`. Nested configs stay objects."""
        new = type(self).from_dict(dict(self), where, overrides)
        for name, value in (self.__pydantic_private__ or {}).items():
            setattr(new, name, value)
        return new


def stable_hash(data: Any) -> str:
    """16 hex digits of the SHA-256 of `data` as JSON with sorted keys (mapping order never changes it)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (every config file of the project).

    Raises:
        ConfigLoadError: the file is missing, unreadable, not YAML or not a mapping, naming the file.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())  # safe_load: config is data, never code
    except FileNotFoundError:
        raise ConfigLoadError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigLoadError(f"{path}: not valid YAML ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigLoadError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigLoadError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings → {key: value}; values are YAML (`lr=1e-3`, `trainable=[llm]`); keys may be dotted.

    Raises:
        ConfigLoadError: an item without `=` or without a key, or a value that is not valid YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigLoadError(f"override {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)  # safe_load: never code
        except yaml.YAMLError as e:
            raise ConfigLoadError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return out


def apply_overrides(cls: type[ConfigModel], data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `data` with each (dotted) override set: `a.b` reaches field `b` of the nested config `a`; in a
    mapping of configs the next part is the entry (`stages.stage2.init_from`); in any other mapping the rest of the
    key is one key (`lr_groups.vision.stage5=1e-4`). Any other value is replaced whole. Keys are not checked here:
    validation names an unknown one with its path."""
    out = dict(data)
    for key, value in overrides.items():
        _set(cls, out, key.split("."), value)
    return out


def _overrides(overrides: Overrides | None, where: str) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    try:
        return parse_overrides(overrides)
    except ConfigLoadError as e:
        raise ConfigLoadError(f"{where}: {e}") from None


def _set(tp: Any, data: dict[str, Any], parts: list[str], value: Any) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        data[head] = value
        return
    field = tp.model_fields.get(head) if _is_model(tp) else None
    inner = _strip_optional(field.annotation) if field else None
    current = data.get(head)
    if _is_model(inner):
        data[head] = dict(current or {})  # a nested config (an object when replacing) as its fields
        _set(inner, data[head], rest, value)
    elif typing.get_origin(inner) is dict:
        entries = dict(current or {})
        item = _strip_optional(typing.get_args(inner)[1]) if typing.get_args(inner) else Any
        if _is_model(item) and len(rest) > 1:  # stages.stage2.init_from: a field of one entry
            entries[rest[0]] = dict(entries.get(rest[0]) or {})
            _set(item, entries[rest[0]], rest[1:], value)
        else:
            entries[".".join(rest)] = value
        data[head] = entries
    else:  # not a nested config: keep the dotted key so validation names it as unknown
        data[".".join(parts)] = value


def _scalar(tp: Any) -> type | None:
    """bool, int or float when a field is one of them (or optional), else None."""
    tp = _strip_optional(tp)
    return tp if tp in (bool, int, float) else None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0]
    return tp


def _describe(
    cls: type[BaseModel], error: ValidationError, where: str, overrides: Mapping[str, Any] | None = None
) -> str:
    """pydantic's errors as one line each: `where: [override key=value: ]field.path: what is wrong`."""
    overrides = overrides or {}
    lines = []
    for e in error.errors(include_url=False):
        path = _path(e["loc"])
        # the override that set this field, one inside it, or one of the nested config whose own check failed
        origin = next(
            (
                k
                for k in overrides
                if path == k or path.startswith((f"{k}.", f"{k}[")) or (path and k.startswith(f"{path}."))
            ),
            None,
        )
        parts = [where]
        if origin is not None:
            parts.append(f"override {origin}={_text(overrides[origin])}")
        if path:
            parts.append(path)
        parts.append(_message(cls, e))
        lines.append(": ".join(parts))
    return "\n".join(lines)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(cls: type[BaseModel], e: Any) -> str:
    if e["type"] == "value_error":  # a config's own check: its message as written
        return str(e["ctx"]["error"])
    if e["type"] == "extra_forbidden":
        known = _known_keys(cls, e["loc"][:-1])
        return "unknown key" + (f"; known keys: {known}" if known else "")
    if e["type"] == "missing":
        return "missing required key"
    value = e.get("input")
    if isinstance(value, str | int | float | bool) or value is None:
        return f"{e['msg']} (got {value!r})"
    return f"{e['msg']} (got a {type(value).__name__})"


def _known_keys(cls: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The fields of the config at `loc` (through nested configs, mappings and lists), None when it is not one."""
    tp: Any = cls
    for part in loc:
        tp = _strip_optional(tp)
        if _is_model(tp):
            field = tp.model_fields.get(str(part))
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) in (dict, list, tuple) and typing.get_args(tp):
            tp = typing.get_args(tp)[-1 if typing.get_origin(tp) is dict else 0]
        else:
            return None
    tp = _strip_optional(tp)
    return sorted(tp.model_fields) if _is_model(tp) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)

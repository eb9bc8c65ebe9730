"""What the typed configs (``JobConfig``, the mode configs) share: building one from a mapping.

A mapping (a YAML file, flags) becomes a frozen dataclass here: every key must name a field
(``-`` read as ``_``; an unknown key is an error naming the closest valid one), values given in
YAML or flag spellings are coerced to the field's declared type, required fields must be
present, and the dataclass then validates itself when built (``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from rerank_ray.errors import RerankError

Config = TypeVar("Config")
# (config class, field name, value, source) -> the value as the field's type
Coerce = Callable[[type, str, Any, str], Any]


class ConfigError(RerankError, ValueError):
    """A configuration value is invalid; the message names the key, the value and the fix."""


def from_mapping(cls: type[Config], data: Mapping[str, Any], source: str, coerce: Coerce) -> Config:
    """Build ``cls`` from ``data`` (read from ``source``); a field's ``metadata["aliases"]``
    are other names for its key."""
    fields = dataclasses.fields(cls)
    valid = [f.name for f in fields]
    aliases = {a: f.name for f in fields for a in f.metadata.get("aliases", ())}
    normalized: dict[str, Any] = {}
    for key, value in data.items():
        name = known_key(aliases.get(key, key), valid, source)
        normalized[name] = coerce(cls, name, value, source)
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in normalized:
            raise ConfigError(
                f"`{f.name}` is required: pass --{f.name} URI or set `{f.name}:` in {source}."
            )
    try:
        return cls(**normalized)
    except TypeError as err:
        raise ConfigError(f"Invalid {source}: {err}") from None


def known_key(key: Any, valid: list[str], source: str) -> str:
    """``key`` as a field name (``-`` read as ``_``); unknown keys name the closest valid one."""
    name = str(key).replace("-", "_")
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"Unknown key `{key}` in {source}.{hint} Valid keys: {', '.join(valid)}.")
    return name


def check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ConfigError(f"`{key}` is {value!r}; choose one of {', '.join(allowed)}.")


def field_kind(cls: type, name: str) -> str:
    """The declared type of field ``name`` of ``cls``, as written (``"int | None"``)."""
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}[name]


def coerce_value(cls: type, name: str, value: Any, source: str) -> Any:
    """``JobConfig``'s spellings, by the field's type: booleans as ``true``/``false``/``1``/
    ``yes``/``on``..., integers as ``"512"``, lists as ``"a,b"``; reject the rest clearly."""
    if value is None:
        return None
    kind = field_kind(cls, name)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"`{name}` in {source} is {value!r}; use true or false.")
    if kind.startswith("int"):
        if isinstance(value, bool):
            raise ConfigError(f"`{name}` in {source} is {value!r}; use an integer.")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"`{name}` in {source} is {value!r}; use an integer.") from None
    if kind.startswith("list"):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ConfigError(f"`{name}` in {source} is {value!r}; use a list or 'a,b,c'.")
    if not isinstance(value, str):
        raise ConfigError(f"`{name}` in {source} is {value!r}; use a string.")
    return value

"""Generic dataclass <-> plain-dict conversion and the stable config digest.

Kept apart from :mod:`fastinf.experiment.config` (which holds the experiment's section dataclasses)
because nothing here knows about experiments: :func:`to_dict` and :func:`from_dict` (de)serialise any
nested dataclass, refusing unknown keys and coercing YAML scalars by the field's type hint, and
:func:`config_hash` digests any config, section or dict of them. It imports nothing from fastinf but
``fastinf.errors``, so checkpoint loading can use it without an import cycle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Union

from fastinf.errors import ConfigError

__all__ = ["to_dict", "from_dict", "config_hash"]


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain dicts/lists, ready for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(tp: Any, value: Any, key: str) -> Any:
    base, optional = _strip_optional(tp)
    if value is None:
        if optional or base is Any:
            return None
        raise ConfigError(f"{key} must not be null")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {base.__name__} fields; got {type(value).__name__}")
        return from_dict(base, value, prefix=key)
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:
            return float(value)          # YAML 1.1 reads "5e-4" as a string
        except ValueError:
            raise ConfigError(f"{key} must be a number; got {value!r}") from None
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string; got {value!r}")
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]              # a scalar where a list is expected: a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {type(value).__name__}")
        (item_tp,) = typing.get_args(base) or (Any,)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", where: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        src = f" in {where}" if where else ""
        raise ConfigError(f"unknown config key {key!r}{src}; valid keys{' of ' + prefix if prefix else ''}: "
                          f"{', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if where:
            raise ConfigError(f"{e} (in {where})") from None
        raise


def config_hash(obj: Any, *, length: int = 12) -> str:
    """A stable hex digest of a config (or section, or a dict of them): sorted-key canonical JSON."""
    payload = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]

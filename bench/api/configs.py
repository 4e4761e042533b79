"""Building frozen dataclass configs from command-line strings and JSON values.

A config's type hints say how each value is read: ``bool`` (``true``/``1``/
``yes``), ``int``, ``float``, ``str``, ``Literal[...]`` (one of the listed
values), ``tuple[float, ...]`` or ``list[int]`` (a JSON list or a comma-
separated string), ``X | None`` (``none`` or an ``X``) and nested dataclass
configs (a JSON object, or dotted keys: ``quantizer.bits=3``). A ``float``
must be finite: ``nan``, ``inf`` and ``1e400`` are refused here, in one place,
for every method, task and run setting. Every error is one line that names
the setting and what would be right.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from bench.errors import UsageError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _expected(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a comma-separated list of {_expected(typing.get_args(hint)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) if a is not type(None) else "none" for a in typing.get_args(hint))
    return f"a {getattr(hint, '__name__', str(hint))}"


def coerce_value(hint, raw: Any, where: str) -> Any:
    """``raw`` (a string from the command line or a JSON value) as type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = UsageError(f"{where}={raw!r} is not {_expected(hint)}")
    if origin in (Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce_value(arg, raw, where)
            except UsageError:
                continue
        raise bad
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw.strip()):
                return choice
        raise bad
    if origin in (tuple, list):
        items = [x.strip() for x in raw.split(",") if x.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise bad
        item_hint = args[0] if args else str
        values = [coerce_value(item_hint, item, where) for item in items]
        return tuple(values) if origin is tuple else values
    if dataclasses.is_dataclass(hint):
        if isinstance(raw, hint):
            return raw
        if not isinstance(raw, Mapping):
            raise bad
        return build_config(hint, raw, where)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise bad
    if hint is int:
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise bad from None
    if hint is float:
        if isinstance(raw, bool):
            raise bad
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(value):  # nan, inf and overflowing literals (1e400) alike
            raise UsageError(f"{where}={raw!r} is not a finite number; give an ordinary value, e.g. {where}=0.5")
        return value
    if hint is str:
        if isinstance(raw, (dict, list)):
            raise bad
        return str(raw)
    if hint is Any:
        return raw
    if hint is dict or origin is dict:
        if not isinstance(raw, Mapping):
            raise bad
        return dict(raw)
    raise UsageError(f"{where}: svdbench cannot read settings of type {hint}")


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys (``quantizer.bits``) as nested dictionaries."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if dot:
            inner = out.setdefault(head, {})
            if not isinstance(inner, dict):
                raise UsageError(f"{key!r} sets a field of {head!r}, which is not a nested config")
            inner[rest] = value
        else:
            out[key] = value
    return out


def build_config(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """An instance of dataclass ``cls`` from ``values`` (strings or JSON values), defaults for the rest."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = _nest(values)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"{where} has no setting '{unknown[0]}'; its settings are: {', '.join(fields) or 'none'}")
    kwargs = {}
    for name, raw in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(raw, Mapping):  # merge over the default nested config
            default = _default(fields[name])
            base = dataclasses.asdict(default) if default is not None else {}
            kwargs[name] = build_config(hint, {**base, **_nest(raw)}, f"{where}.{name}")
        else:
            kwargs[name] = coerce_value(hint, raw, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise UsageError(f"{where}: {error}") from None


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def config_dict(config: Any) -> dict:
    """A config as the JSON-able dictionary recorded in results (tuples as lists)."""
    if dataclasses.is_dataclass(config):
        return _jsonable(dataclasses.asdict(config))
    return {}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value

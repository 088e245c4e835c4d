"""Typed configuration: frozen dataclasses built from plain values (``--set`` strings, YAML, JSON).

Every plugin (defense, attack, shift) keeps its options in a frozen dataclass. The
functions here build one from a mapping, coerce strings to the annotated field types
(``8/255`` is accepted for floats), refuse unknown keys with a suggestion, and turn a
config back into JSON-able values for the job identity.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from harness.core.env import source_digest
from harness.core.registry import HarnessError, suggest


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a JSON-able dict (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _coerce(value: Any, typ: Any, key: str, owner: str) -> Any:
    """Coerce a CLI string (or JSON value) to the annotated field type."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        choices = typing.get_args(typ)
        v = value
        if isinstance(value, str) and not all(isinstance(c, str) for c in choices):
            v = _coerce(value, type(choices[0]), key, owner)
        if v not in choices:
            raise HarnessError(f"{owner}: {key}={value!r} is not one of {', '.join(map(str, choices))}")
        return v
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key, owner)
    if origin in (tuple, list):
        args = typing.get_args(typ)
        inner = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        return tuple(_coerce(v, inner, key, owner) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            out = float(_eval_fraction(value) if isinstance(value, str) else value)
            if not math.isfinite(out):  # NaN, inf, 1/0
                raise ValueError(value)
            return out
        if typ is str:
            return str(value)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        raise HarnessError(f"{owner}: {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


def _eval_fraction(s: str) -> float:
    """Accept '8/255' style fractions for eps-like values."""
    s = s.strip()
    if "/" in s:
        num, den = s.split("/", 1)
        if float(den) == 0:
            raise ValueError(s)
        return float(num) / float(den)
    return float(s)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """``cls``'s resolved type hints and its fields by name, once per class (resolving string annotations compiles them)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def build_config(cls: type, values: dict[str, Any], owner: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys are errors, types coerced."""
    hints, fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise HarnessError(
                f"{owner} has no option '{key}'{suggest(key, list(fields))} (options: {', '.join(fields) or 'none'})"
            )
        kwargs[key] = _coerce(value, hints[key], key, owner)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"{owner}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_recipe(path: Path, what: str) -> dict[str, Any]:
    """The JSON recipe written beside a weights file (architecture, sha256, training record), as a dict.

    Raises:
        HarnessError: (one line naming the file) it cannot be read, is not JSON, or holds no JSON object.
    """
    try:
        recipe = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HarnessError(f"{what} recipe '{path}' is not readable JSON: {_first_line(exc)}") from None
    if not isinstance(recipe, dict):
        raise HarnessError(f"{what} recipe '{path}' holds a JSON {type(recipe).__name__}, not an object")
    return recipe


def build_from_recipe(factory: Any, arguments: Any, where: str) -> Any:
    """``factory(**arguments)`` with constructor arguments read from a file (a recipe's ``unet_config``).

    Raises:
        HarnessError: (one line starting with ``where``) ``arguments`` is missing or not a
            mapping, or ``factory`` refuses it (an unknown argument, a value of the wrong type).
    """
    if arguments is None:
        raise HarnessError(f"{where} is missing")
    if not isinstance(arguments, dict):
        raise HarnessError(f"{where} must be a mapping of arguments, not a {type(arguments).__name__}")
    try:
        return factory(**arguments)
    except Exception as exc:  # constructors refuse bad arguments with TypeError, ValueError, AttributeError, ...
        name = getattr(factory, "__name__", "the constructor")
        raise HarnessError(f"{where}: {name} refuses it ({_first_line(exc)})") from None


def config_fields(cls: type) -> dict[str, str]:
    """Field name -> help text, for ``harness ls`` and error messages."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def plugin_identity(plugin: Any, base: type) -> dict[str, Any]:
    """What of a configured plugin (defense, attack, shift) enters a job's identity hash:
    its name, version, config and the sha256 of its source files up to ``base``.
    """
    return {
        "name": plugin.name,
        "version": plugin.version,
        "config": config_to_dict(plugin.config),
        "source": source_digest(type(plugin), stop=base),
    }

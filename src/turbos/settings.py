"""Typed settings: dataclasses filled from YAML or JSON mappings and ``key.sub=value`` overrides.

One parser serves every settings class (training recipes, SFT recipes, demo settings). A field's
type hint says what it accepts and ``setting(...)`` declares its range, so the checks are data:

- ``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` choices, ``tuple[A, B]``, ``tuple[T, ...]``,
  ``list[T]``, ``dict``, nested dataclasses, lists of them, ``T | None`` and ``Any`` (unchecked);
- a number YAML 1.1 reads as text (``1e-4``, which has no dot) is a number, an int is a float, a
  bool is never a number, and a float must be finite;
- an unknown key is named with the valid ones, and every error names the dotted path of its key
  (``stages[0].steps``) and what was expected.

Checks that relate several fields (``warmup_steps < steps``) stay with the settings class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import os
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from turbos.config import ConfigError

T = TypeVar("T")

_BOUNDS = {
    "ge": (">=", operator.ge),
    "gt": (">", operator.gt),
    "le": ("<=", operator.le),
    "lt": ("<", operator.lt),
}


class SettingsError(ConfigError):
    """A setting is unknown, missing, of the wrong type or out of range; the message names its key."""

    def __init__(self, message: str, named: bool = False) -> None:
        super().__init__(message)
        self.named = named  # the message starts with the name of its settings ("sft recipe: ...")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    nonempty: bool = False,
) -> Any:
    """A dataclass field with its allowed range, e.g. ``steps: int = setting(200, gt=0)``.

    The bounds apply to a number, or to each number of a list or tuple; an unset optional (None)
    passes. ``nonempty``: a list or tuple needs at least one item.
    """
    bounds = {
        name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None
    }
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"bounds": bounds, "nonempty": nonempty}
    )


def parse_settings(cls: type[T], raw: Any, what: str = "") -> T:
    """Build the settings dataclass ``cls`` from a mapping, every value checked by its field.

    ``what`` (e.g. "sft recipe") starts the message of every SettingsError."""
    with _named(what):
        return _build(cls, raw, "")


def check_settings(instance: Any, what: str = "") -> None:
    """Check every field of a settings dataclass in place (from its ``__post_init__``): values are
    converted as ``parse_settings`` converts them (a mapping becomes the nested dataclass) and must
    lie in their declared range."""
    with _named(what):
        _check_fields(instance, "")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``key=value`` or ``a.b.c=value`` entries in a raw settings dict (values read as YAML).

    List items are addressed by index (``stages.1.seq_len=256``). Keys are checked when the
    settings are parsed, so a misspelt key fails there with the list of valid ones.
    """
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise SettingsError(f"override {item!r} must look like key=value (key.sub=value in a section)")
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise SettingsError(f"override {item!r}: {here!r} needs an index below {len(node)}")
                part = int(part)
            elif not isinstance(node, dict):
                raise SettingsError(f"override {item!r}: {'.'.join(parts[:depth])!r} is not a section")
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(text)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def read_yaml(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The mapping of a YAML settings file (empty for an empty file); ``what`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SettingsError(f"{path} is not valid YAML: {err}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: a {what} must be a mapping of keys to values, got {raw!r}")
    return raw


@contextlib.contextmanager
def _named(what: str) -> Iterator[None]:
    """Start the message of a SettingsError raised inside with ``what``, unless one is named already
    (by the ``__post_init__`` of a settings class that ``parse_settings`` builds)."""
    try:
        yield
    except SettingsError as err:
        if not what or err.named:
            raise
        raise SettingsError(f"{what}: {err}", named=True) from None


# ----------------------------------------------------------------------------------------------
# Conversion: a value against a type hint, named by its dotted path
# ----------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], raw: Any, where: str) -> T:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{where + ': ' if where else ''}expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        section = f" in {where!r}" if where else ""
        raise SettingsError(f"unknown key {_join(where, unknown[0])!r}; valid keys{section}: {list(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise SettingsError(f"missing key {_join(where, missing[0])!r}")
    hints = _hints(cls)
    return cls(
        **{key: _field_value(value, hints[key], fields[key], _join(where, key)) for key, value in raw.items()}
    )


def _check_fields(instance: Any, where: str) -> None:
    hints = _hints(type(instance))
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        checked = _field_value(value, hints[f.name], f, _join(where, f.name))
        if checked is not value:
            object.__setattr__(instance, f.name, checked)  # frozen dataclasses too


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _field_value(value: Any, tp: Any, f: dataclasses.Field, where: str) -> Any:
    """``value`` converted to the field's type and checked against its declared range."""
    value = _coerce(value, tp, where)
    if value is None:
        return value
    if f.metadata.get("nonempty") and not value:
        raise SettingsError(f"{where} must not be empty")
    bounds = f.metadata.get("bounds")
    if bounds:
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if not all(_BOUNDS[name][1](item, bound) for name, bound in bounds.items()):
                place = where if i is None else f"{where}[{i}]"
                raise SettingsError(f"{place} must be {_range_text(bounds)}, got {item!r}")
    return value


def _range_text(bounds: dict[str, float]) -> str:
    """'>= 0', '< 1', or an interval such as '[0, 1)' when both ends are bounded."""
    low = [name for name in ("ge", "gt") if name in bounds]
    high = [name for name in ("le", "lt") if name in bounds]
    if low and high:
        opening, closing = "[" if low[0] == "ge" else "(", "]" if high[0] == "le" else ")"
        return f"in {opening}{bounds[low[0]]}, {bounds[high[0]]}{closing}"
    name = (low or high)[0]
    return f"{_BOUNDS[name][0]} {bounds[name]}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _number(value: Any) -> float | None:
    """A number, or a string YAML 1.1 left unread such as '5e-6'; None for anything else (a bool too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except SettingsError as err:
                errors.append(err)
        raise (
            errors[0]
            if len(errors) == 1
            else SettingsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        )
    if origin is Literal:
        if not any(value == choice and type(value) is type(choice) for choice in args):
            raise SettingsError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            _check_fields(value, where)
            return value
        return _build(tp, value, where)
    if origin is tuple and args[-1:] != (...,):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SettingsError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return origin(_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {value!r}")
        return value
    if tp in (int, float):
        number = _number(value)
        if number is not None and not math.isfinite(number):
            raise SettingsError(f"{where}: expected a finite {tp.__name__}, got {value!r}")
        if tp is float and number is not None:
            return float(number)
        if tp is int and number is not None and float(number).is_integer():
            return int(number)
    raise SettingsError(f"{where}: expected {_type_name(tp)}, got {value!r}")

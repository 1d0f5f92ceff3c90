"""Type-checked configuration from plain mappings (YAML), with errors that name the file, the key and the
allowed values.

Schemas are dataclasses (for the experiment config) or function signatures (for loss modules: a method's config
block is checked against its constructor's typed keyword arguments, so adding a method needs no schema file).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from .errors import ConfigError

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = _describe(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin in (dict, Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _fail(where: str, key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(f"{where}: key '{key}' has value {value!r}; expected {_describe(tp)}")


# Decimal notation as people type it: 1e-3, 1E5, .5, -2e-4, 3., 1_000.5. YAML 1.1 (PyYAML) reads the forms without
# a dot or without an exponent sign as strings; where a float is expected they are numbers. Words (inf, nan) are not.
_FLOAT_TEXT = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?")


# YAML 1.1 (PyYAML) also reads an unquoted off / on as false / true; where those words are among the choices, a bool
# is taken back to the word that was typed.
_YAML_BOOL_WORDS = {False: "off", True: "on"}


class NonFiniteError(ConfigError):
    """A float key holds NaN or ±inf (kept distinct so that a union type reports it as such)."""


def _check_float(value: Any, key: str, where: str) -> float:
    """A finite float from a number or from decimal text; NaN and ±inf are refused naming the key."""
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value.strip().replace("_", ""))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, key, value, float)
    out = float(value)
    if not math.isfinite(out):
        raise NonFiniteError(f"{where}: key '{key}' has value {out}; expected a finite float")
    return out


def check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` converted to ``tp`` (int → float, list → tuple, mapping → dataclass) or raise
    :class:`ConfigError`. ``key`` is the dotted path shown in the message, ``where`` the file."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and _YAML_BOOL_WORDS[value] in get_args(tp):
            return _YAML_BOOL_WORDS[value]
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise _fail(where, key, value, tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg, key, where)
            except NonFiniteError:
                raise
            except ConfigError as e:
                errors.append(e)
        raise _fail(where, key, value, tp)
    if tp is type(None):
        if value is None:
            return None
        raise _fail(where, key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, key, value, tp)
    if tp is float:
        return _check_float(value, key, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, key, value, tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(where, key, value, tp)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: key '{key}' needs {len(args)} values, got {list(value)!r}")
            items = [check_value(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [check_value(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail(where, key, value, tp)
        args = get_args(tp)
        if len(args) == 2:
            return {k: check_value(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _fail(where, key, value, tp)
        return build_dataclass(tp, value, where, prefix=key)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _fail(where, key, value, tp)
    return value


def build_dataclass(cls: type[T], mapping: Mapping[str, Any], where: str, prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``mapping``; unknown keys, missing required keys and wrong types are
    errors that name ``where`` (the file) and the dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    dot = f"{prefix}." if prefix else ""
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{dot}{unknown[0]}'; allowed keys{' under ' + repr(prefix) if prefix else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = check_value(mapping[name], hints[name], f"{dot}{name}", where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{dot}{name}' ({_describe(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {prefix or cls.__name__}: {e}") from None


def signature_schema(fn: Callable[..., Any], reserved: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """``{name: (type, default)}`` for the keyword arguments of ``fn`` (a class: its ``__init__``) that a config
    may set, i.e. all but ``reserved`` (values the engine supplies, such as channel counts)."""
    target = fn.__init__ if isinstance(fn, type) else fn  # type: ignore[misc]
    hints = typing.get_type_hints(target)
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        if name == "self" or name in reserved or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, Any), p.default)
    return out


def validate_kwargs(
    fn: Callable[..., Any], mapping: Mapping[str, Any], where: str, prefix: str = "", reserved: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check ``mapping`` against the typed keyword arguments of ``fn``; return the converted values."""
    schema = signature_schema(fn, reserved)
    dot = f"{prefix}." if prefix else ""
    for k in mapping:
        if k not in schema:
            allowed = ", ".join(sorted(schema)) or "(none)"
            raise ConfigError(f"{where}: unknown key '{dot}{k}'; allowed keys: {allowed}")
    out = {}
    for name, (tp, default) in schema.items():
        if name in mapping:
            out[name] = check_value(mapping[name], tp, f"{dot}{name}", where)
        elif default is inspect.Parameter.empty:
            raise ConfigError(f"{where}: missing required key '{dot}{name}' ({_describe(tp)})")
    return out


__all__ = ["build_dataclass", "check_value", "signature_schema", "validate_kwargs"]

"""Config dataclasses (trainer, task, method) checked when a config is read, before anything is loaded.

`make_config(cls, values, where)` builds `cls(**values)` after checking that every key is a field
of `cls`, every value has the field's annotated type (int, float, str, bool, None, `X | Y`,
`list[X]`, `dict`, `Literal`), and lies in the range the class declares in its `CHECKS` ClassVar
(field -> `Check`). All problems are reported at once, each naming `{where}.{key}`, the value and
what is allowed, e.g. ``trainer.batch_size=0: expected 'auto' or an integer >= 1``.

Our readings: a bool is never a number; an integer is accepted where a float is expected (and
converted); a float must be finite.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; the message names key, value and what is allowed."""


@dataclass(frozen=True)
class Check:
    """A range check: `ok(value)` for a value of the right type; `text` says what is allowed."""

    text: str
    ok: Callable[[Any], bool]
    detail: Callable[[Any], str] | None = None   # what exactly is wrong with a value that fails

    def __or__(self, other: "Check") -> "Check":
        return Check(f"{self.text} or {other.text}", lambda v: self.ok(v) or other.ok(v))

    def __and__(self, other: "Check") -> "Check":
        return Check(f"{self.text}, {other.text}", lambda v: self.ok(v) and other.ok(v))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def role_names(allowed: tuple[str, ...]) -> Check:
    """A non-empty list of role names from `allowed`."""
    unknown = lambda v: [r for r in v if r not in allowed]   # noqa: E731
    return Check(f"a non-empty list of roles from {list(allowed)}", lambda v: len(v) > 0 and not unknown(v),
                 lambda v: f"role {unknown(v)[0]!r} is unknown" if unknown(v) else "no role")


def at_least(lo: float) -> Check:
    what = f"a number >= {lo}" if isinstance(lo, float) else f"an integer >= {lo}"
    return Check(what, lambda v: _number(v) and v >= lo)


def above(lo: float) -> Check:
    return Check(f"a number > {lo}", lambda v: _number(v) and v > lo)


def between(lo: float, hi: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    text = f"a number in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
    inside = lambda v: (lo < v if low_open else lo <= v) and (v < hi if high_open else v <= hi)   # noqa: E731
    return Check(text, lambda v: _number(v) and inside(v))


def one_of(*choices: Any) -> Check:
    return Check(" or ".join(repr(c) for c in choices) if len(choices) < 3 else f"one of {list(choices)}",
                 lambda v: v in choices)


def each(check: Check) -> Check:
    return Check(f"a list, each item {check.text}", lambda v: all(check.ok(x) for x in v))


def matches(pattern: str, text: str) -> Check:
    return Check(text, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None)


NON_EMPTY = Check("not empty", lambda v: len(v) > 0)


# ---------------------------------------------------------------------------- types


def conforms(value: Any, tp: Any) -> bool:
    """Whether `value` (plain YAML/JSON data) has the annotated type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if tp is None or tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return _number(value) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in args
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(conforms(x, item) for x in value)
    if origin is dict or tp is dict:
        key, val = args if args else (Any, Any)
        return isinstance(value, dict) and all(conforms(k, key) and conforms(v, val) for k, v in value.items())
    return isinstance(value, tp) if isinstance(tp, type) else True


def describe(tp: Any) -> str:
    """What values of the annotated type `tp` look like, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        return f"a list (each {describe(args[0])})" if args else "a list"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null", None: "null", dict: "a mapping"}
    return names.get(tp, "a mapping" if origin is dict else getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> Any:
    """An int where the field wants a float (and no int) becomes a float."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    if float in members and int not in members and _number(value) and isinstance(value, int):
        return float(value)
    return value


def check_values(config_cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` checked against `config_cls`'s fields (keys, types, CHECKS); returns them coerced."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where} config for {config_cls.__name__}; "
                          f"expected some of {sorted(fields)}")
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001  (an annotation that cannot be resolved: checked by ranges only)
        hints = {}
    checks: dict[str, Check] = getattr(config_cls, "CHECKS", {})
    problems, out = [], {}
    for key, value in values.items():
        tp = hints.get(key, Any)
        if not conforms(value, tp):
            problems.append(f"{where}.{key}={value!r}: expected {describe(tp)}")
            continue
        check = checks.get(key)
        if value is not None and check is not None and not check.ok(value):
            detail = f"{check.detail(value)}; " if check.detail else ""
            problems.append(f"{where}.{key}={value!r}: {detail}expected {check.text}")
            continue
        out[key] = _coerce(value, tp)
    if problems:
        raise ConfigError("; ".join(problems))
    return out


def make_config(config_cls: type, values: dict[str, Any], where: str = "method"):
    """`config_cls(**values)`, every key and value checked first (see the module docstring)."""
    return config_cls(**check_values(config_cls, dict(values), where))

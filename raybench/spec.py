"""Declarative checks of parameter values: a type, bounds and finiteness per parameter, checked before any work.

A method declares one ``Param`` per parameter beside its defaults, and the base training recipe declares its
fields the same way, so a negative batch size, ``lr = "abc"`` or a NaN is refused with one clear line while the
configuration is validated, not found out as a traceback after the cluster did the work. Pure Python: no torch,
no Ray, low in the import order.

Integers must be ``int`` (``True`` is not 1, ``2.5`` and ``64.0`` are not integers); reals accept ``int`` or
``float``, must be finite and come back as ``float``, so ``lr = 1`` and ``lr = 1.0`` are one value (and one unit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT32_MAX = (1 << 31) - 1
"""Default upper bound of integer parameters: epoch numbers are stored in int32 columns, and counts beyond it are
typos (or overflows of torch/numpy integer arithmetic), not experiments."""

MAX_MODELS = 100_000
"""The most models of one role (originals, oracles of a forget set, matching oracles) a run may plan: 500x the
largest published KLOM ensembles, and small enough that planning (seeds, unit lists) stays instant. A typo such
as ``--n-models 1000000000`` is refused rather than left to fill the driver's memory."""

KINDS = ("int", "float", "bool", "str", "choice", "object")


@dataclass(frozen=True)
class Param:
    """The type and range of one parameter. ``low``/``high`` bound ints and floats (inclusive unless
    ``low_open``/``high_open``); ``choices`` lists the allowed values of a ``choice``."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a choice parameter needs its choices")

    def check(self, name: str, value: object) -> object:
        """``value`` if it fits (a real as ``float``); else ValueError naming ``name``, the rule and the value."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            return value
        if self.kind == "object":  # its entries are a method's business (``Method.normalise``)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a table (a JSON object with string keys), got {value!r}")
            return dict(value)
        if self.kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")
            return value
        if self.kind == "choice":
            if isinstance(value, bool) or value not in self.choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
            return value
        given = value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            try:
                value = float(value)
            except OverflowError:
                raise ValueError(f"{name} must be a finite number, got {value!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self._in_range(value):
            raise ValueError(f"{name} must be {self.describe_range()}, got {given!r}")
        return value

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe_range(self) -> str:
        """E.g. ``"> 0"``, ``"in [0, 1)"``, ``">= 1"``."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "finite"

    def to_dict(self) -> dict:
        """JSON-ready description (``raybench methods --json``)."""
        out: dict = {"type": self.kind}
        if self.kind in ("int", "float"):
            out["range"] = self.describe_range()
        if self.choices:
            out["choices"] = list(self.choices)
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def integer(low: int | None = None, high: int | None = INT32_MAX) -> Param:
    return Param("int", low, high)


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Param:
    return Param("float", low, high, low_open, high_open)


def boolean() -> Param:
    return Param("bool")


def string() -> Param:
    return Param("str")


def table() -> Param:
    """A JSON object (a TOML table) of further parameters, e.g. the parameters of a method that another calls."""
    return Param("object")


def choice(*values: object) -> Param:
    return Param("choice", choices=tuple(values))


def infer(default: object) -> Param | None:
    """What a parameter without a declared spec is checked against: its default's type (a bool stays a bool, an
    int an integer, a float a finite real, a str a string); None (no check) for any other default."""
    if isinstance(default, bool):
        return boolean()
    if isinstance(default, int):
        return integer(None, None)
    if isinstance(default, float):
        return real()
    if isinstance(default, str):
        return string()
    return None

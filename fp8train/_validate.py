"""Config validation helpers: each raises ValueError naming the field and what is allowed."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["check_choice", "check_int_range", "check_type"]


def check_choice(owner: str, field: str, value: Any, allowed: Collection[Any]) -> None:
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{owner}.{field}={value!r} is not allowed; allowed values: {shown}")


def check_type(owner: str, field: str, value: Any, expected: type | tuple[type, ...]) -> None:
    # bool is an int subclass; a flag where a number is expected (or vice versa) is a config error
    if isinstance(value, bool) != (expected is bool or (isinstance(expected, tuple) and bool in expected)) \
            or not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ValueError(f"{owner}.{field}={value!r} has type {type(value).__name__}; expected {names}")


def check_int_range(owner: str, field: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    check_type(owner, field, value, int)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{owner}.{field}={value!r} is out of range; allowed: integers in [{lo_s}, {hi_s}]")

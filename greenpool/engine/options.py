"""Checks of the options users give: each error names the parameter and what is allowed."""

from __future__ import annotations

import numbers
from typing import Any


def number(name: str, value: Any) -> float:
    """`value` as a float, if it is a number: not a string or a bool, which no one means."""
    # The ABC's isinstance() is slow: the common types first.
    if (
        type(value) is not float
        and type(value) is not int
        and (not isinstance(value, numbers.Real) or isinstance(value, bool))
    ):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def positive(name: str, value: Any, *, allow_zero: bool = True) -> float:
    """`value` as a float >= 0 (> 0 unless `allow_zero`); NaN is refused."""
    result = number(name, value)
    if result < 0 or (result == 0 and not allow_zero) or result != result:
        allowed = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return result


def seconds_left(timeout: Any) -> float:
    """A checkout's `timeout`, checked; one < 0 (a deadline already past) counts as 0."""
    result = number("timeout", timeout)
    return 0.0 if result < 0 else positive("timeout", result)


def count(name: str, value: Any, minimum: int) -> int:
    """`value`, an int (not a bool) >= `minimum`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def callable_or_none(name: str, value: Any) -> None:
    """Raise unless `value` is None or callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {value!r}")


def sizes(min_size: Any, max_size: Any) -> tuple[int, int]:
    """`(min_size, max_size)` checked; `max_size` None means `min_size`."""
    if max_size is None:
        max_size = min_size
    count("min_size", min_size, 0)
    count("max_size", max_size, 0)
    if max_size < min_size:
        raise ValueError(f"max_size must be >= min_size ({min_size}), got {max_size}")
    if max_size == 0:
        raise ValueError("max_size must be > 0 (it defaults to min_size, here 0)")
    return min_size, max_size

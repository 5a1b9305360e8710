"""Checks of model settings: one error style, ``model.<field>=<value> is invalid: expected ...``."""

from __future__ import annotations

import math
from numbers import Integral, Real

from recsys.errors import ConfigError


def check(ok: bool, field: str, value: object, expected: str) -> None:
    """Raises ConfigError naming ``model.<field>``, its value and what was expected unless ``ok``.

    Example:
        >>> check(3 >= 1, "factors", 3, "an integer >= 1")
    """
    if not ok:
        raise ConfigError(f"model.{field}={value!r} is invalid: expected {expected}")


def is_number(value: object) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: object, minimum: int = 1) -> bool:
    """An integer (not a bool) of at least ``minimum``."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum

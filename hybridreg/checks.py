"""Validation of arguments at the public boundary, shared by every module.

Only numpy is imported here, so any module (fields, itkimage, io, elastix) can use it
without an import cycle.
"""
from __future__ import annotations

import math

__all__ = ["as_xy", "as_spacing_xy"]


def as_xy(value, name: str, *, positive: bool = False) -> tuple[float, float]:
    """A pair ``(x, y)`` of finite floats.

    Raises
    ------
    TypeError
        ``value`` is not an iterable of numbers.
    ValueError
        It does not hold two values, a value is not finite, or (``positive=True``) a value
        is not positive.
    """
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (x, y) of numbers, got {value!r}") from None
    if len(pair) != 2:
        raise ValueError(f"{name} must be a pair (x, y), got {len(pair)} values: {value!r}")
    if not all(math.isfinite(v) for v in pair):
        raise ValueError(f"{name} must be a pair (x, y) of finite numbers, got {value!r}")
    if positive and not all(v > 0 for v in pair):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return pair


def as_spacing_xy(value, name: str = "spacing_xy") -> tuple[float, float]:
    """A grid spacing ``(x, y)``: two positive finite floats (see :func:`as_xy`)."""
    return as_xy(value, name, positive=True)

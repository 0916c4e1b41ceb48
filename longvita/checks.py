"""Validation of user-given numbers: one place, one wording.

Every setting a user types (a sampling temperature, a frame count, a chunk size) is checked
here before work starts, so that `nan`, `inf`, a bool or a float where a count belongs fails
with a ValueError naming the setting and its value instead of surfacing later as a NaN
probability or a tensor shape error.
"""

from __future__ import annotations

import math
import numbers


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """`value` as an int (>= minimum when given); ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
) -> float:
    """`value` as a finite float within the bounds given (`above` is exclusive, the others
    inclusive); ValueError naming `name` otherwise (nan and inf are never accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if at_least is not None and value < at_least:
        raise ValueError(f"{name} must be >= {at_least}, got {value}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} must be <= {at_most}, got {value}")
    return value

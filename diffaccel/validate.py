"""Parameter checks shared by every method config and planner.

Each check returns the value when it is acceptable and otherwise raises ``ValueError`` with one
line naming the parameter, the allowed values and what was given. Numbers must be real numbers
(``True`` is not 1) and finite: nan and inf are refused everywhere, because every comparison
with nan is False and would otherwise slip through range checks.
"""
from __future__ import annotations

import math
from typing import Any, Collection


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""


def is_real(value: Any) -> bool:
    """A finite int or float (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: Any, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.{_hint(hint)}")
    return value


def non_negative_int(value: Any, what: str, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}.{_hint(hint)}")
    return value


def fraction(value: Any, what: str, low: float = 0.0, high: float = 1.0, *, inclusive_high: bool = True) -> float:
    """A number in [low, high] (or [low, high) with ``inclusive_high=False``)."""
    ok = is_real(value) and low <= value and (value <= high if inclusive_high else value < high)
    if not ok:
        bound = "]" if inclusive_high else ")"
        raise ValueError(f"{what} must be a number in [{low}, {high}{bound}, got {value!r}.")
    return float(value)


def at_least(value: Any, what: str, low: float, hint: str = "") -> float:
    """A finite number >= ``low``."""
    if not (is_real(value) and value >= low):
        raise ValueError(f"{what} must be a finite number >= {low:g}, got {value!r}.{_hint(hint)}")
    return float(value)


def one_of(value: Any, choices: Collection, what: str, hint: str = "") -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what} must be one of {tuple(choices)}, got {value!r}.{_hint(hint)}")
    return value


def time_range(value: Any, what: str) -> None:
    """None, or (low, high) normalised times with 0 <= low < high <= 1."""
    if value is None:
        return
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(is_real(v) for v in value)
    if not ok or not (0.0 <= value[0] < value[1] <= 1.0):
        raise ValueError(
            f"{what} must be (low, high) normalised times with 0 <= low < high <= 1 (1 = pure noise), got {value!r}; "
            "e.g. (0.1, 0.8) reuses in the middle of the trajectory."
        )


def int_triple(value: Any, what: str, odd: bool) -> None:
    """Three positive ints for (frames, height, width); odd ones when ``odd`` (centred windows)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 and (v % 2 == 1 or not odd) for v in value)
    if not ok:
        need = "odd positive ints (tiles, centred)" if odd else "positive ints (tokens)"
        raise ValueError(f"{what} must be 3 {need} for (frames, height, width), got {value!r}; "
                         f"for images use 1 frame, e.g. (1, 3, 3)")


def window(value: Any, what: str) -> None:
    """A (t, h, w) window of odd tile counts, or a list of them (one per head)."""
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)):
        for head, per_head in enumerate(value):
            int_triple(per_head, f"{what}[head {head}]", odd=True)
    else:
        int_triple(value, what, odd=True)

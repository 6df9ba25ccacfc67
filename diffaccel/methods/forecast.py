"""Forecasting a reused quantity forward in time from its last computed values.

A cache that reuses an activation computed at normalised time ``t1`` while the call is at ``t``
can do better than repeating it: with the values of the last computes ``(t1, v1), (t2, v2),
(t3, v3)`` a Newton polynomial of order 1 or 2 extends their trend (the same idea as
TaylorSeer / FoCa / SeaCache's residual extrapolation, in the scheduler's own time so that
unevenly spaced steps are handled exactly). Order 0 repeats ``v1``.

Extrapolation can blow up where the trend turns (the last steps, a prompt unlike the profiled
ones). The guard bounds the forecast's change ``|f - v1|`` (RMS over the tensor) by ``guard``
times the last observed change ``|v1 - v2|``, scaled by how far ``t`` is from ``t1`` in units of
the last interval. For order 1 the change is ``a (v1 - v2)``, so the clamp is a scalar on ``a``
(a guard under 1 damps the extrapolation) and a forecast is one tensor operation; for order 2 it
is a tensor operation. Either way there is no host sync and no branch on data. Example::

    h = History()
    h.push(0.9, a); h.push(0.8, b)
    h.forecast(0.7, order=1)          # 2 b - a
"""
from __future__ import annotations

import math
from typing import Any

import torch

from diffaccel.methods.cache_common import tree_map

ORDERS = (0, 1, 2)


class History:
    """The last ``order + 1`` computed values of one cached quantity (a tensor or a tuple of tensors)."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self.items: list[tuple[float, Any]] = []  # (time, value), oldest first

    def push(self, t: float, value: Any) -> None:
        if self.items and self.items[-1][0] == t:  # a repeated timestep (Heun): the newer value wins
            self.items.pop()
        self.items.append((t, value))
        del self.items[: -self.keep]

    @property
    def last(self) -> Any:
        return self.items[-1][1]

    def forecast(self, t: float | None, order: int, guard: float = 2.0, max_gap: float = math.inf) -> Any:
        """The value at ``t``: order 0 / 1 / 2 Newton extrapolation of the kept values (fewer kept
        values lower the order), its change clamped by ``guard`` (0: no clamp). Where the last two
        values lie more than ``max_gap`` apart in time, the last one as it is (order 0)."""
        order = min(order, len(self.items) - 1)
        if order <= 0 or t is None:
            return self.last
        (t1, v1), (t2, v2) = self.items[-1], self.items[-2]
        if abs(t1 - t2) > max_gap:
            return v1
        a = (t - t1) / (t1 - t2)  # steps ahead, in units of the last interval
        if order == 1:
            # |f - v1| = |a| |v1 - v2| exactly, so the guard's clamp is min(|a|, guard max(1, |a|)) and
            # v1 + step (v1 - v2) = lerp(v2, v1, 1 + step): one operation, no temporary.
            step = a if guard <= 0 else math.copysign(min(abs(a), guard * max(1.0, abs(a))), a)
            return tree_map(lambda x1, x2: torch.lerp(x2, x1, 1.0 + step), v1, v2)
        t3, v3 = self.items[-3]
        # Newton form: v1 + (t - t1) d[1,2] + (t - t1)(t - t2) d[1,2,3].
        b = (t - t1) * (t - t2) / (t1 - t3)

        def newton(x1, x2, x3):
            d12, d23 = (x1 - x2) / (t1 - t2), (x2 - x3) / (t2 - t3)
            return x1 + a * (x1 - x2) + b * (d12 - d23)

        forecast = tree_map(newton, v1, v2, v3)
        if guard <= 0:
            return forecast
        return tree_map(lambda f, x1, x2: _clamped(f, x1, x2, guard * max(1.0, abs(a))), forecast, v1, v2)


def _clamped(f: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor, limit: float) -> torch.Tensor:
    delta = f - x1
    allowed = limit * (x1 - x2).float().pow(2).mean().sqrt()
    norm = delta.float().pow(2).mean().sqrt()
    scale = (allowed / norm.clamp_min(1e-30)).clamp(max=1.0).to(delta.dtype)
    return x1 + delta * scale

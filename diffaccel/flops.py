"""FLOP counting with torch's FlopCounterMode, and the saved-FLOPs estimate behind ``stats``.

:func:`flop_counter` is ``FlopCounterMode`` with the CPU SDPA kernel counted (torch counts it as
zero FLOPs; :func:`diffaccel.compat.register_cpu_sdpa_flop_formula` adds the formula).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffaccel.compat import register_cpu_sdpa_flop_formula
from diffaccel.distributed import model_parallel_group


@contextlib.contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """``with flop_counter() as counter:`` counts the FLOPs of everything run inside, no grad."""
    register_cpu_sdpa_flop_formula()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        yield counter


def count_flops(fn, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` once and return (total FLOPs, FLOPs per module path).

    Module paths are relative to the outermost module seen (``""`` is the whole model), e.g.
    ``"down_blocks.0.attentions.0"``.
    """
    with flop_counter() as counter:
        fn(*args, **kwargs)
    per_module: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        path = name.split(".", 1)[1] if "." in name else ""
        per_module[path] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per_module


def flops_saved_fraction(session, method_stats: dict) -> float | None:
    """Estimated fraction of the denoiser FLOPs of the last call that the methods saved.

    Methods report ``skipped_modules`` ({module path: times skipped}, ``""`` = a whole denoiser
    call, fractional counts for part of a batch) and/or ``flops_saved`` (absolute FLOPs). Module
    costs come from one full denoiser forward counted with :func:`count_flops`, measured the
    first time they are needed for an input shape and cached. None under diffusers' context or
    tensor parallelism (that forward would issue collectives from a ``stats()`` call).
    """
    calls = session.ctx.denoiser_calls
    if calls == 0:
        return None
    needs_costs = any(s.get("skipped_modules") or s.get("flops_saved") for s in method_stats.values())
    if not needs_costs:
        return 0.0
    if model_parallel_group(session.adapter.denoiser) is not None:
        # Counting would run a sharded forward (collectives) from stats(), which one rank may call alone.
        return None
    try:
        costs = session.module_costs()
    except Exception:  # noqa: BLE001 - e.g. flex attention cannot run under FlopCounterMode on CPU
        return None  # unknown, never a crash of stats()
    if not costs or not costs.get(""):
        return None
    full = costs[""] * calls
    saved = 0.0
    for s in method_stats.values():
        saved += float(s.get("flops_saved", 0.0))
        for path, count in (s.get("skipped_modules") or {}).items():
            saved += costs.get(path, 0) * count
    return max(0.0, min(1.0, saved / full))

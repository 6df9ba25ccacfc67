"""FLOP counting with torch's FlopCounterMode, and the saved-FLOPs estimate behind ``stats``.

torch 2.x counts the CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) as zero
FLOPs; :func:`count_flops` registers the missing formula once so attention is counted on CPU.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count


@functools.cache
def _register_cpu_sdpa_formula() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        # query/key/value are (batch, heads, seq, head_dim), like the CUDA SDPA kernels.
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    try:
        register_flop_formula(op)(formula)
    except (RuntimeError, ValueError):  # already registered by torch itself or by a previous import
        pass


def flop_counter() -> FlopCounterMode:
    """A ``torch.utils.flop_counter.FlopCounterMode`` (no display) that also counts attention on
    CPU; use it as a context manager around any call, e.g. a whole pipeline call."""
    _register_cpu_sdpa_formula()
    return FlopCounterMode(display=False)


def count_flops(fn, *args, **kwargs) -> tuple[int, dict[str, int]]:
    """Run ``fn(*args, **kwargs)`` once and return (total FLOPs, FLOPs per module path).

    Module paths are relative to the outermost module seen (``""`` is the whole model), e.g.
    ``"down_blocks.0.attentions.0"``.
    """
    _register_cpu_sdpa_formula()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
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
    first time they are needed for an input shape and cached.
    """
    calls = session.ctx.denoiser_calls
    if calls == 0:
        return None
    needs_costs = any(s.get("skipped_modules") or s.get("flops_saved") for s in method_stats.values())
    if not needs_costs:
        return 0.0
    costs = session.module_costs()
    if not costs or not costs.get(""):
        return None
    full = costs[""] * calls
    saved = 0.0
    for s in method_stats.values():
        saved += float(s.get("flops_saved", 0.0))
        for path, count in (s.get("skipped_modules") or {}).items():
            saved += costs.get(path, 0) * count
    return max(0.0, min(1.0, saved / full))

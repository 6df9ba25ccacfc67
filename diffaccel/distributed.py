"""Rank consensus for data-dependent decisions, and only where someone asked for it.

A cache decision taken from activations ("the first block barely changed, reuse the rest") must
be the same on every rank that runs one sharded model, or the ranks take different code paths
and deadlock inside diffusers' context-parallel collectives. diffaccel talks to other ranks in
exactly two situations:

* the denoiser runs under diffusers' own parallelism (``transformer.enable_parallelism(...)``):
  the group is the one diffusers built for it (its device mesh), found on the model at call time;
* the user passed a group, ``diffaccel.accelerate(pipe, ..., process_group=pg)``, e.g. to keep
  data-parallel ranks on one schedule.

Otherwise no collective is ever issued, whatever process group exists: ranks of a data-parallel
launch (``torchrun``/``accelerate launch`` generating different seeds) each run alone, exactly as
one process would. A decision costs one all-reduce of a few scalars, outside compiled code.
"""
from __future__ import annotations

from typing import Any

import torch

WORLD = "world"  # accelerate(..., process_group=WORLD): the default group


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def context_parallel_config(model: torch.nn.Module) -> Any | None:
    """diffusers' ``ContextParallelConfig`` active on ``model`` (None when it runs unsharded)."""
    config = getattr(model, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None)


def model_parallel_group(model: torch.nn.Module):
    """The process group diffusers' parallelism (context or tensor parallel) runs ``model`` on, or None."""
    config = getattr(model, "_parallel_config", None)
    if config is None or not is_distributed():
        return None
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None) if cp is not None else None
    if mesh is None:
        mesh = getattr(config, "_mesh", None)
    if mesh is None:
        return None
    return mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group()


def check_process_group(process_group) -> None:
    """Reject anything but None, ``"world"`` or a ``torch.distributed`` process group."""
    if process_group is None or process_group == WORLD:
        return
    if not is_distributed() or not isinstance(process_group, torch.distributed.ProcessGroup):
        raise ValueError(
            f"process_group must be a torch.distributed process group (or 'world' for the default group) created "
            f"with torch.distributed.init_process_group / new_group, got {process_group!r}."
        )


def decision_group(session) -> tuple[bool, Any]:
    """``(agree, group)``: whether decisions of ``session``'s pipeline must agree across ranks, and on
    which group (None = the default group). Read at call time, so ``enable_parallelism`` may come
    before or after ``accelerate``."""
    group = model_parallel_group(session.adapter.denoiser)
    if group is not None:
        return True, group
    chosen = getattr(session, "process_group", None)
    if chosen is None or not is_distributed():
        return False, None
    return True, None if chosen == WORLD else chosen


def consensus_sum(values: torch.Tensor, session) -> torch.Tensor:
    """``values`` summed over the ranks that must agree (one all-reduce); unchanged when no rank
    consensus was asked for. Every such rank must call it equally often with equal shapes."""
    agree, group = decision_group(session)
    if not agree:
        return values
    reduced = values.detach().to(torch.float64).clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM, group=group)
    return reduced

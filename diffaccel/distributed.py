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
    chosen = session.process_group
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


# What a method supports under diffusers' context parallelism (its ``context_parallel`` class
# attribute): "any" works on the sharded layout with Ulysses and ring; "ulysses" needs the whole
# sequence in one attention call (Ulysses shards heads, ring shards the keys); "none" needs the whole
# sequence in every block.
CP_SUPPORT = ("any", "ulysses", "none")


def check_context_parallel(session) -> None:
    """Refuse, with the reason and the fix, a method that cannot be exact under the denoiser's context
    parallelism. Called when methods are installed and at every pipeline call (parallelism may be
    enabled after ``accelerate``)."""
    config = context_parallel_config(session.adapter.denoiser)
    if config is None:
        return
    ring = (getattr(config, "ring_degree", 1) or 1) > 1
    for handle in session.installed:
        support = getattr(handle.config, "context_parallel", "any")
        if support == "none" or (support == "ulysses" and ring):
            name = type(handle.config).__name__
            why = ("it needs every token of the sequence in each block, and each rank holds a shard"
                   if support == "none" else
                   "ring attention splits the keys and values across ranks, so no rank sees the whole window")
            mode = "ring" if ring else "Ulysses"
            fix = ("use ContextParallelConfig(ulysses_degree=N) instead" if support == "ulysses"
                   else "leave it out under context parallelism (a cache method such as AdaptiveCache works)")
            raise ValueError(f"{name} cannot run under diffusers' {mode} context parallelism: {why}; {fix}.")


def ulysses_order(session, seq_len: int, text_tokens: int, text_first: bool) -> torch.Tensor | None:
    """Under Ulysses, the positions that put one attention call's tokens into the global order.

    Each rank concatenates its shard of the text with its shard of the image/video tokens, and the
    all-to-all stacks the ranks' sequences: [text_0, visual_0, text_1, visual_1, ...] (Flux shards
    its text too). Attention that depends on token positions (sliding tiles, pooled mediators)
    needs [text, visual] whole. None when the call is already in global order (no Ulysses, no
    joint text, or one rank)."""
    config = context_parallel_config(session.adapter.denoiser)
    degree = getattr(config, "ulysses_degree", 1) or 1 if config is not None else 1
    if degree <= 1 or not text_tokens or seq_len % degree or text_tokens % degree:
        return None
    chunk, text = seq_len // degree, text_tokens // degree
    starts = torch.arange(degree) * chunk
    if text_first:
        texts = (starts[:, None] + torch.arange(text)).flatten()
        visuals = (starts[:, None] + text + torch.arange(chunk - text)).flatten()
        return torch.cat([texts, visuals])
    visuals = (starts[:, None] + torch.arange(chunk - text)).flatten()
    texts = (starts[:, None] + chunk - text + torch.arange(text)).flatten()
    return torch.cat([visuals, texts])

"""Shared by the caching methods: which rows of a call belong to which CFG half, running a module
on some rows only, and reusing an attention module's output per CFG half.

Cached activations are kept per CFG half ("cond", "uncond"), never per denoiser call: with
batched CFG one call holds both halves ([uncond, cond] in diffusers' order; the adapter says),
with separate CFG calls (Wan, Flux true-CFG, HunyuanVideo) each call holds one. The session
states which in ``ctx.cfg`` (:class:`~diffaccel.state.CfgLayout`); keying the caches by the half
makes both forms give the same result, and a half's cache can never stand in for the other's.
Inside a denoiser, modules may see more rows than the call's batch (Latte flattens frames into
the batch, sample-major), so a half is a contiguous share of the rows, not a count.
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Callable

import torch

from diffaccel.hooks import Installed, hook_forward
from diffaccel.methods.attention_intercept import count_module_backend
from diffaccel.state import CallContext


def cfg_half_rows(ctx: CallContext, rows: int) -> list[tuple[str, slice]]:
    """(CFG half, row slice) for a module input with ``rows`` rows in the running call."""
    halves = ctx.cfg.halves
    if rows % len(halves):
        raise RuntimeError(f"diffaccel: a batch of {rows} rows cannot hold {len(halves)} equal CFG halves.")
    share = rows // len(halves)
    return [(half, slice(i * share, (i + 1) * share)) for i, half in enumerate(halves)]


def take_rows(obj: Any, rows: int, sl: slice) -> Any:
    """``obj`` with every tensor whose first dimension is ``rows`` cut to ``sl`` (recursively).

    Tensors with another first dimension (rotary tables, shared masks) pass unchanged.
    """
    if isinstance(obj, torch.Tensor):
        return obj[sl] if obj.dim() > 0 and obj.shape[0] == rows else obj
    if isinstance(obj, tuple):
        return tuple(take_rows(o, rows, sl) for o in obj)
    if isinstance(obj, list):
        return [take_rows(o, rows, sl) for o in obj]
    if isinstance(obj, dict):
        return {k: take_rows(v, rows, sl) for k, v in obj.items()}
    return obj


def cat_rows(parts: list) -> Any:
    """Concatenate per-half outputs (tensors or tuples of tensors/None) along the rows."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if first is None:
        return None
    return type(first)(cat_rows([p[i] for p in parts]) for i in range(len(first)))


def tree_map(fn: Callable, *trees: Any) -> Any:
    """Apply ``fn`` leaf-wise over matching tensors / tuples; None leaves stay None."""
    first = trees[0]
    if first is None or any(t is None for t in trees):
        return None
    if isinstance(first, torch.Tensor):
        return fn(*trees)
    return type(first)(tree_map(fn, *parts) for parts in zip(*trees))


def prediction_of(out) -> torch.Tensor:
    """The prediction tensor of a denoiser output (a tensor, a tuple, or an output with ``sample``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.sample


def with_prediction(template, pred: torch.Tensor):
    """``template`` (a denoiser output) holding ``pred`` as its prediction."""
    if isinstance(template, torch.Tensor):
        return pred
    if isinstance(template, tuple):
        return (pred, *template[1:])
    out = copy.copy(template)
    out.sample = pred
    return out


class CfgHalves:
    """CFG plumbing shared by the methods that skip the unconditional half (CfgCache, FasterCache).

    With batched CFG a call runs the conditional rows alone and gets the unconditional ones back
    from ``rebuild(cond)``; with one call per half, the conditional call's prediction is kept and
    the unconditional call of the same step is answered from it without running.
    """

    def __init__(self, installed: Installed):
        self.installed = installed
        self.reset()

    def reset(self) -> None:
        self.cond_now: tuple[int, torch.Tensor, object] | None = None  # separate CFG: (step, cond prediction, output)

    def can_answer(self, ctx: CallContext) -> bool:
        """A separate unconditional call that the conditional call of its step can answer."""
        return ctx.cfg.halves == ("uncond",) and self.cond_now is not None and self.cond_now[0] == ctx.step

    def run_cond_only(self, original: Callable, args: tuple, kwargs: dict, rebuild: Callable):
        """Batched CFG: run the conditional rows alone, return both halves (the other from ``rebuild``)."""
        args, kwargs = self._cond_inputs(args, kwargs)
        with self.installed.session.ctx.uncond_dropped():  # methods inside see the conditional rows alone
            out = original(*args, **kwargs)
        return self._both_halves(out, rebuild)

    @torch.compiler.disable
    def _cond_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = int(self.installed.session.ctx.batch_size)
        half = rows // 2
        sl = slice(half, rows) if self.installed.session.adapter.batched_cfg_order[1] == "cond" else slice(0, half)
        self.installed.count_skipped("", 0.5)
        return take_rows(args, rows, sl), take_rows(kwargs, rows, sl)

    @torch.compiler.disable
    def _both_halves(self, out, rebuild: Callable):
        cond = prediction_of(out)
        uncond = rebuild(cond)
        order = self.installed.session.adapter.batched_cfg_order
        return with_prediction(out, torch.cat((uncond, cond) if order[0] == "uncond" else (cond, uncond), dim=0))

    @torch.compiler.disable
    def answer(self, rebuild: Callable):
        """Separate CFG: the unconditional call's output, from the conditional one of the step."""
        self.installed.count_skipped("", 1.0)
        _, cond, template = self.cond_now
        return with_prediction(template, rebuild(cond))

    @torch.compiler.disable
    def after_run(self, out, keep: Callable) -> None:
        """After a call that ran every half it holds: ``keep(uncond, cond)`` once both are known."""
        ctx = self.installed.session.ctx
        if not ctx.active:
            return
        pred = prediction_of(out)
        if ctx.cfg.batched:
            half = pred.shape[0] // 2
            first, second = pred[:half], pred[half:]
            order = self.installed.session.adapter.batched_cfg_order
            keep(*((first, second) if order[0] == "uncond" else (second, first)))
        elif ctx.cfg.halves == ("cond",):
            self.cond_now = (ctx.step, pred, out)
        elif self.can_answer(ctx):
            keep(pred, self.cond_now[1])


def num_rows(args: tuple, kwargs: dict) -> int:
    """Rows of a module call: the first dimension of its hidden states."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor):
        x = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    return int(x.shape[0])


class ArgReader:
    """Reads a forward argument by name whether it came by position or keyword."""

    def __init__(self, forward: Callable):
        self.positions = {n: i for i, n in enumerate(inspect.signature(forward).parameters)}

    def get(self, args: tuple, kwargs: dict, name: str):
        if name in kwargs:
            return kwargs[name]
        i = self.positions.get(name)
        return args[i] if i is not None and i < len(args) else None


def run_rows(original: Callable, args: tuple, kwargs: dict, rows: int, sl: slice):
    """Run ``original`` on the rows ``sl`` of its batched inputs only."""
    if sl == slice(0, rows):
        return original(*args, **kwargs)
    return original(*take_rows(args, rows, sl), **take_rows(kwargs, rows, sl))


class AttentionReuse:
    """Hook on one attention module: per CFG half, compute it or reuse its last output.

    A half reuses when the call's normalised time lies inside ``t_range`` (open interval) and
    that half last computed this module fewer than ``interval`` steps ago. ``extrapolation``
    > 0 extends the trend of the last two computed outputs (FasterCache); 0 repeats the last
    one (Pyramid Attention Broadcast). Each half has its own history, so the reuse works
    whether the call holds both CFG halves, the conditional half only, or one separate call.
    Only the mode ("run"/"reuse"/"mixed") reaches compiled code; decisions run eagerly.
    """

    def __init__(self, installed: Installed, info, interval: int, t_range: tuple[float, float], extrapolation: float = 0.0):
        self.installed, self.info = installed, info
        self.interval, self.t_range, self.extrapolation = interval, t_range, extrapolation
        self.reset()
        hook_forward(installed, info.module, self.forward, f"diffaccel_{installed.config.name}")

    def reset(self) -> None:
        self.history: dict[str, list[tuple[int, Any]]] = {}  # CFG half -> [(step, output rows)], last two
        self.plan: list[tuple[str, slice, bool]] = []  # (CFG half, rows, compute) of the running call

    def forward(self, original, *args, **kwargs):
        mode = self._mode(args, kwargs)
        if mode == "run":
            out = original(*args, **kwargs)
            self._store(out)
            return out
        if mode == "reuse":
            return self._reused()
        return self._mixed(original, args, kwargs)

    @torch.compiler.disable
    def _mode(self, args, kwargs) -> str:
        ctx = self.installed.session.ctx
        self.plan = []
        if not ctx.active:
            return "run"
        lo, hi = self.t_range
        in_range = ctx.t_norm is not None and lo < ctx.t_norm < hi
        for half, sl in cfg_half_rows(ctx, num_rows(args, kwargs)):
            past = self.history.get(half)
            compute = not (in_range and past and ctx.step - past[-1][0] < self.interval)
            self.plan.append((half, sl, compute))
            self.installed.count("computed" if compute else "reused")
            if not compute:
                self.installed.count_skipped(self.info.name, ctx.cfg.row_share)
        computes = [c for _, _, c in self.plan]
        if any(computes):
            count_module_backend(self.installed, self.info.module)
        return "run" if all(computes) else "reuse" if not any(computes) else "mixed"

    @torch.compiler.disable
    def _store(self, out, plan=None) -> None:
        step = self.installed.session.ctx.step
        for half, sl, _ in plan or self.plan:
            past = self.history.setdefault(half, [])
            past.append((step, tree_map(lambda o: o[sl], out)))
            del past[:-2]

    def _approximation(self, half: str):
        past = self.history[half]
        (s1, a1) = past[-1]
        if self.extrapolation == 0 or len(past) < 2:
            return a1
        (s2, a2) = past[-2]
        # Linear trend per step between the last two computes, damped by ``extrapolation``.
        scale = self.extrapolation * (self.installed.session.ctx.step - s1) / max(s1 - s2, 1)
        return tree_map(lambda x1, x2: x1 + scale * (x1 - x2), a1, a2)

    @torch.compiler.disable
    def _reused(self):
        return cat_rows([self._approximation(half) for half, _, _ in self.plan])

    @torch.compiler.disable
    def _mixed(self, original, args, kwargs):
        rows = num_rows(args, kwargs)
        parts = []
        for half, sl, compute in self.plan:
            if compute:
                out = run_rows(original, args, kwargs, rows, sl)
                self._store(out, [(half, slice(None), True)])
                parts.append(out)
            else:
                parts.append(self._approximation(half))
        return cat_rows(parts)


class BlockStackCache(Installed):
    """Hooks on every block of the denoiser's stack, for methods that reuse the stack's residual
    (AdaptiveCache, StepCache). Each block call takes one of three ways, decided by ``_mode``:
    "run" (every CFG half computes; ``_after_run`` records), "reuse" (no half computes: ``_reuse``)
    or "mixed" (one half computes on its rows, the other reuses). Subclasses keep ``self.plan``,
    the (CFG half, compute) pairs of the running step in row order, and implement ``_mode``,
    ``_after_run``, ``_record`` and ``_reused_rows``."""

    def _hook_blocks(self, session, hook_prefix: str) -> None:
        adapter = session.adapter
        blocks = adapter.blocks()
        self.outputs = adapter.block_outputs
        # Latte reshapes between blocks: keep one residual per block instead of one for the stack.
        self.per_block = not adapter.blocks_keep_layout
        self.names = [name for name, _ in blocks]
        self.none_outputs: dict[int, tuple[bool, ...]] = {}
        self.reset_cache()
        for index, (_, block) in enumerate(blocks):
            reader = ArgReader(block.forward)
            hook_forward(self, block, functools.partial(self._forward, index, reader), f"{hook_prefix}_{index}")

    # ---- the hook runs eagerly; the block it calls is compiled as one graph for all blocks ----
    @functools.partial(torch.compiler.disable, recursive=False)
    def _forward(self, index, reader, original, *args, **kwargs):
        mode = self._mode(index, reader, args, kwargs)
        if mode == "run":
            out = original(*args, **kwargs)
            self._after_run(index, reader, args, kwargs, out)
            return out
        if mode == "reuse":
            return self._reuse(index, reader, args, kwargs)
        return self._mixed(index, reader, original, args, kwargs)

    def _time(self) -> float:
        """Where the running step is, for forecasts: normalised time (or minus the step index)."""
        ctx = self.session.ctx
        return float(ctx.t_norm) if ctx.t_norm is not None else -float(ctx.step)

    def _inputs(self, reader, args, kwargs, rows, sl):
        """The block's inputs in its output format (identity of a skipped block), rows ``sl``."""
        vals = [reader.get(args, kwargs, n) for n in self.outputs]
        vals = [v[sl] if isinstance(v, torch.Tensor) and v.shape[0] == rows else v for v in vals]
        return vals[0] if len(vals) == 1 else tuple(vals)

    def _identity(self, index, reader, args, kwargs, rows, sl):
        """What a skipped block returns before any residual: its inputs, rows ``sl``."""
        identity = self._inputs(reader, args, kwargs, rows, sl)
        nones = self.none_outputs.get(index)
        if nones is not None:  # e.g. SD3's last block returns no text stream
            identity = tuple(None if none else v for v, none in zip(identity, nones))
        return identity

    def _note_outputs(self, index, out) -> None:
        if isinstance(out, tuple):
            self.none_outputs[index] = tuple(o is None for o in out)

    @torch.compiler.disable
    def _reuse(self, index, reader, args, kwargs):
        # Rows are cut per block: Latte's temporal blocks hold more rows than its spatial ones.
        rows = num_rows(args, kwargs)
        groups = cfg_half_rows(self.session.ctx, rows)
        return cat_rows([self._reused_rows(index, reader, args, kwargs, rows, half, sl)
                         for (half, _), (_, sl) in zip(self.plan, groups)])

    @torch.compiler.disable
    def _mixed(self, index, reader, original, args, kwargs):
        # One half computes, the other reuses: run the block on the computing rows only.
        rows = num_rows(args, kwargs)
        parts = []
        for (half, compute), (_, sl) in zip(self.plan, cfg_half_rows(self.session.ctx, rows)):
            if compute:
                out = run_rows(original, args, kwargs, rows, sl)
                n = sl.stop - sl.start
                self._record(index, reader, take_rows(args, rows, sl), take_rows(kwargs, rows, sl), out, n, half, slice(0, n))
                parts.append(out)
            else:
                parts.append(self._reused_rows(index, reader, args, kwargs, rows, half, sl))
        return cat_rows(parts)

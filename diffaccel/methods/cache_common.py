"""Shared by the caching methods: which rows of a call belong to which CFG branch, and
running a module on some rows only.

Cached activations are kept per CFG branch ("cond", "uncond"), never per denoiser call: with
batched CFG one call holds both branches as halves ([uncond, cond] in
diffusers' order; the adapter says); with separate CFG (Wan,
Flux true-CFG, HunyuanVideo) call 0 is "cond" and call 1 is "uncond". Keying the caches by the
branch name makes both forms give the same result, and a branch's cache can never stand in for
the other's. Inside a denoiser, modules may see more rows than the call's batch (Latte flattens
frames into the batch, sample-major), so a branch is a contiguous share of the rows, not a count.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from diffaccel.state import cfg_active

# Set on the session by FasterCache's CFG-Cache for the current denoiser call when it ran the
# conditional rows only: the call then holds the "cond" branch alone.
UNCOND_DROPPED = "_diffaccel_uncond_dropped"


def batched_cfg(session) -> bool:
    """Whether the current call batches CFG as [uncond, cond] halves."""
    if session.adapter.cfg_mode != "batched":
        return False
    known = cfg_active(session.pipe)
    if known is not None:
        return known
    # PixArt, CogVideoX and DiT decide CFG in a local variable. Their batched-CFG input is
    # torch.cat([latents] * 2): identical halves, which samples of one batch never are.
    ctx = session.ctx
    cached = getattr(session, "_diffaccel_cfg_guess", None)
    if cached is None or cached[0] is not ctx:
        cached = (ctx, _identical_halves(session._probe))
        setattr(session, "_diffaccel_cfg_guess", cached)
    return cached[1]


def _identical_halves(probe) -> bool:
    if probe is None:
        return False
    args, kwargs = probe
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor) or x.shape[0] % 2:
        return False
    half = x.shape[0] // 2
    return bool(torch.equal(x[:half], x[half:]))


def branch_names(session) -> list[str]:
    """The CFG branches held by the current denoiser call, in row order."""
    if batched_cfg(session) and not getattr(session, UNCOND_DROPPED, False):
        return list(session.adapter.batched_cfg_order)
    branch = session.ctx.branch
    return [("cond", "uncond")[branch] if branch < 2 else f"branch{branch}"]


def branch_rows(session, rows: int) -> list[tuple[str, slice]]:
    """(branch name, row slice) for a module input with ``rows`` rows in the current call."""
    names = branch_names(session)
    if rows % len(names):
        raise RuntimeError(f"diffaccel: a batch of {rows} rows cannot hold {len(names)} equal CFG halves.")
    share = rows // len(names)
    return [(name, slice(i * share, (i + 1) * share)) for i, name in enumerate(names)]


def row_share(session) -> float:
    """Fraction of a full denoiser call one branch stands for (for FLOP stats): half with batched
    CFG (also when CFG-Cache dropped the other half), the whole call with separate calls."""
    return 0.5 if batched_cfg(session) else 1.0


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
    """Concatenate per-branch outputs (tensors or tuples of tensors/None) along the rows."""
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
    """Hook on one attention module: per CFG branch, compute it or reuse its last output.

    A branch reuses when the call's normalised time lies inside ``t_range`` (open interval) and
    that branch last computed this module fewer than ``interval`` steps ago. ``extrapolation``
    > 0 extends the trend of the last two computed outputs (FasterCache); 0 repeats the last
    one (Pyramid Attention Broadcast). Each branch has its own history, so the reuse works
    whether the call holds both CFG halves, the conditional half only, or one separate call.
    Only the mode ("run"/"reuse"/"mixed") reaches compiled code; decisions run eagerly.
    """

    def __init__(self, installed, info, interval: int, t_range: tuple[float, float], extrapolation: float = 0.0):
        from diffaccel.methods.base import hook_forward

        self.installed, self.info = installed, info
        self.interval, self.t_range, self.extrapolation = interval, t_range, extrapolation
        self.reset()
        hook_forward(installed, info.module, self.forward, f"diffaccel_{installed.config.name}")

    def reset(self) -> None:
        self.history: dict[str, list[tuple[int, Any]]] = {}  # branch -> [(step, output rows)], last two
        self.plan: list[tuple[str, slice, bool]] = []

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
        session = self.installed.session
        ctx = session.ctx
        if not ctx.active:
            self.plan = []
            return "run"
        lo, hi = self.t_range
        in_range = ctx.t_norm is not None and lo < ctx.t_norm < hi
        self.plan = []
        for name, sl in branch_rows(session, num_rows(args, kwargs)):
            past = self.history.get(name)
            compute = not (in_range and past and ctx.step - past[-1][0] < self.interval)
            self.plan.append((name, sl, compute))
            self.installed.count("computed" if compute else "reused")
            if not compute:
                skipped = self.installed.counters.setdefault("skipped_modules", {})
                skipped[self.info.name] = skipped.get(self.info.name, 0.0) + row_share(session)
        computes = [c for _, _, c in self.plan]
        return "run" if all(computes) else "reuse" if not any(computes) else "mixed"

    @torch.compiler.disable
    def _store(self, out, plan=None) -> None:
        step = self.installed.session.ctx.step
        for name, sl, _ in plan or self.plan:
            past = self.history.setdefault(name, [])
            past.append((step, tree_map(lambda o: o[sl], out)))
            del past[:-2]

    def _approximation(self, name: str):
        past = self.history[name]
        (s1, a1) = past[-1]
        if self.extrapolation == 0 or len(past) < 2:
            return a1
        (s2, a2) = past[-2]
        # Linear trend per step between the last two computes, damped by ``extrapolation``.
        scale = self.extrapolation * (self.installed.session.ctx.step - s1) / max(s1 - s2, 1)
        return tree_map(lambda x1, x2: x1 + scale * (x1 - x2), a1, a2)

    @torch.compiler.disable
    def _reused(self):
        return cat_rows([self._approximation(name) for name, _, _ in self.plan])

    @torch.compiler.disable
    def _mixed(self, original, args, kwargs):
        rows = num_rows(args, kwargs)
        parts = []
        for name, sl, compute in self.plan:
            if compute:
                out = run_rows(original, args, kwargs, rows, sl)
                self._store(out, [(name, slice(None), True)])
                parts.append(out)
            else:
                parts.append(self._approximation(name))
        return cat_rows(parts)

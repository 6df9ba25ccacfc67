"""StepCache: skip whole denoising steps of a DiT on a schedule planned in advance.

On a skipped step no block runs (the first one included): the block stack's output is its input
plus the stack's residual (output - input) from the last computed steps, forecast to the step's
time (:mod:`diffaccel.methods.forecast`, order 0 / 1 / 2). Only the patch embedding and the output
head run. This is MagCache's and LeMiCa's whole-step reuse, with three differences: the residual is
extrapolated in the scheduler's normalised time rather than repeated, the schedule can come from a
global plan over measured reuse errors (``diffaccel/profiler/plan_step_cache.py``), and every
step's decision is known before the call starts.

Which steps compute:

* ``mask`` given (what the planner produces): ``mask[i]`` for step ``i``; its length must be the
  call's number of steps (with a profile, :class:`~diffaccel.profiler.schedule.ProfileSchedule`
  re-plans it for every call's timesteps).
* otherwise a rule on normalised time: the first ``retention`` share of steps and the last
  ``final_steps`` steps compute; in between a step is skipped while the change accumulated since
  the last computed step stays under ``threshold`` and fewer than ``max_consecutive`` steps in a
  row were skipped. The change is read from ``curve`` (cumulative change against normalised time,
  e.g. a profile's curve; MagCache's accumulated ratio is one such signal) or, without one, is the
  normalised time elapsed.

Either way the decisions depend on the call's timesteps only: identical on every rank, for every
prompt, and nothing data-dependent reaches compiled code. ``veto`` > 0 adds an optional run-time
check: a planned skip computes anyway where the stack's input moved more than ``veto`` (relative
L1, mean over the CFG halves and, under torch.distributed, over ranks) since the last computed step.

State (the residual history, the stack input of the last compute) is kept per CFG half.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.StepCache(threshold=0.15, forecast_order=1)])
    video = pipe("a red circle moving left").frames[0]
    print(diffaccel.stats(pipe)["methods"]["step_cache"])   # computed / reused steps per CFG half
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffaccel.distributed import consensus_sum
from diffaccel.families import Capability
from diffaccel.methods.base import Installed, Method, register
from diffaccel.methods.cache_common import BlockStackCache, cfg_half_rows, num_rows, tree_map
from diffaccel.methods.forecast import ORDERS, History
from diffaccel.validate import at_least, non_negative_int, positive_int


@register
@dataclass(frozen=True)
class StepCache(Method):
    """Whole-step skipping with forecast residuals for image and video DiTs.

    Attributes:
        threshold: change (on ``curve``, or normalised time without one) that may accumulate over
            skipped steps since the last computed one (0 computes every step).
        retention: share of the first steps that always compute (MagCache's retention ratio).
        final_steps: number of last steps that always compute.
        max_consecutive: most steps in a row that may be skipped.
        forecast_order: 0 repeats the last residual, 1 / 2 extrapolate the last 2 / 3 computed ones.
        guard: the forecast's change is at most ``guard`` times the last observed change per step
            interval (0: unbounded).
        mask: explicit schedule, one bool per step (True computes); overrides the rule.
        forecast_orders: with ``mask``, the forecast order of each step where it is skipped (one int
            per step; None: ``forecast_order`` everywhere). Plans choose the order per skip.
        curve: ``((t, cumulative change), ...)`` sorted by t, read by the rule.
        veto: relative change of the stack input since the last compute above which a planned skip
            computes anyway (0: off, the schedule is followed exactly).
        min_psnr: where a profile with a measured step graph is known for the model (shipped with it
            or given), each call runs the fastest schedule planned for this predicted PSNR (dB) at
            the call's timesteps; the rule above applies where there is none (None: always the rule).
    """

    name: ClassVar[str] = "step_cache"
    requires: ClassVar[Capability] = Capability.BLOCK_CACHING

    threshold: float = 0.12
    retention: float = 0.2
    final_steps: int = 1
    max_consecutive: int = 1
    forecast_order: int = 1
    guard: float = 2.0
    mask: tuple[bool, ...] | None = None
    forecast_orders: tuple[int, ...] | None = None
    curve: tuple[tuple[float, float], ...] | None = None
    veto: float = 0.0
    min_psnr: float | None = None

    def validate(self) -> None:
        at_least(self.threshold, "StepCache(threshold=...)", 0.0, "0 computes every step; larger skips more.")
        if not 0.0 <= self.retention <= 1.0:
            raise ValueError(f"StepCache(retention={self.retention!r}) must be a share of the steps in [0, 1] (e.g. 0.2).")
        non_negative_int(self.final_steps, "StepCache(final_steps=...)", "It counts the last steps, which always compute.")
        positive_int(self.max_consecutive, "StepCache(max_consecutive=...)", "Use 1 to never skip two steps in a row.")
        if isinstance(self.forecast_order, bool) or self.forecast_order not in ORDERS:
            raise ValueError(f"StepCache(forecast_order={self.forecast_order!r}) must be 0, 1 or 2 (0 repeats the last residual).")
        at_least(self.guard, "StepCache(guard=...)", 0.0, "0 leaves the forecast unbounded; 2 is a safe bound.")
        at_least(self.veto, "StepCache(veto=...)", 0.0, "0 turns the run-time check off.")
        if self.min_psnr is not None:
            at_least(self.min_psnr, "StepCache(min_psnr=...)", 0.0, "A PSNR in dB, e.g. 30; None follows the rule.")
        if self.mask is not None and not all(isinstance(b, bool) for b in self.mask):
            raise ValueError("StepCache(mask=...) must hold one bool per step (True computes the step).")
        if self.forecast_orders is not None and (
                self.mask is None or len(self.forecast_orders) != len(self.mask)
                or any(isinstance(o, bool) or o not in ORDERS for o in self.forecast_orders)):
            raise ValueError("StepCache(forecast_orders=...) needs a mask of the same length and holds 0, 1 or 2 per step.")
        if self.curve is not None and (len(self.curve) < 2 or any(len(p) != 2 for p in self.curve)):
            raise ValueError("StepCache(curve=...) must hold at least two (t, cumulative change) pairs.")

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        return StepCacheInstalled(self, session)


def step_schedule(config: StepCache, times: list[float]) -> list[bool]:
    """Per step of a call at normalised ``times``: whether it computes (True) or is skipped."""
    n = len(times)
    if config.mask is not None:
        if len(config.mask) != n:
            raise ValueError(f"StepCache(mask=...) has {len(config.mask)} entries but the call runs {n} steps; "
                             "plan the mask for this step count (or give a profile so it is planned per call).")
        return [bool(b) for b in config.mask]
    head = max(1, math.ceil(config.retention * n))
    level = _curve(config.curve)
    computed, last, run = [], 0, 0
    for i, t in enumerate(times):
        compute = (i < head or i >= n - config.final_steps or run >= config.max_consecutive
                   or abs(level(t) - level(times[last])) >= config.threshold)
        last, run = (i, 0) if compute else (last, run + 1)
        computed.append(compute)
    return computed


def _curve(points):
    """Cumulative change as a function of normalised time (piecewise linear; identity without points)."""
    if points is None:
        return lambda t: t
    ts, vs = [float(p[0]) for p in points], [float(p[1]) for p in points]

    def level(t: float) -> float:
        j = min(max(bisect.bisect_left(ts, t), 1), len(ts) - 1)
        w = (t - ts[j - 1]) / ((ts[j] - ts[j - 1]) or 1.0)
        return vs[j - 1] + min(max(w, 0.0), 1.0) * (vs[j] - vs[j - 1])

    return level


@dataclass
class _HalfState:
    """What one CFG half remembers between steps."""

    history: History = field(default_factory=History)  # stack residuals of the last computes
    blocks: dict = field(default_factory=dict)  # block index -> History (per-block mode)
    entry: Any = None  # stack input of the running computed step
    anchor: torch.Tensor | None = None  # stack input of the last computed step (veto)


class StepCacheInstalled(BlockStackCache):
    """Hooks on every block; block 0 takes the step's decision, the last block adds the forecast."""

    def __init__(self, config: StepCache, session):
        super().__init__(config, session)
        self.last = len(session.adapter.blocks()) - 1
        self._hook_blocks(session, "diffaccel_step_cache")

    def reset_cache(self) -> None:
        self.halves: dict[str, _HalfState] = {}
        self.plan: list[tuple[str, bool]] = []  # (CFG half, compute) in row order, this denoiser call
        self.schedule: list[bool] | None = None  # per step of the running call
        self.none_outputs: dict[int, tuple[bool, ...]] = {}
        self.vetoed = 0

    # ---- the hook: only "mode" reaches compiled code (BlockStackCache dispatches) -----
    @torch.compiler.disable
    def _mode(self, index, reader, args, kwargs) -> str:
        if not self.session.ctx.active:
            return "run"
        if index == 0:
            self.plan = self._decide(reader, args, kwargs)
        computes = [c for _, c in self.plan]
        return "run" if all(computes) else "reuse" if not any(computes) else "mixed"

    @torch.compiler.disable
    def _after_run(self, index, reader, args, kwargs, out) -> None:
        if not self.session.ctx.active:
            return
        if not self.per_block and index not in (0, self.last):  # the stack's residual needs its ends only
            self._note_outputs(index, out)
            return
        rows = num_rows(args, kwargs)
        for (half, _), (_, sl) in zip(self.plan, cfg_half_rows(self.session.ctx, rows)):
            self._record(index, reader, args, kwargs, out, rows, half, sl)

    # ---- decisions ---------------------------------------------------------------------
    def _planned(self, step: int) -> bool:
        if self.schedule is None:
            self.schedule = step_schedule(self.call_config(), self.session.call_times())
        return step >= len(self.schedule) or self.schedule[step]

    def _decide(self, reader, args, kwargs) -> list[tuple[str, bool]]:
        config, ctx = self.call_config(), self.session.ctx
        x = reader.get(args, kwargs, "hidden_states")
        groups = cfg_half_rows(ctx, num_rows(args, kwargs))
        states = [self.halves.setdefault(half, _HalfState()) for half, _ in groups]
        planned = self._planned(ctx.step)
        ready = [bool(s.blocks) if self.per_block else bool(s.history.items) for s in states]
        if not planned and config.veto > 0 and all(ready) and isinstance(x, torch.Tensor):
            sums = [torch.stack([(x[sl].float() - s.anchor).abs().sum(), s.anchor.abs().sum()]).double()
                    if s.anchor is not None else torch.zeros(2, dtype=torch.float64, device=x.device)
                    for (_, sl), s in zip(groups, states)]
            # At most one collective per planned skip (only when ranks must agree, see
            # diffaccel.distributed): sums, so under context parallelism it is the whole-sequence change.
            totals = consensus_sum(torch.stack(sums), self.session).tolist()
            change = [num / max(den, 1e-12) for num, den in totals]
            if sum(change) / len(change) > config.veto:
                planned = True
                self.vetoed += 1
        plan = []
        for (half, sl), state, has_cache in zip(groups, states, ready):
            compute = planned or not has_cache
            self.count("computed" if compute else "reused")
            if compute and config.veto > 0 and isinstance(x, torch.Tensor):
                state.anchor = x[sl].detach().float()
            if not compute:
                for block in self.names:
                    self.count_skipped(block, ctx.cfg.row_share)
            plan.append((half, compute))
        return plan

    # ---- residual bookkeeping ----------------------------------------------------------
    def _record(self, index, reader, args, kwargs, out, rows, half, sl) -> None:
        state = self.halves[half]
        self._note_outputs(index, out)
        if self.per_block:
            out_rows = tree_map(lambda o: o[sl].detach(), out)
            residual = tree_map(torch.sub, out_rows, self._inputs(reader, args, kwargs, rows, sl))
            state.blocks.setdefault(index, History(self._keep())).push(self._time(), residual)
            return
        if index == 0:
            state.entry = tree_map(torch.Tensor.detach, self._inputs(reader, args, kwargs, rows, sl))
        if index == self.last:
            out_rows = tree_map(lambda o: o[sl].detach(), out)
            state.history.keep = self._keep()
            state.history.push(self._time(), tree_map(torch.sub, out_rows, state.entry))
            state.entry = None

    def _keep(self) -> int:
        config = self.call_config()
        return max(config.forecast_order, *(config.forecast_orders or (0,))) + 1

    def _reused_rows(self, index, reader, args, kwargs, rows, half, sl):
        config, state = self.call_config(), self.halves[half]
        identity = self._identity(index, reader, args, kwargs, rows, sl)
        if self.per_block:
            history = state.blocks[index]
        elif index == self.last:
            history = state.history
        else:
            return identity
        order = config.forecast_order
        if config.forecast_orders is not None and self.session.ctx.step < len(config.forecast_orders):
            order = config.forecast_orders[self.session.ctx.step]
        residual = history.forecast(self._time(), order, config.guard)
        return tree_map(torch.add, identity, residual)

    @torch.compiler.disable
    def _reuse(self, index, reader, args, kwargs):
        if not self.per_block and index != self.last:  # the forecast is added once, at the last block
            rows = num_rows(args, kwargs)
            return self._identity(index, reader, args, kwargs, rows, slice(0, rows))
        return super()._reuse(index, reader, args, kwargs)

    def stats(self) -> dict:
        out = dict(self.counters)
        if self.schedule is not None:
            out["computed_steps"] = [i for i, c in enumerate(self.schedule) if c]
        if (self._call_config or self.config).veto > 0:
            out["vetoed"] = self.vetoed
        if self.config.min_psnr is not None and self.config.name not in self.session.providers:
            out["why"] = f"min_psnr={self.config.min_psnr:g} not planned (no profile with a step graph): the generic rule ran"
        return out

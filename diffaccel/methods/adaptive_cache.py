"""AdaptiveCache: skip the middle of a DiT when its first blocks say little has changed.

Block-residual caching in the manner of FirstBlockCache, TeaCache and cache-dit's DBCache. The
first ``head_blocks`` blocks always run. The relative change of their residual since the
previous step, ``d = mean|r - r_prev| / mean|r_prev|``, is accumulated; while the sum stays
under ``threshold`` the remaining blocks are skipped and their residual from the last full step
is added instead; the last ``tail_blocks`` blocks can run anyway as a corrector.
``reference="last_computed"`` instead compares ``r`` with the head residual of the last computed
step (the state the cached residual belongs to) and does not accumulate, so back-and-forth
wobble of the signal does not count as drift.

Why it is built this way:

* The decision and every cached tensor are kept per CFG half: a conditional call is never
  compared with an unconditional one, and with batched CFG each half decides for itself (a half
  that must compute runs alone), so batched and separate CFG give the same result.
* A decision covers a whole half of the batch (over all its samples). When ranks must agree
  (diffusers' context parallelism on the denoiser, or ``accelerate(..., process_group=pg)``) the
  change is measured over all ranks' tokens (one all-reduce of the sums), so every rank takes the
  same path, and under context parallelism the path one process would take; otherwise no
  collective is issued.
* ``warmup`` first steps always compute, and at most ``max_consecutive`` steps in a row reuse.
* The decision code is excluded from torch.compile; only the mode of a block ("run" / "reuse" /
  "mixed") reaches compiled code, so steps do not trigger recompilation.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.1)])
    image = pipe("a red circle").images[0]
    print(diffaccel.stats(pipe)["methods"]["adaptive_cache"])   # computed / reused per CFG half and step
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffaccel.distributed import consensus_sum
from diffaccel.families import Capability
from diffaccel.methods.base import Installed, Method, register
from diffaccel.methods.cache_common import BlockStackCache, cfg_half_rows, num_rows, tree_map
from diffaccel.methods.forecast import ORDERS, History
from diffaccel.validate import at_least, non_negative_int, one_of, positive_int

REFERENCES = ("previous", "last_computed")


@register
@dataclass(frozen=True)
class AdaptiveCache(Method):
    """Data-dependent block-residual caching for image and video DiTs.

    Attributes:
        threshold: accumulated relative change of the head residual below which the remaining
            blocks are reused (0 computes everything; typical 0.05-0.25).
        warmup: number of first denoising steps that always compute.
        max_consecutive: most steps in a row that may reuse before a full step is forced.
        head_blocks: blocks that always run and provide the change signal (>= 1).
        tail_blocks: last blocks that always run, correcting the reused residual (>= 0).
        reference: ``"previous"`` accumulates the change from step to step; ``"last_computed"``
            measures the change since the last computed step (FirstBlockCache's rule).
        noise_floor: part of each step's measured change that is noise, subtracted before it
            counts (``max(0, d - noise_floor)``). Quantized attention (Sage, int8) or FP8
            weights/activations add a floor to ``d`` that would otherwise keep the cache from
            reusing; measure it once per model and quantization (eval/quantized_noise_floor.py:
            median excess of ``d`` over the unquantized run) and pass it here, so a threshold
            means the same with and without quantization. 0 = no correction.
        forecast_order: 0 adds the cached residual as it is; 1 / 2 extrapolate the residuals of the
            last 2 / 3 full steps to the step's normalised time (:mod:`diffaccel.methods.forecast`).
        guard: bound on the forecast's change, in multiples of the last observed change (0: none).
    """

    name: ClassVar[str] = "adaptive_cache"
    requires: ClassVar[Capability] = Capability.BLOCK_CACHING

    threshold: float = 0.1
    warmup: int = 2
    max_consecutive: int = 3
    head_blocks: int = 1
    tail_blocks: int = 0
    reference: str = "previous"
    noise_floor: float = 0.0
    forecast_order: int = 0
    guard: float = 2.0

    def validate(self) -> None:
        at_least(self.threshold, "AdaptiveCache(threshold=...)", 0.0,
                 "0 computes every step, 0.05-0.25 is the usual range (higher = faster, less faithful).")
        non_negative_int(self.warmup, "AdaptiveCache(warmup=...)", "It counts the first steps, which always compute.")
        positive_int(self.max_consecutive, "AdaptiveCache(max_consecutive=...)", "Use 1 to never reuse twice in a row.")
        positive_int(self.head_blocks, "AdaptiveCache(head_blocks=...)", "At least the first block must run to measure change.")
        non_negative_int(self.tail_blocks, "AdaptiveCache(tail_blocks=...)")
        one_of(self.reference, REFERENCES, "AdaptiveCache(reference=...)")
        at_least(self.noise_floor, "AdaptiveCache(noise_floor=...)", 0.0,
                 "It is the relative change that quantization noise alone adds per step (0 = none).")
        if isinstance(self.forecast_order, bool) or self.forecast_order not in ORDERS:
            raise ValueError(f"AdaptiveCache(forecast_order={self.forecast_order!r}) must be 0, 1 or 2 (0: plain reuse).")
        at_least(self.guard, "AdaptiveCache(guard=...)", 0.0, "0 leaves the forecast unbounded; 2 is a safe bound.")

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        n = len(session.adapter.blocks())
        if self.head_blocks + self.tail_blocks >= n:
            raise ValueError(
                f"AdaptiveCache(head_blocks={self.head_blocks}, tail_blocks={self.tail_blocks}) leaves no block to cache "
                f"in {session.adapter.name}'s denoiser, which has {n} blocks; lower head_blocks/tail_blocks."
            )
        return AdaptiveCacheInstalled(self, session)


@dataclass
class _HalfState:
    """What one CFG half remembers between steps."""

    signal: torch.Tensor | None = None  # head residual when this half last ran
    anchor: torch.Tensor | None = None  # head residual of the last step that computed everything
    accumulated: float = 0.0
    consecutive: int = 0
    entry: Any = None  # inputs of the first cached block, this step (aggregate mode)
    residual: Any = None  # output - entry of the cached span (aggregate mode)
    block_residuals: dict = field(default_factory=dict)  # block index -> residual (per-block mode)
    history: dict = field(default_factory=dict)  # block index -> History of residuals (forecast_order > 0)


class AdaptiveCacheInstalled(BlockStackCache):
    """Hooks on every block; the head decides per CFG half whether the cached span runs."""

    def __init__(self, config: AdaptiveCache, session):
        super().__init__(config, session)
        self.first = config.head_blocks
        self.last = len(session.adapter.blocks()) - config.tail_blocks - 1
        self._hook_blocks(session, "diffaccel_adaptive_cache")

    def reset_cache(self) -> None:
        self.halves: dict[str, _HalfState] = {}
        self.plan: list[tuple[str, bool]] = []  # (CFG half, compute) in row order, this step
        self.head_input: torch.Tensor | None = None
        self.none_outputs: dict[int, tuple[bool, ...]] = {}

    # ---- the hook: only "mode" reaches compiled code (BlockStackCache dispatches) -----
    @torch.compiler.disable
    def _mode(self, index, reader, args, kwargs) -> str:
        if not self.session.ctx.active:
            return "run"
        if index < self.first or index > self.last:  # head and tail blocks always run
            if index == 0:
                self.head_input = reader.get(args, kwargs, "hidden_states")
            return "run"
        computes = [c for _, c in self.plan]
        return "run" if all(computes) else "reuse" if not any(computes) else "mixed"

    @torch.compiler.disable
    def _after_run(self, index, reader, args, kwargs, out) -> None:
        if not self.session.ctx.active:
            return
        if index == self.first - 1:
            hidden = out[self.outputs.index("hidden_states")] if isinstance(out, tuple) else out
            self.plan = self._decide(hidden - self.head_input)
            self.head_input = None
        elif not self.per_block and self.first < index < self.last:  # the range's residual needs its ends only
            self._note_outputs(index, out)
        elif self.first <= index <= self.last:
            rows = num_rows(args, kwargs)
            for (half, _), (_, sl) in zip(self.plan, cfg_half_rows(self.session.ctx, rows)):
                self._record(index, reader, args, kwargs, out, rows, half, sl)

    # ---- decisions ---------------------------------------------------------------------
    def _decide(self, head_residual: torch.Tensor) -> list[tuple[str, bool]]:
        config, ctx = self.call_config(), self.session.ctx
        groups = cfg_half_rows(ctx, int(head_residual.shape[0]))
        states = [self.halves.setdefault(half, _HalfState()) for half, _ in groups]
        signals = [head_residual[sl].detach().float() for _, sl in groups]
        anchored = config.reference == "last_computed"
        sums = []  # per half: sum |r - ref|, sum |ref| (sums, so shards add up to the whole sequence)
        for state, r in zip(states, signals):
            ref = state.anchor if anchored else state.signal
            if ref is None:
                sums.append(torch.zeros(2, device=r.device, dtype=torch.float64))
            else:
                sums.append(torch.stack([(r - ref).abs().sum(), ref.abs().sum()]).double())
        # At most one collective per decision, with every half's sums: ranks agree on all of them.
        totals = consensus_sum(torch.stack(sums), self.session).tolist()
        change = [max(num / max(den, 1e-12 * r.numel()) - config.noise_floor, 0.0) for (num, den), r in zip(totals, signals)]
        plan = []
        for (half, sl), state, r, d in zip(groups, states, signals, change):
            if anchored:  # d already spans every step since the anchor
                state.accumulated = 0.0
            compute = (
                state.signal is None
                or (state.residual is None and not state.block_residuals)
                or ctx.step < config.warmup
                or state.consecutive >= config.max_consecutive
                or state.accumulated + d >= config.threshold
            )
            if compute:
                state.accumulated, state.consecutive, state.anchor = 0.0, 0, r
                self.count("computed")
            else:
                state.accumulated += d
                state.consecutive += 1
                self.count("reused")
                for block in self.names[self.first : self.last + 1]:
                    self.count_skipped(block, ctx.cfg.row_share)
            state.signal = r
            plan.append((half, compute))
        return plan

    # ---- residual bookkeeping ----------------------------------------------------------
    def _record(self, index, reader, args, kwargs, out, rows, half, sl) -> None:
        state = self.halves[half]
        self._note_outputs(index, out)
        if self.per_block:
            out_rows = tree_map(lambda o: o[sl], out)
            state.block_residuals[index] = tree_map(torch.sub, out_rows, self._inputs(reader, args, kwargs, rows, sl))
            self._remember(state, index, state.block_residuals[index])
            return
        if index == self.first:
            state.entry = self._inputs(reader, args, kwargs, rows, sl)
        if index == self.last:
            state.residual = tree_map(torch.sub, tree_map(lambda o: o[sl], out), state.entry)
            state.entry = None
            self._remember(state, index, state.residual)

    def _remember(self, state, index, residual) -> None:
        order = self.call_config().forecast_order
        if order:
            state.history.setdefault(index, History(order + 1)).push(self._time(), residual)

    def _residual(self, state, index, cached):
        config = self.call_config()
        if not config.forecast_order:
            return cached
        return state.history[index].forecast(self._time(), config.forecast_order, config.guard)

    def _reused_rows(self, index, reader, args, kwargs, rows, half, sl):
        state = self.halves[half]
        identity = self._identity(index, reader, args, kwargs, rows, sl)
        if self.per_block:
            return tree_map(torch.add, identity, self._residual(state, index, state.block_residuals[index]))
        if index == self.last:
            return tree_map(torch.add, identity, self._residual(state, index, state.residual))
        return identity

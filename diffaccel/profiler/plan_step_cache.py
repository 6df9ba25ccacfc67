"""StepCache planner: the skip schedule as a shortest path over the graph of steps (LeMiCa's view).

Nodes are the steps 0..n-1 plus an end node n; edge (i, j) means "compute step i, skip the steps
between, compute j next" and weighs the error those skips cost. With the profile's measured table
(``profile.reuse_error["step_cache"]``, :func:`~diffaccel.profiler.reuse_error.step_skip_errors`:
every edge run as a real generation, output MSE against the unaccelerated one) a schedule's error
is predicted as the sum of its edges' errors; the number of edges on a path is the number of
computed steps, so dynamic programming over (node, edges used) gives, for every count of computed
steps at once, the schedule with the least predicted error. The measured forecast orders are all
planned and the lower error wins (the planner picks the order).

Without a measured table for the call's timesteps (old profiles, another step count) the edge
weight is a proxy from the profile's change curves: the squared staleness of the block stack,
summed over the skipped steps, order 0.

The plan is a per-step mask (re-planned per call for the call's timesteps), so StepCache's
decisions are data-independent. Example::

    plan = planner_for("step_cache").plan(profile, times, target=2.5)
    plan.config.mask          # (True, True, False, True, ...)
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import ClassVar

from diffaccel.hooks import Installed
from diffaccel.methods.base import Method

from diffaccel.methods.step_cache import StepCache
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, planning_profile, wall_speedup, wall_speedup_per_step
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.plan_text_cache import composed as composed_text_cache
from diffaccel.profiler.plan_text_cache import counted as counted_text_saving
from diffaccel.profiler.plan_text_cache import step_costs, step_time_saved
from diffaccel.profiler.profile import Cumulative, Profile

MAX_GAP = 4  # most steps skipped in a row that plans consider (the measured table's reach)
VERIFIED = "step_cache_verified"  # profile.calibration key of the schedules run for real
RETENTION = 1  # first steps always computed (the cache needs one computed step)


def _blocks(profile: Profile) -> list[str]:
    return profile.costs.get("blocks") or [m["name"] for m in profile.modules if m["kind"] == "block"]


def measured_edges(profile: Profile, times: list[float]) -> dict[int, dict[tuple[int, int], float]] | None:
    """{order: {(i, j): error}} from the profile's measured table, when it was measured at ``times``."""
    table = (profile.reuse_error or {}).get("step_cache")
    if not table or len(table["times"]) != len(times) or any(abs(a - b) > 1e-3 for a, b in zip(table["times"], times)):
        return None
    return {int(order): {(int(i), int(j)): float(e) for i, j, e in rows} for order, rows in table["edges"].items()}


def proxy_edges(profile: Profile, times: list[float], max_gap: int = MAX_GAP) -> dict[int, dict[tuple[int, int], float]]:
    """{0: {(i, j): error}} from the change curve of the blocks' residuals (no measured table)."""
    blocks = _blocks(profile)
    metric = "residual_rel_l1" if "residual_rel_l1" in profile.stats else "rel_l1"
    idx = [profile.module_index(b) for b in blocks]
    rows = profile.stats[metric]["mean"]
    curve = Cumulative(profile.times, [None if s == 0 else sum(r[j] or 0.0 for j in idx) / len(idx) for s, r in enumerate(rows)])
    stale = curve.on(times)
    n = len(times)
    edges = {}
    for i in range(n - 1):
        for j in range(i + 2, min(n, i + max_gap + 1) + 1):
            edges[(i, j)] = sum((stale[s] - stale[i]) ** 2 for s in range(i + 1, j))
    return {0: edges}


def shortest_paths(edges: dict, n: int, retention: int = RETENTION, final_steps: int = 0, max_gap: int = MAX_GAP,
                   coherent: bool = False) -> dict[int, tuple[float, list[bool], list[int]]]:
    """{computed steps K: (least error, mask, forecast order per step)} over every schedule the edges allow.

    ``edges`` is ``{order: {(i, j): error}}`` or, for one order, ``{(i, j): error}``. Skipped steps lie in
    [retention, n - final_steps), at most ``max_gap`` in a row; an edge between neighbours costs
    nothing. Each skip takes its cheapest order, but an order >= 1 only right after two computed
    steps in a row (or from step 0): the measured edges were run with every earlier step computed,
    so that is where their numbers hold (a forecast from an earlier skip's sparse history is not
    what was measured, and was measured to go badly wrong). Errors add as independent noise (MSE
    sums) or, with ``coherent``, as aligned errors (RMS sums) -- real runs lie between the two.
    O(n^2 * max_gap) per order.
    """
    if edges and not isinstance(next(iter(edges)), int):
        edges = {0: edges}
    inf = math.inf
    cost = (lambda e: math.sqrt(e)) if coherent else (lambda e: e)
    # best[k][j][u]: least error reaching node j with k edges; u = 1 when j - 1 was computed too.
    best = [[[inf, inf] for _ in range(n + 1)] for _ in range(n + 1)]
    back: dict = {}
    best[0][0][1] = 0.0
    for k in range(1, n + 1):
        for j in range(1, n + 1):
            for i in range(max(0, j - max_gap - 1), j):
                for u in (0, 1):
                    prev = best[k - 1][i][u]
                    if prev == inf:
                        continue
                    if j == i + 1:
                        options = [(0.0, 0)]
                    elif i + 1 < retention or j > n - final_steps:
                        continue
                    else:
                        options = [(cost(table[(i, j)]), order) for order, table in edges.items()
                                   if (i, j) in table and (order == 0 or u == 1)]
                    for w, order in options:
                        v = 1 if j == i + 1 else 0
                        if prev + w < best[k][j][v]:
                            best[k][j][v] = prev + w
                            back[(k, j, v)] = (i, u, order)
    out = {}
    for k in range(1, n + 1):
        v = min((0, 1), key=lambda x: best[k][n][x])
        if best[k][n][v] == inf:
            continue
        err = best[k][n][v] ** 2 if coherent else best[k][n][v]
        mask, orders, j, kk = [False] * n, [0] * n, n, k
        while j > 0:
            i, u, order = back[(kk, j, v)]
            mask[i] = True
            for s_ in range(i + 1, j):
                orders[s_] = order
            j, kk, v = i, kk - 1, u
        out[k] = (err, mask, orders)
    return out


def _speedup(profile: Profile, mask: list[bool]) -> float:
    full = float(profile.costs["call"])
    saved = sum(profile.costs["modules"].get(b, 0) for b in _blocks(profile))
    return full * len(mask) / sum(full if c else full - saved for c in mask)


def plan_of_mask(profile: Profile, mask, orders, err: float, note: str) -> Plan:
    config = StepCache(mask=tuple(bool(c) for c in mask), forecast_order=max(orders or [0]),
                       forecast_orders=tuple(int(o) for o in orders) if orders else None, final_steps=0, retention=0.0)
    speed = _speedup(profile, list(mask))
    return Plan("step_cache", config, speed, wall_speedup(profile, speed, _blocks(profile)), err, list(mask), note)


def verified(profile: Profile, times: list[float]) -> list[Plan]:
    """Schedules run as real generations (``profile.calibration[VERIFIED]``, see
    :mod:`~diffaccel.profiler.verify_step_cache`), with their measured pooled MSE as the error (of
    their worst seed set where they were validated on more), when they were run at ``times``."""
    cal = (profile.calibration or {}).get(VERIFIED) or {}
    ran_at = cal.get("times") or []
    if len(ran_at) != len(times) or any(abs(a - b) > 1e-3 for a, b in zip(ran_at, times)):
        return []
    return [replace(plan_of_mask(profile, r["mask"], r["orders"], 10.0 ** (-r["psnr"] / 10.0), "verified by real runs"),
                    psnr=float(r["psnr"])) for r in cal.get("runs", [])]


def verified_times(profile: Profile, steps: int | None = None) -> list[float] | None:
    """The timesteps the verified schedules were run at, when there are any (and, given ``steps``, of
    that count): a planner asked for that step count without the scheduler's real timesteps uses them."""
    times = ((profile.calibration or {}).get(VERIFIED) or {}).get("times")
    return list(times) if times and (steps is None or len(times) == steps) else None


def candidates(profile: Profile, times: list[float], retention: int = RETENTION, final_steps: int = 0) -> list[Plan]:
    """Schedules to choose from: the verified ones where the profile has them for ``times``, else
    :func:`graph_candidates`."""
    return verified(profile, times) or graph_candidates(profile, times, retention, final_steps)


def graph_candidates(profile: Profile, times: list[float], retention: int = RETENTION, final_steps: int = 0) -> list[Plan]:
    """Every count of computed steps' shortest path (both error models) over the step graph, and the
    evenly spread schedules."""
    edges = measured_edges(profile, times)
    measured = edges is not None
    edges = edges or proxy_edges(profile, times)
    note = "measured step graph" if measured else "proxy error (no measured step graph for these timesteps)"
    plans = []
    for coherent in (False, True):
        for k, (err, mask, orders) in shortest_paths(edges, len(times), retention, final_steps, coherent=coherent).items():
            plans.append(plan_of_mask(profile, mask, orders, err, note))
    # Evenly spread schedules too: verification keeps them where real runs beat the paths (the summed
    # edge errors mispredict long runs of skips), so a verified plan is never worse than uniform.
    n = len(times)
    for k in range(2, n):
        mask = uniform_mask(n, k)
        computed = [i for i, c in enumerate(mask) if c] + [n]
        gaps = [(i, j) for i, j in zip(computed, computed[1:]) if j > i + 1]
        if all(g in edges[0] for g in gaps) and all(i + 1 >= retention and j <= n - final_steps for i, j in gaps):
            plans.append(plan_of_mask(profile, mask, [0] * n, sum(edges[0][g] for g in gaps), note))
    return plans


def rule_candidates(profile: Profile, times: list[float]) -> list[Plan]:
    """StepCache's own rule (MagCache-like: retention, last step computed, capped runs of skips,
    forecast order 0 / 1 throughout) as candidates for verification: its order-1 runs reuse a
    forecast from a sparse history, which the measured edges do not cover."""
    from diffaccel.methods.step_cache import step_schedule

    plans = []
    for retention in (0.1, 0.2):
        for cap in (1, 2, 3):
            for order in (0, 1):
                config = StepCache(threshold=1e9, retention=retention, final_steps=1, max_consecutive=cap)
                mask = step_schedule(config, times)
                plans.append(plan_of_mask(profile, mask, [order] * len(times), math.inf, "rule"))
    return plans


def one_more_skip(mask, orders, max_gap: int = MAX_GAP, retention: int = RETENTION) -> list[tuple[list[bool], list[int]]]:
    """Every schedule that skips one more step than ``mask`` (past the retention steps, at most
    ``max_gap`` skips in a row), the new skip forecast to the order the schedule uses elsewhere: the
    neighbours a local search over verified schedules tries next (the summed-edge error model
    mispredicts long runs of skips, so real runs decide)."""
    order = max(orders or [0])
    out = []
    for i in range(retention, len(mask)):
        if not mask[i]:
            continue
        new = [bool(c) for c in mask]
        new[i] = False
        run = longest = 0
        for c in new:
            run = 0 if c else run + 1
            longest = max(longest, run)
        if longest <= max_gap:
            out.append((new, [0 if c else (orders[k] if not mask[k] else order) for k, c in enumerate(new)]))
    return out


def one_fewer_skip(mask, orders) -> list[tuple[list[bool], list[int]]]:
    """Every schedule that computes one of ``mask``'s skipped steps, the other skips keeping their
    order: the local search's step back. A skip removed here and one added next round moves a skip,
    which a search that only adds skips never does (on tiny-dit it found better schedules at 1.24-1.78x,
    eval/results/step_cache.md)."""
    out = []
    for i, c in enumerate(mask):
        if not c:
            new = [bool(x) for x in mask]
            new[i] = True
            out.append((new, [0 if x else orders[k] for k, x in enumerate(new)]))
    return out


def uniform_mask(n: int, computed: int) -> list[bool]:
    """``computed`` steps spread evenly over ``n`` steps, the first and the last included."""
    keep = {round(i * (n - 1) / (computed - 1)) for i in range(computed)} if computed > 1 else {0}
    return [i in keep for i in range(n)]


def with_text_cache(profile: Profile, plan: Plan) -> Plan:
    """``plan`` with TextCache composed (:mod:`~diffaccel.profiler.plan_text_cache`): lossless, so the
    error stays; the speed-up counts the text-only modules computed once per call. ``plan`` itself
    where TextCache would cache nothing at the profile's shape or its time does not follow its FLOPs."""
    text = counted_text_saving(profile)
    if text is None:
        return plan
    blocks = _blocks(profile)
    costs = step_costs(profile, plan.computed, sum(profile.costs["modules"].get(b, 0) for b in blocks), text)
    speed = float(profile.costs["call"]) * len(costs) / sum(costs)
    saved = step_time_saved(profile, plan.computed, blocks, text)
    wall = wall_speedup_per_step(profile, saved) if saved is not None else wall_speedup(profile, speed, blocks)
    return replace(plan, speedup=speed, wall_speedup=wall, with_methods=(composed_text_cache(),))


def plan_step_cache(profile: Profile, times: list[float], target: float, retention: int = RETENTION,
                    final_steps: int = 0) -> Plan:
    """The least-error schedule whose FLOPs speed-up is at least ``target``, TextCache composed where it
    caches at the profile's shape (then its saving lets a gentler schedule meet the target)."""
    plans = [with_text_cache(profile, p) for p in candidates(profile, times, retention, final_steps)]
    ok = [p for p in plans if p.speedup >= target - 1e-9]
    if not ok:
        best = max((p.speedup for p in plans), default=1.0)
        raise UnreachableTarget(f"StepCache reaches at most {best:.2f}x here (at most {MAX_GAP} steps skipped in a row)")
    return min(ok, key=lambda p: (p.error, -p.speedup))


def plan_for_psnr(profile: Profile, times: list[float], min_psnr: float, retention: int = RETENTION,
                  final_steps: int = 0) -> Plan:
    """The fastest schedule whose PSNR (verified, else predicted from the measured MSE) is at least ``min_psnr``."""
    if measured_edges(profile, times) is None and not verified(profile, times):
        raise ValueError("A PSNR target needs the measured step graph for these timesteps; profile with "
                         "`diffaccel profile` at this step count (it records profile.reuse_error['step_cache']).")
    budget = 10.0 ** (-min_psnr / 10.0)
    ok = [p for p in candidates(profile, times, retention, final_steps) if p.error <= budget]
    if not ok:  # nothing verified reaches it: every step computes
        return plan_of_mask(profile, [True] * len(times), [0] * len(times), 0.0, "no schedule meets the PSNR target")
    return max(ok, key=lambda p: (p.speedup, -p.error))


@register_planner
class StepCachePlanner(Planner):
    """Whole-step skip mask and forecast order from the step graph, re-planned per call's timesteps."""

    method = StepCache
    replans_per_call = True
    # Ahead of AdaptiveCache and PAB: on both bundled DiTs, at verified and unverified step counts,
    # its plan measured 2-11 dB more pooled PSNR at 11 of 12 targets; at the twelfth 1.3 dB less
    # pooled, at more saving and 2.9 dB more mean PSNR (eval/results/schedules.md).
    preference = 1

    def plan(self, profile, times, target, like=None) -> Plan:
        return plan_step_cache(profile, times, target)

    def verified_times(self, profile, steps=None) -> list[float] | None:
        return verified_times(profile, steps)

    def simulate(self, profile, times, config) -> Plan:
        from diffaccel.methods.step_cache import step_schedule

        mask = step_schedule(config, times)
        edges = measured_edges(profile, times) or proxy_edges(profile, times)
        weights = edges.get(config.forecast_order) or edges[min(edges)]
        err, last = 0.0, 0
        for j in list(range(1, len(mask))) + [len(mask)]:
            if j == len(mask) or mask[j]:
                err += weights.get((last, j), math.inf) if j > last + 1 else 0.0
                last = j
        speed = _speedup(profile, mask)
        return Plan("step_cache", config, speed, wall_speedup(profile, speed, _blocks(profile)), err, mask)

    def call_config(self, config, plan) -> StepCache:
        return replace(config, mask=plan.config.mask, forecast_order=plan.config.forecast_order,
                       forecast_orders=plan.config.forecast_orders)

    def summary(self, plan) -> str:
        skipped = [i for i, c in enumerate(plan.config.mask or ()) if not c]
        return f"skip steps {skipped}, forecast order {plan.config.forecast_order}"


# ---- PSNR-targeted schedules at call time (StepCache(min_psnr=...)) --------------------------------
@dataclass(frozen=True)
class StepCachePsnrSchedule(Method):
    """Schedule provider for ``StepCache(min_psnr=...)``: at every call, the fastest mask whose
    predicted PSNR on ``profile``'s measured step graph meets ``min_psnr``, for the call's
    timesteps. Where the graph was measured at other timesteps: for a call with more steps of the
    profile's scheduler, the schedule planned at the profiled timesteps stretched onto the call's
    (:func:`stretch`); else every step computes. Measured on the bundled DiTs (eval/results/presets.md):
    StepCache's rule broke the presets' PSNR promises at 10 and 15 steps of a 20-step profile (by 5-18
    dB) and tiny-dit's balanced one at 25, and on tiny-dit at 20 steps of
    Euler (by 1-6 dB) and of DDIM (every preset under 8 dB; one skipped step alone: 20-24 dB)."""

    name: ClassVar[str] = "step_cache_psnr_schedule"
    profile: Profile | None = None

    def apply(self, session) -> Installed:
        return _PsnrScheduleInstalled(self, session)


class _PsnrScheduleInstalled(Installed):
    def __init__(self, config: StepCachePsnrSchedule, session):
        super().__init__(config, session)
        self.plans: dict[tuple, tuple[StepCache, dict]] = {}  # call's (min_psnr, times) -> config, stats
        self.info: dict = {}
        session.providers[StepCache.name] = self
        self.on_remove(lambda: session.providers.pop(StepCache.name, None))

    def config_for_call(self, config: StepCache, session) -> StepCache:
        times = session.call_times()
        key = (config.min_psnr, tuple(round(t, 6) for t in times))
        if key not in self.plans:
            self.plans[key] = self._plan(config, times, type(session.pipe.scheduler).__name__)
        planned, self.info = self.plans[key]  # stats describe the latest call
        return planned

    def _plan(self, config: StepCache, times: list[float], scheduler: str) -> tuple[StepCache, dict]:
        profile, n = self.config.profile, len(times)
        measured_at = len(profile.reuse_error["step_cache"]["times"])
        profiled_with = (profile.measured or {}).get("scheduler", scheduler)
        if config.min_psnr is None:
            return config, {"planned": False}
        if measured_edges(profile, times) is None:
            if n > measured_at and scheduler == profiled_with:
                return self._stretched(config, times)
            why = (f"{n} steps, not more than the {measured_at} the profile measured" if scheduler == profiled_with else
                   f"{scheduler}, not the profile's {profiled_with}")
            return replace(config, mask=(True,) * n, forecast_orders=None), {
                "planned": False, "every_step": True, "why": f"{why}: no skip is known to keep min_psnr"}
        plan = plan_for_psnr(profile, times, config.min_psnr)
        return replace(config, mask=plan.config.mask, forecast_order=plan.config.forecast_order,
                       forecast_orders=plan.config.forecast_orders), {
            "planned": True, "predicted_psnr": round(-10 * math.log10(max(plan.error, 1e-30)), 2),
            "predicted_speedup": round(plan.speedup, 3)}

    def _stretched(self, config: StepCache, times: list[float]) -> tuple[StepCache, dict]:
        """More steps than the profile measured, same scheduler: the schedule planned at the profiled
        timesteps, laid onto the call's by normalised time (each step takes the decision of the profiled
        step nearest in time), so skips cover the same stretches of the trajectory and the PSNR stays near
        the planned one. Measured on the bundled DiTs at 25 / 30 / 50 steps (eval/results/presets.md): the
        generic rule here had broken tiny-dit's balanced promise at 25 steps (28.3 dB for 30)."""
        profile = self.config.profile
        at = verified_times(profile) or profile.reuse_error["step_cache"]["times"]
        plan = plan_for_psnr(profile, at, config.min_psnr)
        mask, orders = stretch(plan.config.mask, plan.config.forecast_orders, at, times)
        return replace(config, mask=mask, forecast_order=plan.config.forecast_order, forecast_orders=orders), {
            "planned": True, "stretched_from": len(at),
            "predicted_psnr": round(-10 * math.log10(max(plan.error, 1e-30)), 2)}

    def stats(self) -> dict:
        return dict(self.info)


def stretch(mask, orders, at: list[float], times: list[float]) -> tuple[tuple[bool, ...], tuple[int, ...] | None]:
    """``mask`` (and per-step forecast ``orders``) planned at normalised times ``at``, for a call at
    ``times``: each call step takes the decision of the step of ``at`` nearest to it; the first and the
    last steps compute where the plan computes its own first and last."""
    nearest = [min(range(len(at)), key=lambda i: (abs(at[i] - t), i)) for t in times]
    new = [bool(mask[i]) for i in nearest]
    new[0], new[-1] = new[0] or bool(mask[0]), new[-1] or bool(mask[-1])
    new_orders = tuple(0 if c else int(orders[i]) for c, i in zip(new, nearest)) if orders else None
    return tuple(new), new_orders


# Without a profile StepCache(min_psnr=...) runs its generic rule, whose PSNR nobody measured on the model: on
# the bundled tiny-dit without its profile the presets' rule gave 31.9 / 29.4 / 10.4 dB at 20 steps (promises
# 35 / 30 / 25) and held them only from 30 steps on (eval/results/step_cache.md).
UNPLANNED = ("diffaccel: no redundancy profile with a measured step graph is known for this model, so StepCache's "
             "min_psnr is not planned and its generic rule runs; its PSNR is not measured on this model. To keep the "
             "preset's promise: `diffaccel profile MODEL --out p.json --step-graph 2 --verify 12 --validate 24`, then "
             "accelerate(pipe, preset=..., profile='p.json').")


def with_psnr_schedules(adapter, methods: list[Method], profile: Profile | None = None) -> list[Method]:
    """``methods`` plus the schedule provider a ``StepCache(min_psnr=...)`` among them needs, planned
    from ``profile`` or the profile shipped for the model (without either's step graph, nothing is
    added: the config's own rule runs)."""
    if not any(isinstance(m, StepCache) and m.min_psnr is not None for m in methods):
        return methods
    if any(isinstance(m, StepCachePsnrSchedule) for m in methods):  # already planned (a resolved config list)
        return methods
    profile = planning_profile(
        adapter, profile, lambda p: (p.reuse_error or {}).get("step_cache"),
        "This profile has no measured step graph, so StepCache(min_psnr=...) cannot be planned from it: re-create it "
        "with `diffaccel profile MODEL --out p.json --step-graph 2 --verify 4`.")
    if profile is None:
        warnings.warn(UNPLANNED, stacklevel=3)
        return methods
    return [*methods, StepCachePsnrSchedule(profile=profile)]

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
from dataclasses import dataclass, replace
from typing import ClassVar

from diffaccel.hooks import Installed
from diffaccel.methods.base import Method

from diffaccel.methods.step_cache import StepCache
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, wall_speedup
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.profile import Cumulative, Profile

MAX_GAP = 4  # most steps skipped in a row that plans consider (the measured table's reach)
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


def shortest_paths(edges: dict[tuple[int, int], float], n: int, retention: int = RETENTION, final_steps: int = 0,
                   max_gap: int = MAX_GAP) -> dict[int, tuple[float, list[bool]]]:
    """{computed steps K: (least summed error, mask)} over every schedule the edges allow.

    Skipped steps lie in [retention, n - final_steps) and at most ``max_gap`` in a row; an edge
    between neighbours costs nothing. O(n^2 * max_gap) -- microseconds for 50 steps.
    """
    inf = math.inf
    # best[k][j]: least error reaching node j with k edges (k computed steps before j); back-pointers.
    best = [[inf] * (n + 1) for _ in range(n + 1)]
    back = [[-1] * (n + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(1, n + 1):
            for i in range(max(0, j - max_gap - 1), j):
                prev = best[k - 1][i]
                if prev == inf:
                    continue
                if j == i + 1:
                    w = 0.0
                elif i + 1 < retention or j > n - final_steps or (i, j) not in edges:
                    continue
                else:
                    w = edges[(i, j)]
                if prev + w < best[k][j]:
                    best[k][j], back[k][j] = prev + w, i
    out = {}
    for k in range(1, n + 1):
        if best[k][n] == inf:
            continue
        mask, j, kk = [False] * n, n, k
        while j > 0:
            i = back[kk][j]
            mask[i] = True
            j, kk = i, kk - 1
        out[k] = (best[k][n], mask)
    return out


def _speedup(profile: Profile, mask: list[bool]) -> float:
    full = float(profile.costs["call"])
    saved = sum(profile.costs["modules"].get(b, 0) for b in _blocks(profile))
    return full * len(mask) / sum(full if c else full - saved for c in mask)


def candidates(profile: Profile, times: list[float], retention: int = RETENTION, final_steps: int = 0) -> list[Plan]:
    """Every count of computed steps' best schedule, over every forecast order the table has."""
    edges = measured_edges(profile, times)
    measured = edges is not None
    edges = edges or proxy_edges(profile, times)
    plans = []
    for order, weights in sorted(edges.items()):
        for k, (err, mask) in shortest_paths(weights, len(times), retention, final_steps).items():
            config = StepCache(mask=tuple(mask), forecast_order=order, final_steps=0, retention=0.0)
            speed = _speedup(profile, mask)
            note = "measured step graph" if measured else "proxy error (no measured step graph for these timesteps)"
            plans.append(Plan("step_cache", config, speed, wall_speedup(profile, speed, _blocks(profile)), err, mask, note))
    return plans


def plan_step_cache(profile: Profile, times: list[float], target: float, retention: int = RETENTION,
                    final_steps: int = 0) -> Plan:
    """The least-error schedule whose FLOPs speed-up is at least ``target``."""
    ok = [p for p in candidates(profile, times, retention, final_steps) if p.speedup >= target - 1e-9]
    if not ok:
        best = max((p.speedup for p in candidates(profile, times, retention, final_steps)), default=1.0)
        raise UnreachableTarget(f"StepCache reaches at most {best:.2f}x here (at most {MAX_GAP} steps skipped in a row)")
    return min(ok, key=lambda p: (p.error, -p.speedup))


def plan_for_psnr(profile: Profile, times: list[float], min_psnr: float, retention: int = RETENTION,
                  final_steps: int = 0) -> Plan:
    """The fastest schedule whose predicted PSNR (from the summed measured MSE) is at least ``min_psnr``."""
    if measured_edges(profile, times) is None:
        raise ValueError("A PSNR target needs the measured step graph for these timesteps; profile with "
                         "`diffaccel profile` at this step count (it records profile.reuse_error['step_cache']).")
    budget = 10.0 ** (-min_psnr / 10.0)
    ok = [p for p in candidates(profile, times, retention, final_steps) if p.error <= budget]
    return max(ok, key=lambda p: (p.speedup, -p.error))


@register_planner
class StepCachePlanner(Planner):
    """Whole-step skip mask and forecast order from the step graph, re-planned per call's timesteps."""

    method = StepCache
    replans_per_call = True

    def plan(self, profile, times, target, like=None) -> Plan:
        return plan_step_cache(profile, times, target)

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
        return replace(config, mask=plan.config.mask, forecast_order=plan.config.forecast_order)

    def summary(self, plan) -> str:
        skipped = [i for i, c in enumerate(plan.config.mask or ()) if not c]
        return f"skip steps {skipped}, forecast order {plan.config.forecast_order}"


# ---- PSNR-targeted schedules at call time (StepCache(min_psnr=...)) --------------------------------
@dataclass(frozen=True)
class StepCachePsnrSchedule(Method):
    """Schedule provider for ``StepCache(min_psnr=...)``: at every call, the fastest mask whose
    predicted PSNR on ``profile``'s measured step graph meets ``min_psnr``, for the call's
    timesteps; the StepCache config's own rule where the graph was measured at other timesteps."""

    name: ClassVar[str] = "step_cache_psnr_schedule"
    profile: Profile | None = None

    def apply(self, session) -> Installed:
        return _PsnrScheduleInstalled(self, session)


class _PsnrScheduleInstalled(Installed):
    def __init__(self, config: StepCachePsnrSchedule, session):
        super().__init__(config, session)
        self.plans: dict[tuple, StepCache] = {}
        self.info: dict = {}
        session.providers[StepCache.name] = self
        self.on_remove(lambda: session.providers.pop(StepCache.name, None))

    def config_for_call(self, config: StepCache, session) -> StepCache:
        timesteps = [float(t) for t in getattr(session.pipe.scheduler, "timesteps", [])]
        n = int(session.ctx.num_steps or len(timesteps))
        times = [session.adapter.normalised_time(t) for t in timesteps[len(timesteps) - n:]]
        key = (config.min_psnr, tuple(round(t, 6) for t in times))
        if key not in self.plans:
            profile = self.config.profile
            if config.min_psnr is None or measured_edges(profile, times) is None:
                self.plans[key], self.info = config, {"planned": False}
            else:
                plan = plan_for_psnr(profile, times, config.min_psnr)
                self.plans[key] = replace(config, mask=plan.config.mask, forecast_order=plan.config.forecast_order)
                self.info = {"planned": True, "predicted_psnr": round(-10 * math.log10(max(plan.error, 1e-30)), 2),
                             "predicted_speedup": round(plan.speedup, 3)}
        return self.plans[key]

    def stats(self) -> dict:
        return dict(self.info)


def with_psnr_schedules(adapter, methods: list[Method], profile: Profile | None = None) -> list[Method]:
    """``methods`` plus the schedule provider a ``StepCache(min_psnr=...)`` among them needs, planned
    from ``profile`` or the profile shipped for the model (nothing added without a step graph)."""
    if not any(isinstance(m, StepCache) and m.min_psnr is not None for m in methods):
        return methods
    if profile is None:
        from diffaccel.profiler.schedule import shipped_profile

        profile = shipped_profile(adapter)
    if profile is None or not (profile.reuse_error or {}).get("step_cache"):
        return methods
    return [*methods, StepCachePsnrSchedule(profile=profile)]

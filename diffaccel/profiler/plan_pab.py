"""PAB planner: per attention kind, the interval and time range with the best error per saved FLOP.

A kind's option reuses its modules' outputs every ``interval`` steps inside ``(low, high)``; its
saving is the modules' FLOPs times the reused steps, its error the change those modules
accumulated since their last compute (the profile's curve for the kind), weighted by their share
of the FLOPs. The plan is the combination of per-kind Pareto options that meets the target with
the least summed error.
"""
from __future__ import annotations

import math

from diffaccel.methods.pab import PAB
from diffaccel.pipelines import ATTENTION_KINDS
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, wall_speedup
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.profile import Cumulative, Profile

INTERVALS = range(2, 7)
LOWS = (0.05, 0.1, 0.2, 0.3)
HIGHS = (0.6, 0.7, 0.8, 0.9, 0.95)


def simulate_pab(times: list[float], interval: int, t_range: tuple[float, float]) -> list[bool]:
    """Per step: whether the attention is computed (True) or broadcast."""
    computed, last = [], None
    for i, t in enumerate(times):
        reuse = last is not None and t_range[0] < t < t_range[1] and i - last < interval
        if not reuse:
            last = i
        computed.append(not reuse)
    return computed


def _kind_groups(profile: Profile) -> dict[str, list[str]]:
    """PAB's kinds -> the attention modules that follow them (joint follows spatial)."""
    groups: dict[str, list[str]] = {}
    for m in profile.modules:
        if m["kind"] in ATTENTION_KINDS:
            groups.setdefault("spatial" if m["kind"] == "joint" else m["kind"], []).append(m["name"])
    return groups


class _KindModel:
    """Saving and error of reusing one kind's modules on a schedule."""

    def __init__(self, profile: Profile, names: list[str], times: list[float]):
        self.full = float(profile.costs["call"])
        self.flops = sum(profile.costs["modules"].get(x, 0) for x in names)
        series = [None if s == 0 else sum(profile.series(x)[s] or 0.0 for x in names) / len(names)
                  for s in range(len(profile.times))]
        self.cum = Cumulative(profile.times, series).on(times)
        self.times = times

    def option(self, interval: int, t_range: tuple[float, float]) -> tuple[float, float, int, tuple]:
        """(FLOPs saved, error, interval, range)."""
        computed = simulate_pab(self.times, interval, t_range)
        err, last = 0.0, 0
        for i, c in enumerate(computed):
            last = i if c else last
            err += 0.0 if c else (self.cum[i] - self.cum[last]) * self.flops / self.full
        return self.flops * computed.count(False), err, interval, t_range


def _plan_from(profile: Profile, times: list[float], groups: dict, combo) -> Plan:
    full, n = float(profile.costs["call"]), len(times)
    saved, err = sum(o[0] for o in combo), sum(o[1] for o in combo)
    kw, skipped = {}, []
    for kind, (_, _, interval, t_range) in zip(groups, combo):
        kw[f"{kind}_interval"], kw[f"{kind}_range"] = interval, t_range
        skipped += groups[kind] if interval > 1 else []
    speedup = n * full / (n * full - saved)
    return Plan("pab", PAB(**kw), speedup, wall_speedup(profile, speedup, skipped), err, [True] * n)


def plan_pab(profile: Profile, times: list[float], target: float) -> Plan:
    full, n = float(profile.costs["call"]), len(times)
    need = n * full * (1.0 - 1.0 / target)  # FLOPs to save
    groups = _kind_groups(profile)
    options: dict[str, list[tuple[float, float, int, tuple]]] = {}
    for kind, names in groups.items():
        model = _KindModel(profile, names, times)
        opts = [(0.0, 0.0, 1, (0.0, 1.0))]
        opts += [model.option(interval, (lo, hi)) for interval in INTERVALS for lo in LOWS for hi in HIGHS]
        options[kind] = _pareto(opts)
    best = None
    for combo in _combinations(list(options.values())):
        saved, err = sum(o[0] for o in combo), sum(o[1] for o in combo)
        if saved >= need - 1e-6 * full and (best is None or err < best[1]):
            best = (saved, err, combo)
    if best is None:
        top = sum(max(o[0] for o in opts) for opts in options.values())
        raise UnreachableTarget(f"PAB reaches at most {n * full / (n * full - top):.2f}x here")
    return _plan_from(profile, times, groups, best[2])


def _pareto(opts):
    """Options not beaten in both saving (higher) and error (lower)."""
    opts = sorted(opts, key=lambda o: (-o[0], o[1]))
    front, best_err = [], math.inf
    for o in opts:
        if o[1] < best_err:
            front.append(o)
            best_err = o[1]
    return front


def _combinations(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _combinations(lists[1:]):
            yield (head, *rest)


@register_planner
class PABPlanner(Planner):
    """Per attention kind, the broadcast interval and time range (fixed for every call)."""

    method = PAB

    def plan(self, profile, times, target, like=None) -> Plan:
        return plan_pab(profile, times, target)

    def simulate(self, profile, times, config) -> Plan:
        groups = _kind_groups(profile)
        settings = config.resolved(profile.family)
        combo = [_KindModel(profile, names, times).option(*settings[kind]) if settings[kind][0] > 1
                 else (0.0, 0.0, 1, settings[kind][1]) for kind, names in groups.items()]
        return _plan_from(profile, times, groups, combo)

    def summary(self, plan) -> str:
        c = plan.config
        return ", ".join(f"{k} {getattr(c, k + '_interval')} in {getattr(c, k + '_range')}" for k in ("spatial", "temporal", "cross")
                         if getattr(c, k + "_interval") not in (None, 1))

"""AdaptiveCache planner: simulate its accumulate-and-reset rule on the profiled signal, per CFG
half and with the measured feedback of reuse on the signal, and pick the smallest threshold
(and cap on consecutive reuses) that meets the target; the forecast of the reused residuals is the
one the profile's calibration runs measured best at that cost (:func:`verified_forecast`)."""
from __future__ import annotations

import math
from dataclasses import replace

from diffaccel.methods.adaptive_cache import AdaptiveCache
from diffaccel.profiler.plan_common import (FORECASTS, MARGIN_DB, Plan, UnreachableTarget, _flops_speedup, _increments,
                                            skipped_time_share, wall_speedup, wall_speedup_per_step)
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.profile import Cumulative, Profile


def simulate_adaptive(increments: list[float], threshold: float, warmup: int, max_consecutive: int,
                      stale: list[float] | None = None, feedback: float = 0.0) -> list[bool]:
    """AdaptiveCache's rule: compute while warming up, at the cap, or once accumulated change >= threshold.

    ``increments`` are the signal's changes on the unaccelerated trajectory. A reused step leaves
    an error in the latents that shows up as extra change at the next step; with ``feedback`` > 0
    that extra is modelled as ``feedback`` times the staleness of the reused blocks (``stale``: their
    cumulative change curve at the steps) since their last full step.
    """
    computed, acc, run, last = [], 0.0, 0, 0
    for i, d in enumerate(increments):
        if feedback and stale is not None and i > 0 and not computed[-1]:
            d += feedback * (stale[i - 1] - stale[last])
        compute = i == 0 or i < warmup or run >= max_consecutive or acc + d >= threshold
        if compute:
            acc, run, last = 0.0, 0, i
        else:
            acc, run = acc + d, run + 1
        computed.append(compute)
    return computed


# Extra signal change per unit of staleness a reused step leaves behind (see simulate_adaptive),
# tried when fitting it to a profile's calibration runs; 0 where the profile has none.
FEEDBACK_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)


def fitted_feedback(profile: Profile, head_blocks: int = 1) -> float:
    """The feedback that best predicts the speed-ups AdaptiveCache measured in the profile's
    calibration runs (``calibrate_psnr``: plans run on the profiled prompts and steps).

    The profiled signal comes from the unaccelerated trajectory; an accelerated run drifts off it
    and its signal grows after reuses, so it reuses less than simulated. How much differs between
    models (fitted to the shipped profiles: tiny-dit 0.4, tiny-video 0.1), hence measured, not a constant.
    """
    cal = _calibration(profile)
    runs = [(s, p[3]) for s, p in zip(cal.get("settings", []), cal.get("pairs", [])) if len(p) > 3 and s.get("threshold") is not None]
    if not runs:
        return 0.0
    key = ("fitted_feedback", head_blocks)
    cached = profile.memo
    if key not in cached:
        times = profile.times[: cal.get("steps", len(profile.times))]

        def misfit(kappa):
            return sum(abs(math.log(plan_adaptive(profile, times, None, head_blocks, s["warmup"], s["threshold"],
                                                  s["max_consecutive"], feedback=kappa).speedup / measured))
                       for s, measured in runs)

        cached[key] = min(FEEDBACK_GRID, key=misfit)  # ties: the smaller correction
    return cached[key]


def _blocks(profile: Profile) -> list[str]:
    return profile.costs.get("blocks") or [m["name"] for m in profile.modules if m["kind"] == "block"]


def _adaptive_parts(profile: Profile, head_blocks: int):
    """(per-half head signals, FLOPs the cached blocks cost, their staleness curve)."""
    blocks = _blocks(profile)
    head, middle = blocks[head_blocks - 1], blocks[head_blocks:]
    signals = half_signals(profile, head)
    saved = sum(profile.costs["modules"].get(b, 0) for b in middle)
    idx = [profile.module_index(b) for b in middle]
    rows = profile.stats["rel_l1"]["mean"]
    staleness = Cumulative(profile.times, [None if s == 0 else sum(r[j] or 0.0 for j in idx) / len(idx) for s, r in enumerate(rows)])
    return signals, saved, staleness


def half_signals(profile: Profile, head: str) -> list[Cumulative]:
    """The head block's residual change, one curve per CFG half where the profile recorded them.

    AdaptiveCache accumulates and decides per half; simulating one batch-wide average instead
    mispredicts where the halves cross the threshold at different steps. Older profiles (and
    models without CFG) have one curve.
    """
    keys = sorted(k for k in profile.stats if k.startswith("residual_rel_l1@"))
    keys = [k for k in keys if any(v is not None for v in profile.series(head, k))]
    if not keys:
        has_residual = "residual_rel_l1" in profile.stats and any(v is not None for v in profile.series(head, "residual_rel_l1"))
        keys = ["residual_rel_l1" if has_residual else "rel_l1"]
    return [profile.drift(head, k) for k in keys]


def verified_forecast(profile: Profile, speedup: float) -> tuple[int, float] | None:
    """(forecast_order, guard) for an AdaptiveCache plan of ``speedup`` (predicted FLOPs speed-up), from
    the calibration runs of the probe plan nearest in speed-up; None where the profile has none.

    A forecast is taken only where it measured ``MARGIN_DB`` more PSNR than plain reuse *and* at least
    the same measured speed-up: a forecast changes the trajectory, hence the head blocks' signal and
    how often AdaptiveCache reuses (on tiny-dit order 1 at threshold 0.4 saved 37% of the FLOPs
    instead of 49%), so PSNR at one threshold is not PSNR at one cost.
    """
    cal = _calibration(profile)
    runs = [(p[2], f) for p, f in zip(cal.get("pairs", []), cal.get("forecasts", [])) if set(f) == set(FORECASTS)]
    if not runs:
        return None
    _, measured = min(runs, key=lambda r: abs(math.log(r[0] / speedup)))
    plain_psnr, plain_speedup = measured["order 0"]
    fair = {label: v[0] for label, v in measured.items() if v[1] >= plain_speedup * (1 - 1e-3) and math.isfinite(v[0])}
    best = max(fair, key=fair.get, default="order 0")
    return FORECASTS[best if fair.get(best, -math.inf) >= plain_psnr + MARGIN_DB else "order 0"]


def plan_adaptive(profile: Profile, times: list[float], target: float | None, head_blocks: int = 1, warmup: int = 2,
                  threshold: float | None = None, max_consecutive: int | None = None, caps: tuple[int, ...] | None = None,
                  feedback: float | None = None, forecast: tuple[int, float] | None = None) -> Plan:
    """AdaptiveCache plan; with ``threshold`` given it evaluates that setting instead of choosing.

    Each CFG half is simulated on its own signal and stands for an equal share of the cost (half
    of a batched call, or one of two separate calls); ``computed`` is True where any half computes.
    ``feedback`` (see simulate_adaptive) defaults to the one fitted to the profile's calibration runs.
    ``forecast`` (forecast_order, guard) defaults to :func:`verified_forecast`'s, else plain reuse.
    """
    signals, saved, staleness = _adaptive_parts(profile, head_blocks)
    if feedback is None:
        feedback = fitted_feedback(profile, head_blocks)
    full, n = float(profile.costs["call"]), len(times)
    increments = [_increments(signal, times) for signal in signals]
    stale = staleness.on(times)

    def error_of(per_half):
        return sum(staleness_error(computed, stale) for computed in per_half) * saved / full / len(per_half)

    def evaluate(tau, cap):
        per_half = [simulate_adaptive(d, tau, warmup, cap, stale, feedback) for d in increments]
        costs = [full - saved * sum(not b[i] for b in per_half) / len(per_half) for i in range(n)]
        return per_half, _flops_speedup(full, costs)

    if threshold is not None:
        cap = max_consecutive or 3
        per_half, speedup = evaluate(threshold, cap)
    else:
        grid = [0.0] + [1e-4 * (1e6 ** (i / 399)) for i in range(400)]  # 1e-4 .. 100, geometric
        found = None
        # The first cap on consecutive reuses that reaches the target, with its smallest threshold.
        # (Choosing among caps by least staleness proxy instead was tried on 8 prompts: at uniform N=4's
        # cost it gained 4.4 dB on tiny-dit but lost 2.7 dB on tiny-video; the proxy is not reliable.)
        # Bisection over the grid (the speed-up grows with the threshold): planning runs inside the
        # first denoiser call of a generation, so it has to take a millisecond or two, not tens.
        for cap in caps or (3, 5, 8, max(8, n)):
            if evaluate(grid[-1], cap)[1] < target - 1e-9:
                continue
            lo, hi = -1, len(grid) - 1  # grid[hi] meets the target; grid[lo] (if any) does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if evaluate(grid[mid], cap)[1] >= target - 1e-9:
                    hi = mid
                else:
                    lo = mid
            per_half, speedup = evaluate(grid[hi], cap)
            found = (grid[hi], cap, per_half, speedup)
            break
        if found is None:
            _, best = evaluate(math.inf, max(8, n))
            raise UnreachableTarget(f"AdaptiveCache reaches at most {best:.2f}x here (warm-up {warmup} steps)")
        threshold, cap, per_half, speedup = found
    error = error_of(per_half)
    computed = [any(b[i] for b in per_half) for i in range(n)]
    order, guard = forecast or verified_forecast(profile, speedup) or FORECASTS["order 0"]
    config = AdaptiveCache(threshold=float(f"{threshold:.6g}"), warmup=warmup, max_consecutive=cap, head_blocks=head_blocks,
                           forecast_order=order, guard=guard)
    return Plan("adaptive_cache", config, speedup, adaptive_wall_speedup(profile, per_half, head_blocks, speedup),
                error, computed)


def adaptive_wall_speedup(profile: Profile, per_half: list[list[bool]], head_blocks: int, flops_speedup: float) -> float:
    """Wall-clock prediction from the measured time of the cached blocks.

    With batched CFG a step where only one half reuses runs the blocks at half the batch, which
    on small models takes well over half the time (the profile measures the ratio); with separate
    CFG calls a reusing half skips a whole call's blocks.
    """
    skipped = _blocks(profile)[head_blocks:]
    share = skipped_time_share(profile, skipped)
    if share is None:
        return wall_speedup(profile, flops_speedup, skipped)
    half = profile.costs.get("half_batch_time_ratio") if profile.costs.get("calls_per_step", 1) == 1 else None
    saved = []
    for i in range(len(per_half[0])):
        reusing = sum(not b[i] for b in per_half)
        if reusing == len(per_half):
            saved.append(share)
        elif reusing and half is not None:  # the rest of the batch still runs the blocks
            saved.append(share * (1.0 - half))
        else:
            saved.append(share * reusing / len(per_half))
    return wall_speedup_per_step(profile, saved)


def staleness_error(computed: list[bool], stale: list[float]) -> float:
    """Summed change the cached blocks accumulated since their last full step, over reused steps."""
    error, last = 0.0, 0
    for i, c in enumerate(computed):
        if c:
            last = i
        else:
            error += stale[i] - stale[last]
    return error


@register_planner
class AdaptiveCachePlanner(Planner):
    """Picks the threshold and cap on consecutive reuses by simulating the method's rule."""

    method = AdaptiveCache
    replans_per_call = True
    forecast_calibrated = True

    def plan(self, profile, times, target, like=None) -> Plan:
        if like is None:
            return plan_adaptive(profile, times, target)
        # A profile without verified forecasts keeps the forecast the user's config asks for.
        return plan_adaptive(profile, times, target, head_blocks=like.head_blocks, warmup=like.warmup,
                             forecast=None if _has_forecasts(profile) else (like.forecast_order, like.guard))

    def simulate(self, profile, times, config) -> Plan:
        return plan_adaptive(profile, times, None, config.head_blocks, config.warmup, config.threshold, config.max_consecutive,
                             forecast=(config.forecast_order, config.guard))

    def call_config(self, config, plan) -> AdaptiveCache:
        return replace(config, threshold=plan.config.threshold, max_consecutive=plan.config.max_consecutive,
                       forecast_order=plan.config.forecast_order, guard=plan.config.guard)

    def summary(self, plan) -> str:
        c = plan.config
        forecast = f", forecast order {c.forecast_order} guard {c.guard:g}" if c.forecast_order else ""
        return f"threshold {c.threshold:g}, max_consecutive {c.max_consecutive}, warmup {c.warmup}{forecast}"


def _has_forecasts(profile: Profile) -> bool:
    return bool(_calibration(profile).get("forecasts"))


def _calibration(profile: Profile) -> dict:
    """The profile's AdaptiveCache calibration runs (``calibrate_psnr``), or {} where it has none."""
    return (getattr(profile, "calibration", None) or {}).get("adaptive_cache") or {}

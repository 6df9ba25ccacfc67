"""Verified DeepCache forecasts: which forecast of the deep features each planned schedule should use.

Forecasting the deep features of a reused step (:mod:`diffaccel.methods.forecast`) helps when the
full steps are close together and hurts when they are far apart: measured on the trained tiny-sd
(eval/results/step_cache.md), order 1 gains 6-12 dB over plain reuse with a full step every 2 of
20 or 50 DDIM steps, a damped order 1 (guard 0.15) gains 1-3 dB every 3 steps, and at every 5 of
20 steps every forecast loses 1-2 dB while every 5 of 50 gains 2-4. No error model in the profile
predicts this, so the planner's schedules for a range of full-step counts are run as real
generations with each forecast setting (``FORECASTS``) on calibration prompts, beside the evenly
spread schedule of as many full steps (a forecast needs even spacing more than plain reuse does:
the planned schedules put full steps next to each other, whose difference extrapolates badly).
Every run's pooled PSNR is kept in ``profile.calibration["deepcache_forecast"]``; the DeepCache
planner (:func:`~diffaccel.profiler.plan_deepcache.verified_forecast`) then runs, at the timesteps
they ran at (that step count and scheduler), the planned schedule with plain reuse unless a forecast
or the evenly spread schedule measured ``MARGIN_DB`` better.

Where the calls run classifier-free guidance, each schedule also runs composed with
``CfgCache(follow_full_steps=True)`` (the unconditional half only on the full steps: cached steps
cost half as much), kept as the run's ``cfg`` entry; the planner composes it where, for a target, it
measured ``MARGIN_DB`` better than the plain schedule that target would otherwise take
(:func:`~diffaccel.profiler.plan_deepcache.composed_cfg`).

``diffaccel profile UNET_MODEL --verify M`` runs this on M prompts.
"""
from __future__ import annotations

import math

from diffaccel.methods.cfg_cache import CfgCache
from diffaccel.methods.deepcache import DeepCache
from diffaccel.pipelines import detect
from diffaccel.profiler.plan_common import FORECASTS, best_label
from diffaccel.profiler.profile import Profile

FORECAST_KEY = "deepcache_forecast"  # profile.calibration key
INTERVALS = (1.25, 1.5, 2, 3, 3.5, 4, 5, 6, 8)  # full-step spacings whose schedules are verified
STATISTIC = "pooled PSNR (dB, of the mean MSE) over the calibration prompts vs the unaccelerated output"


def verified_times(profile: Profile, steps: int | None = None) -> list[float] | None:
    """The timesteps the forecasts were verified at, when there are any (and, given ``steps``, of that count)."""
    times = ((profile.calibration or {}).get(FORECAST_KEY) or {}).get("times")
    return list(times) if times and (steps is None or len(times) == steps) else None


def full_step_counts(n: int) -> list[int]:
    """How many full steps the verified schedules of an ``n``-step profile have: one per interval."""
    return sorted({math.ceil(n / interval) for interval in INTERVALS if 2 <= math.ceil(n / interval) < n})


def uniform_full_steps(n: int, k: int) -> list[int]:
    """k full steps spread evenly over n from step 0: DeepCache's uniform schedule (every N-th step)
    where one has k full steps, else the nearest even spread."""
    steps = list(range(0, n, math.ceil(n / k)))
    return steps if len(steps) == k else sorted({math.floor(i * n / k) for i in range(k)})


def verify_deepcache(pipe, profile: Profile, prompts: list, seeds: list[int], call_kwargs: dict, skip_branch: int = 0,
                     progress: bool = False, validation: list[tuple[list, list[int]]] = ()) -> dict:
    """Run the planned schedule of each of :func:`full_step_counts`, and the evenly spread one where it
    differs, with each of ``FORECASTS``, alone and composed with CfgCache, at ``call_kwargs``' step count
    (default: the profiled one), planned at the scheduler's times for it (what a call of that length plans
    at); put the results into ``profile.calibration`` and return them.

    ``validation``: more (prompts, seeds) sets every run is repeated on; a run keeps its lowest pooled
    PSNR over all sets (per set in ``psnr_sets``), as StepCache's validated schedules do: one set's
    pooled PSNR is set by the one or two captions that react most to a schedule."""
    from diffaccel.profiler.plan_deepcache import plan_full_steps
    from diffaccel.profiler.reuse_error import run_configs

    adapter = detect(pipe)
    n = int(call_kwargs.get("num_inference_steps") or len(profile.times))
    call_kwargs = {**call_kwargs, "num_inference_steps": n}
    pipe.scheduler.set_timesteps(n)
    times = [adapter.normalised_time(float(t)) for t in pipe.scheduler.timesteps]
    schedules = []  # (kind, full steps, FLOPs speed-up)
    for k in full_step_counts(n):
        planned, speedup = plan_full_steps(profile, times, k, skip_branch)
        schedules.append(("planned", planned, speedup))
        uniform = uniform_full_steps(n, k)
        if uniform != planned:
            schedules.append(("uniform", uniform, speedup))
    plain = [DeepCache(skip_branch=skip_branch, schedule=full, forecast_order=order, guard=guard)
             for _, full, _ in schedules for order, guard in FORECASTS.values()]
    configs = plain + [[config, CfgCache(follow_full_steps=True)] for config in plain]
    sets = [(prompts, seeds), *validation]
    runs = [run_configs(pipe, adapter, set_prompts, set_seeds, call_kwargs, configs, progress=progress,
                        desc=f"verifying DeepCache forecasts (seed set {i + 1} of {len(sets)})")
            for i, (set_prompts, set_seeds) in enumerate(sets)]  # runs[set][config]
    # CfgCache acts only where the calls run CFG (guidance_scale > 1): without it, no composed entries.
    cfg_acted = all(r["methods"].get(CfgCache.name, {}).get("uncond_skipped") for r in runs[0][len(plain):])
    per = len(FORECASTS)
    entry = {"steps": n, "times": [round(t, 6) for t in times], "skip_branch": skip_branch, "prompts": len(prompts),
             "statistic": STATISTIC, "runs": []}
    if validation:
        entry["validation"] = [{"prompts": len(p), "seeds": [min(s), max(s)]} for p, s in validation]
    for i, (kind, full, speedup) in enumerate(schedules):
        def measured(offset: int) -> dict:
            first = offset + i * per
            return _measured([set_runs[first:first + per] for set_runs in runs])

        run = {"schedule": kind, "full_steps": full, "speedup": round(speedup, 4), **measured(0)}
        if cfg_acted:
            run["cfg"] = measured(len(plain))
        entry["runs"].append(run)
    profile.calibration = {**(profile.calibration or {}), FORECAST_KEY: entry}
    return entry


def _measured(runs: list[list[dict]]) -> dict:
    """One schedule's runs on each seed set, one per forecast: per forecast the lowest pooled PSNR over the
    sets (each set's too, where there are several) and the lowest worst-seed PSNR, and the forecast to run."""
    lowest = {label: min(set_runs[j]["psnr"] for set_runs in runs) for j, label in enumerate(FORECASTS)}
    out = {"psnr": {label: round(db, 3) for label, db in lowest.items()},
           "psnr_worst": {label: round(min(set_runs[j]["psnr_worst"] for set_runs in runs), 3)
                          for j, label in enumerate(FORECASTS)},
           "best": best_label(lowest)}
    if len(runs) > 1:
        out["psnr_sets"] = {label: [round(set_runs[j]["psnr"], 3) for set_runs in runs] for j, label in enumerate(FORECASTS)}
    return out

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

Local search (``refine`` rounds) then moves one full step of each count's chosen schedule a step
earlier or later at a time, keeping a move that gains ``SEARCH_STEP_DB`` on the calibration prompts:
with few full steps neither the planner's error model nor even spacing places them best (tiny-sd, 4 of
20 full steps: moving them gained 1-3 dB on three training seed sets). The searched schedule and the
one it started from are then re-run on a validation set, and each run is scored by the lower of its
two PSNRs; without validation the search overfits the calibration seeds.

``diffaccel profile UNET_MODEL --verify M [--validate K --refine R]`` runs this on M (and K) prompts.
"""
from __future__ import annotations

import math

from diffaccel.methods.deepcache import DeepCache
from diffaccel.pipelines import detect
from diffaccel.profiler.profile import Profile

FORECAST_KEY = "deepcache_forecast"  # profile.calibration key
# label -> (forecast_order, guard); "order 0" first: it wins ties (the plain DeepCache step)
FORECASTS = {"order 0": (0, 2.0), "order 1": (1, 2.0), "order 1, guard 0.15": (1, 0.15)}
INTERVALS = (2, 3, 4, 5, 6, 8)  # full-step spacings whose schedules are verified
# A forecast, or the evenly spread schedule, replaces plain reuse on the planned schedule only when it
# measured at least this much better: on tiny-sd, options 0.4 dB apart on 48 seeds swapped places on
# other seed sets (eval/results/step_cache.md), so smaller differences are noise, not a choice.
MARGIN_DB = 0.5
SEARCH_STEP_DB = 0.1  # a local-search move must gain at least this much on the calibration prompts
STATISTIC = ("pooled PSNR (dB, of the mean MSE) over the calibration prompts vs the unaccelerated output; "
             "psnr_validation: the same on the validation prompts, for the runs that were validated")


def verified_times(profile: Profile, steps: int | None = None) -> list[float] | None:
    """The timesteps the forecasts were verified at, when there are any (and, given ``steps``, of that count)."""
    times = ((profile.calibration or {}).get(FORECAST_KEY) or {}).get("times")
    return list(times) if times and (steps is None or len(times) == steps) else None


def full_step_counts(n: int) -> list[int]:
    """How many full steps the verified schedules of an ``n``-step profile have: one per interval."""
    return sorted({math.ceil(n / interval) for interval in INTERVALS if 2 <= math.ceil(n / interval) < n})


def score(run: dict, label: str | None = None) -> float:
    """A run's PSNR with forecast ``label`` (default: its chosen one): the lower of calibration and validation."""
    label = label or run["best"]
    return min(run["psnr"][label], run.get("psnr_validation", {}).get(label, math.inf))


def chosen(runs: list[dict]) -> dict:
    """Of the runs of one full-step count: the planned schedule unless another measured ``MARGIN_DB`` better."""
    planned = [r for r in runs if r.get("schedule", "planned") == "planned"]
    run = max(planned or runs, key=score)
    other = max(runs, key=score)
    return other if score(other) >= score(run) + MARGIN_DB else run


def neighbours(full: list[int], n: int) -> list[list[int]]:
    """The schedules with one full step other than step 0 moved one step earlier or later."""
    moved = []
    for i, step in enumerate(full[1:], 1):
        for to in (step - 1, step + 1):
            if 0 < to < n and to not in full:
                moved.append(sorted(full[:i] + [to] + full[i + 1:]))
    return moved


def best_label(psnr: dict[str, float]) -> str:
    """The forecast to run: the best measured one if it beats plain reuse by ``MARGIN_DB``, else plain reuse."""
    best = max(psnr, key=psnr.get)
    return best if psnr[best] >= psnr["order 0"] + MARGIN_DB else "order 0"


def uniform_full_steps(n: int, k: int) -> list[int]:
    """k full steps spread evenly over n from step 0: DeepCache's uniform schedule (every N-th step)
    where one has k full steps, else the nearest even spread."""
    steps = list(range(0, n, math.ceil(n / k)))
    return steps if len(steps) == k else sorted({math.floor(i * n / k) for i in range(k)})


def verify_deepcache(pipe, profile: Profile, prompts: list, seeds: list[int], call_kwargs: dict, skip_branch: int = 0,
                     validation: tuple[list, list[int]] | None = None, refine: int = 0, progress: bool = False) -> dict:
    """Run the planned schedule of each of :func:`full_step_counts`, and the evenly spread one where it
    differs, with each of ``FORECASTS``, at ``call_kwargs``' step count (default: the profiled one),
    planned at the scheduler's times for it (what a call of that length plans at); then ``refine``
    rounds of local search from each count's chosen schedule, validated on ``validation`` (prompts,
    seeds) where given. Put the results into ``profile.calibration`` and return them."""
    from diffaccel.profiler.plan_deepcache import plan_full_steps

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
    run = _Runner(pipe, adapter, prompts, seeds, call_kwargs, skip_branch, progress)
    run([(full, label) for _, full, _ in schedules for label in FORECASTS], "verifying DeepCache forecasts")
    entry = {"steps": n, "times": [round(t, 6) for t in times], "skip_branch": skip_branch, "prompts": len(prompts),
             "statistic": STATISTIC, "runs": [run.record(kind, full, speedup) for kind, full, speedup in schedules]}
    if refine:
        searched, validated = _search(run, entry["runs"], n, refine, validation)
        entry["runs"] += searched
        if validated:
            entry["validation"] = validated
    profile.calibration = {**(profile.calibration or {}), FORECAST_KEY: entry}
    return entry


class _Runner:
    """Runs (full steps, forecast label) pairs on one prompt set, each once: pooled PSNR and worst seed's."""

    def __init__(self, pipe, adapter, prompts, seeds, call_kwargs, skip_branch, progress):
        self.args = pipe, adapter, prompts, seeds, call_kwargs
        self.skip_branch, self.progress, self.done = skip_branch, progress, {}

    def __call__(self, todo: list[tuple[list[int], str]], desc: str) -> dict:
        from diffaccel.profiler.reuse_error import run_configs

        new = list(dict.fromkeys((tuple(full), label) for full, label in todo if (tuple(full), label) not in self.done))
        configs = [DeepCache(skip_branch=self.skip_branch, schedule=list(full), forecast_order=FORECASTS[label][0],
                             guard=FORECASTS[label][1]) for full, label in new]
        if configs:
            for key, result in zip(new, run_configs(*self.args, configs, progress=self.progress, desc=desc)):
                self.done[key] = result
        return {key: round(r["psnr"], 3) for key, r in self.done.items()}

    def record(self, kind: str, full: list[int], speedup: float) -> dict:
        """The entry of a schedule run with every forecast."""
        psnr = {label: round(self.done[tuple(full), label]["psnr"], 3) for label in FORECASTS}
        worst = {label: round(self.done[tuple(full), label]["psnr_worst"], 3) for label in FORECASTS}
        return {"schedule": kind, "full_steps": list(full), "speedup": round(speedup, 4), "psnr": psnr,
                "psnr_worst": worst, "best": best_label(psnr)}


def _search(run: _Runner, runs: list[dict], n: int, rounds: int, validation) -> list[dict]:
    """Local search from each full-step count's chosen run (its forecast kept): per round, every
    :func:`neighbours` schedule of the current one runs, and the best replaces it if it gains
    ``SEARCH_STEP_DB``. The searched schedules (new ones only) are returned as runs of their own with
    every forecast measured; with ``validation``, they and their starting runs are re-run there."""
    current = {}  # k -> (start run, schedule, label)
    for k in sorted({len(r["full_steps"]) for r in runs}):
        start = chosen([r for r in runs if len(r["full_steps"]) == k])
        current[k] = (start, start["full_steps"], start["best"])
    for round_ in range(rounds):
        todo = [(moved, label) for _, full, label in current.values() for moved in neighbours(full, n)]
        psnr = run(todo, f"local search, round {round_ + 1} of {rounds}")
        moved_any = False
        for k, (start, full, label) in current.items():
            options = neighbours(full, n)
            best = max(options, key=lambda m: psnr[tuple(m), label], default=None)
            if best is not None and psnr[tuple(best), label] >= psnr[tuple(full), label] + SEARCH_STEP_DB:
                current[k], moved_any = (start, best, label), True
        if not moved_any:
            break
    changed = {k: v for k, v in current.items() if v[1] != v[0]["full_steps"]}
    run([(full, label) for _, full, _ in changed.values() for label in FORECASTS], "local search, every forecast")
    searched = {k: {**run.record("searched", full, start["speedup"]), "start": start["full_steps"]}
                for k, (start, full, _) in changed.items()}
    validated = None
    if validation is not None and searched:
        validated = _validate(run, [r for k in searched for r in (current[k][0], searched[k])], validation)
    return list(searched.values()), validated


def _validate(run: _Runner, runs: list[dict], validation: tuple[list, list[int]]) -> dict:
    """Each run's chosen forecast re-run on the validation prompts (seeds whose unaccelerated output a
    1e-4 perturbation of the noise changes are left out: no schedule can match them)."""
    from diffaccel.profiler.reuse_error import noise_sensitivity
    from diffaccel.profiler.verify_step_cache import CHAOTIC_DB

    pipe, adapter, _, _, call_kwargs = run.args
    prompts, seeds = validation
    calm = [(p, s) for p, s, db in zip(prompts, seeds, noise_sensitivity(pipe, prompts, seeds, call_kwargs)) if db >= CHAOTIC_DB]
    if not calm:
        raise ValueError("Every validation seed is chaotic (its output changes under a 1e-4 noise perturbation); "
                         "validate on other seeds.")
    check = _Runner(pipe, adapter, [p for p, _ in calm], [s for _, s in calm], call_kwargs, run.skip_branch, run.progress)
    psnr = check([(r["full_steps"], r["best"]) for r in runs], "validating searched schedules")
    for r in runs:
        r["psnr_validation"] = {r["best"]: psnr[tuple(r["full_steps"]), r["best"]]}
    return {"seeds": [s for _, s in calm], "left_out_chaotic": [s for s in seeds if s not in {c for _, c in calm}]}

"""DeepCache planner: how many full steps a target needs, and which steps they are.

Error model. With a measured reuse-error table in the profile (``profile.reuse_error``, see
:mod:`diffaccel.profiler.reuse_error`), a reused step i whose deep features come from full step
f costs ``w_i * e(t_i, age)``: e is the measured RMS change of the guided denoiser output at
time t_i when the deep features are ``age`` profiled steps old (interpolated in time and age,
so it ports to other step counts and schedulers), and w_i = sqrt(alpha_bar(t_{i+1})) *
|sigma(t_i) - sigma(t_{i+1})| (sigma = sqrt((1 - alpha_bar) / alpha_bar)) is how much a DDIM
step moves the latent per unit of output error. The schedule's error is the sum over reused
steps (latent errors of the steps add up, to first order).

Why this model (eval/results/deepcache_error_model.md; trained tiny-sd, 20 DDIM steps, 8
prompts): the deep features drift most at the noisy start, but there the output depends little
on them; the measured output error is smallest mid-trajectory and largest at the last steps.
Over 32 measured schedules (4-11 full steps) the predicted error ranks the measured PSNR with
Spearman 0.98; the drift proxy does much worse (numbers in that file).

Without the table (profiles from older diffaccel) the fallback is the summed accumulated drift
of the deep feature (:func:`drift_cost`), a proxy that ignores how much the output
depends on the deep features.

Full steps are chosen by dynamic programming over segment starts, which finds the least
predicted error over *all* schedules with that many full steps, uniform ones included.

Composed with CfgCache. Where the profile's verified runs (:mod:`diffaccel.profiler.verify_deepcache`)
measured DeepCache + ``CfgCache(follow_full_steps=True)`` (cached steps run the conditional half alone,
so they cost half as much), a target takes that composition when its run measured ``MARGIN_DB`` better
than the plain schedule the target would otherwise take (:func:`composed_cfg`): more full steps at the
same cost. The decision depends on the profile and the target only, so the per-call re-plans of one
``accelerate`` call all agree with the CfgCache it installed. The error model does not cover CfgCache, so
a composed plan carries the predicted error of the plain plan it measured better than (an upper bound in
the model's units, which a ``--max-error`` bound then reads).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from typing import NamedTuple

from diffaccel.methods.cfg_cache import CfgCache
from diffaccel.methods.deepcache import DeepCache, FullStepRule, cached_modules
from diffaccel.profiler.plan_common import (FORECASTS, MARGIN_DB, Plan, UnreachableTarget, skipped_time_share, wall_speedup,
                                            wall_speedup_per_step)
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.profile import Profile, ProfileError
from diffaccel.profiler.verify_deepcache import FORECAST_KEY, verified_times as forecast_times

# The measured output error (reuse_error.py) covers skip branch 0, the one presets and plans use,
# at ages up to REUSE_AGES steps; older ages are extrapolated.
REUSE_BRANCH, REUSE_AGES = 0, 8


def deepcache_source(profile: Profile, skip_branch: int) -> str:
    """The recorded block whose output the cached deep path hands to the shallow path."""
    ups = [m["name"] for m in profile.modules if m["kind"] == "block" and m["name"].startswith("up_blocks.")]
    depth = skip_branch // 3
    index = len(ups) - 2 - depth
    return f"up_blocks.{index}" if index >= 0 else "mid_block"


# ---- the measured output-error model ------------------------------------------------------
class OutputErrorModel:
    """cost(i, f): predicted latent error of reusing at step i the deep features of full step f."""

    def __init__(self, table: dict, sigma: list, profile_times: list[float], times: list[float]):
        self.rows = [[0.0] + [_finite(v) for v in row] for row in table["mean"]]  # age 0 costs nothing
        self.profile_times = [float(t) for t in profile_times]
        self.times = times
        sig = [_sigma_at(sigma, t) for t in times] + [_sigma_at(sigma, 0.0)]
        # DDIM's coefficient on the model output in the latent x: sqrt(alpha_bar_next) * |d sigma|.
        self.weights = [abs(sig[i] - sig[i + 1]) / math.sqrt(1.0 + sig[i + 1] ** 2) for i in range(len(times))]
        self.position = [self._index(t) for t in times]  # fractional profiled-step index of each time

    def _index(self, t: float) -> float:
        ts = self.profile_times
        if t >= ts[0]:
            return 0.0
        for j in range(1, len(ts)):
            if t >= ts[j]:
                return j - 1 + (ts[j - 1] - t) / (ts[j - 1] - ts[j])
        return float(len(ts) - 1)

    def output_error(self, x: float, age: float) -> float:
        """Table value at fractional step x and age (in profiled steps), linear in both."""
        j = min(int(x), len(self.rows) - 2) if len(self.rows) > 1 else 0
        w = min(max(x - j, 0.0), 1.0)
        a = self._at_age(self.rows[j], age)
        return a if len(self.rows) == 1 else (1 - w) * a + w * self._at_age(self.rows[j + 1], age)

    @staticmethod
    def _at_age(row: list[float], age: float) -> float:
        known = [k for k, v in enumerate(row) if not math.isnan(v)]  # nan: older than step 0 when profiled
        top = known[-1]
        if age >= top:  # beyond the measured ages: extend the last measured growth per step
            slope = (row[top] - row[known[-2]]) / (top - known[-2]) if len(known) > 1 else 0.0
            return row[top] + max(slope, 0.0) * (age - top)
        k = int(age)
        lo, hi = row[k], row[k + 1]
        if math.isnan(hi):
            return lo
        return lo + (age - k) * (hi - lo)

    def cost(self, i: int, f: int) -> float:
        x, age = self.position[i], self.position[i] - self.position[f]
        return self.weights[i] * self.output_error(x, max(age, 0.0))


def output_error_model(profile: Profile, skip_branch: int, times: list[float]) -> OutputErrorModel | None:
    table = (profile.reuse_error or {}).get("deepcache", {}).get(str(skip_branch))
    sigma = (profile.reuse_error or {}).get("sigma")
    if not table or not sigma:
        return None
    return OutputErrorModel(table, sigma, profile.times, times)


def _finite(v) -> float:
    return math.nan if v is None else float(v)


def _sigma_at(curve: list, t: float) -> float:
    """sigma at normalised time t, interpolated in log sigma (curve sorted by time)."""
    if t <= curve[0][0]:
        return curve[0][1]
    for (t0, s0), (t1, s1) in zip(curve, curve[1:]):
        if t <= t1:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return math.exp((1 - w) * math.log(s0) + w * math.log(s1))
    return curve[-1][1]


# ---- the drift proxy (old profiles) --------------------------------------------------------
def drift_cost(cum: list[float]):
    return lambda i, f: cum[i] - cum[f]


# ---- choosing the full steps ---------------------------------------------------------------
def schedule_error(cost, n: int, full: list[int]) -> float:
    fulls, last, total = set(full), 0, 0.0
    for i in range(n):
        if i in fulls:
            last = i
        else:
            total += cost(i, last)
    return total


def best_full_steps(cost, n: int, k: int) -> list[int]:
    """The k full steps (step 0 included) minimising the summed cost(i, last full before i)."""
    k = max(1, min(k, n))
    # seg[f][g]: cost of steps f+1..g-1 served by full step f (g = n: to the end)
    seg = [[0.0] * (n + 1) for _ in range(n)]
    for f in range(n):
        run = 0.0
        for g in range(f + 1, n + 1):
            seg[f][g] = run
            if g < n:
                run += cost(g, f)
    inf = math.inf
    best = [[inf] * n for _ in range(k + 1)]  # best[j][f]: j full steps chosen, the last at f
    back = [[-1] * n for _ in range(k + 1)]
    best[1][0] = 0.0
    for j in range(2, k + 1):
        for g in range(j - 1, n):
            for f in range(j - 2, g):
                if best[j - 1][f] < inf:
                    v = best[j - 1][f] + seg[f][g]
                    if v < best[j][g]:
                        best[j][g], back[j][g] = v, f
    last = min(range(n), key=lambda f: best[k][f] + seg[f][n] if best[k][f] < inf else inf)
    steps, j = [], k
    while last >= 0 and j >= 1:
        steps.append(last)
        last, j = back[j][last], j - 1
    return sorted(steps)


def choose_full_steps(cum: list[float], k: int) -> list[int]:
    """The k full steps minimising summed drift staleness (the proxy of profiles without a table)."""
    return best_full_steps(drift_cost(cum), len(cum), k)


def _model(profile: Profile, times: list[float], skip_branch: int):
    """(cost(i, f), FLOPs of a full call, FLOPs a reused step saves, note) for planning at ``times``."""
    saved = profile.costs.get("deepcache_saved", {}).get(str(skip_branch))
    if saved is None:
        raise ProfileError(f"The profile has no DeepCache costs for skip branch {skip_branch} "
                           f"(skip branches: {sorted(profile.costs.get('deepcache_saved', {}))}).")
    full = float(profile.costs["call"])
    model = output_error_model(profile, skip_branch, times)
    if model is not None:
        return model.cost, full, saved, ""
    drift = drift_cost(profile.drift(deepcache_source(profile, skip_branch)).on(times))
    return (lambda i, f: drift(i, f) * saved / full), full, saved, (  # noqa: E731
        "error model: deep-feature drift (profile has no measured reuse error; re-profile for the output-error model)")


def plan_full_steps(profile: Profile, times: list[float], k: int, skip_branch: int = 0) -> tuple[list[int], float]:
    """(the k full steps the planner picks at ``times``, their FLOPs speed-up)."""
    cost, full, saved, _ = _model(profile, times, skip_branch)
    n = len(times)
    steps = best_full_steps(cost, n, k)
    return steps, n * full / (len(steps) * full + (n - len(steps)) * (full - saved))


class Verified(NamedTuple):
    steps: list[int] | None  # the full steps to run (None: the planner's own)
    forecast_order: int
    guard: float
    note: str = ""
    psnr: float | None = None  # measured, when ``steps`` is a verified run


def verified_forecast(profile: Profile, times: list[float], k: int, skip_branch: int = 0) -> Verified:
    """The full steps (or None: the planner's) and forecast for a schedule of ``k`` full steps at
    ``times``, from the profile's verified runs (:mod:`diffaccel.profiler.verify_deepcache`): with
    runs of k full steps, the planned schedule with its chosen forecast, unless the evenly spread one
    measured ``MARGIN_DB`` better; else the forecast chosen on the planned run with the nearest number
    of full steps.
    Plain reuse at other timesteps than the verified ones (another step count or scheduler): which
    forecast wins changes with them (tiny-sd: damped order 1 gains 6 dB with 10 of 20 full steps,
    order 1 loses 8 dB with 5 of 10)."""
    entry = (profile.calibration or {}).get(FORECAST_KEY) or {}
    runs = entry.get("runs") if entry.get("skip_branch") == skip_branch else None
    plain = FORECASTS["order 0"]
    if not runs or k < 2:  # one full step: nothing to extrapolate from
        return Verified(None, *plain)
    ran_at = entry.get("times") or []
    if len(ran_at) != len(times) or any(abs(a - b) > 1e-4 for a, b in zip(ran_at, times)):
        why = f"{entry['steps']} steps, not {len(times)}" if len(ran_at) != len(times) else "other timesteps (scheduler)"
        return Verified(None, *plain, f"forecast: none (verified at {why})")
    run = exact = chosen_run(runs, k)
    if exact is None:
        run = min((r for r in runs if r.get("schedule", "planned") == "planned"),
                  key=lambda r: (abs(len(r["full_steps"]) - k), len(r["full_steps"])))
    psnr = run["psnr"]
    note = (f"forecast: {run['best']} (measured {psnr[run['best']]:.1f} dB vs {psnr['order 0']:.1f} dB plain reuse on the "
            f"{run.get('schedule', 'planned')} schedule of {len(run['full_steps'])} of {entry['steps']} full steps)")
    if exact is None:
        return Verified(None, *FORECASTS[run["best"]], note)
    return Verified(run["full_steps"], *FORECASTS[run["best"]], note, psnr[run["best"]])


def chosen_run(runs: list[dict], k: int, part: str | None = None) -> dict | None:
    """The verified run of ``k`` full steps a plan takes (None: none ran): the planned schedule unless
    another measured ``MARGIN_DB`` better; ``part="cfg"`` compares the runs composed with CfgCache."""
    measured = (lambda r: r.get(part)) if part else (lambda r: r)  # noqa: E731
    exact = [r for r in runs if len(r["full_steps"]) == k and measured(r) is not None]
    if not exact:
        return None
    score = lambda r: measured(r)["psnr"][measured(r)["best"]]  # noqa: E731
    planned = [r for r in exact if r.get("schedule", "planned") == "planned"]
    run, other = max(planned or exact, key=score), max(exact, key=score)
    return other if score(other) >= score(run) + MARGIN_DB else run


def step_speedup(full: float, saved: float, n: int, k: int, cfg: bool = False) -> float:
    """FLOPs speed-up of k full steps of n; with CfgCache a cached step runs the conditional half alone."""
    return n * full / (k * full + (n - k) * (full - saved) * (0.5 if cfg else 1.0))


def full_step_count(full: float, saved: float, n: int, target: float, cfg: bool = False) -> int | None:
    """The most full steps of n that still meet ``target`` (None: not even one does)."""
    return max((k for k in range(1, n + 1) if step_speedup(full, saved, n, k, cfg) >= target - 1e-9), default=None)


def composed_cfg(profile: Profile, target: float, skip_branch: int = 0) -> dict | None:
    """The verified run (with its ``cfg`` entry) a plan for ``target`` composes with CfgCache, or None.

    Decided at the timesteps the runs were verified at, from the profile and the target alone: the
    composition needs a run of exactly as many full steps as meet the target with CfgCache, measuring
    ``MARGIN_DB`` above the plain schedule the target takes otherwise. When that plain schedule was not
    run, the verified run with the nearest larger number of full steps stands for it (more full steps,
    more PSNR: the comparison errs towards not composing)."""
    entry = (profile.calibration or {}).get(FORECAST_KEY) or {}
    runs = entry.get("runs") if entry.get("skip_branch") == skip_branch else None
    if not runs or not any("cfg" in r for r in runs):
        return None
    full, saved = float(profile.costs["call"]), float(profile.costs["deepcache_saved"][str(skip_branch)])
    n = int(entry["steps"])
    k = full_step_count(full, saved, n, target, cfg=True)
    run = chosen_run(runs, k, "cfg") if k is not None and k >= 2 else None
    if run is None:
        return None
    plain_k = full_step_count(full, saved, n, target)
    if plain_k is not None:
        above = sorted(len(r["full_steps"]) for r in runs if len(r["full_steps"]) >= plain_k)
        if not above:
            return None
        plain = chosen_run(runs, above[0])
        if run["cfg"]["psnr"][run["cfg"]["best"]] < plain["psnr"][plain["best"]] + MARGIN_DB:
            return None
    return run


def plan_deepcache(profile: Profile, times: list[float], target: float | None, skip_branch: int = 0,
                   full_steps: list[int] | None = None) -> Plan:
    """DeepCache plan for ``times``; ``full_steps`` evaluates a given schedule instead of choosing.

    At the timesteps the profile verified, a chosen schedule and its forecast are
    :func:`verified_forecast`'s, with the measured PSNR where it was run, or, where :func:`composed_cfg`
    says so, those of the verified run composed with CfgCache; the predicted error is that of plain
    reuse (the measured error model's; for a composed plan, of the plain plan it replaces)."""
    cost, full, saved, note = _model(profile, times, skip_branch)
    n = len(times)
    forecast, psnr, cfg, replaced = {}, None, None, None
    if full_steps is None:
        cfg = composed_cfg(profile, target, skip_branch)
        k = full_step_count(full, saved, n, target, cfg is not None)
        if k is None:
            raise UnreachableTarget(f"DeepCache reaches at most {step_speedup(full, saved, n, 1):.2f}x here")
        if cfg is None:
            verified = verified_forecast(profile, times, k, skip_branch)
            full_steps, psnr = verified.steps or best_full_steps(cost, n, k), verified.psnr
            forecast = dict(forecast_order=verified.forecast_order, guard=verified.guard)
            note = "; ".join(x for x in (note, verified.note) if x)
        else:
            full_steps, forecast, psnr, cfg_note = _composed_schedule(profile, times, k, cfg, cost)
            note = "; ".join(x for x in (note, cfg_note) if x)
            plain_k = full_step_count(full, saved, n, target)
            if plain_k is not None:  # the plan it replaces: its error stands for this one's (see the module doc)
                replaced = verified_forecast(profile, times, plain_k, skip_branch).steps or best_full_steps(cost, n, plain_k)
    else:
        full_steps = sorted({0, *(s for s in full_steps if s < n)})
    k = len(full_steps)
    speedup = step_speedup(full, saved, n, k, cfg is not None)
    config = DeepCache(skip_branch=skip_branch, schedule=[float(times[s]) for s in full_steps], **forecast)
    computed = [s in set(full_steps) for s in range(n)]
    skipped = profile.costs.get("deepcache_paths", {}).get(str(skip_branch), ())
    return Plan("deepcache", config, speedup, _wall(profile, speedup, skipped, computed, cfg is not None),
                schedule_error(cost, n, replaced or full_steps), computed, note, psnr=psnr,
                with_methods=(CfgCache(follow_full_steps=True),) if cfg is not None else ())


def _composed_schedule(profile: Profile, times: list[float], k: int, run: dict, cost) -> tuple:
    """(full steps, forecast, measured PSNR, note) of k full steps composed with CfgCache: the verified run's
    at its timesteps, else the planner's schedule with plain reuse (which forecast wins changes with the
    timesteps, see :func:`verified_forecast`)."""
    entry = profile.calibration[FORECAST_KEY]
    measured = run["cfg"]
    same = len(entry["times"]) == len(times) and all(abs(a - b) <= 1e-4 for a, b in zip(entry["times"], times))
    note = (f"with CfgCache: measured {measured['psnr'][measured['best']]:.1f} dB on the {run['schedule']} schedule of "
            f"{len(run['full_steps'])} of {entry['steps']} full steps, {measured['best']}")
    if same and len(run["full_steps"]) == k:
        return run["full_steps"], dict(zip(("forecast_order", "guard"), FORECASTS[measured["best"]])), \
            measured["psnr"][measured["best"]], note
    return best_full_steps(cost, len(times), k), {}, None, note + f" (at {entry['steps']} steps; here plain reuse)"


def _wall(profile: Profile, speedup: float, skipped, computed: list[bool], cfg: bool) -> float:
    """Predicted whole-generation speed-up; a cached step with CfgCache runs the shallow path on half the
    rows, which takes the measured half-batch share of the time (small models gain less than half)."""
    share = skipped_time_share(profile, skipped) if cfg else None
    if share is None:
        return wall_speedup(profile, speedup, skipped)
    half = profile.costs.get("half_batch_time_ratio") if profile.costs.get("calls_per_step", 1) == 1 else None
    cached = 1.0 - (1.0 - share) * float(half or 0.5)
    return wall_speedup_per_step(profile, [0.0 if c else cached for c in computed])


def resolved_full_steps(config: DeepCache, times: list[float]) -> list[int]:
    """The full steps ``config`` takes on a loop with normalised ``times`` (as the method decides)."""
    rule = FullStepRule(config, len(times))
    return [step for step, t in enumerate(times) if rule.full(step, t)]


@register_planner
class DeepCachePlanner(Planner):
    """Chooses how many full steps a target needs and, by dynamic programming, which ones."""

    method = DeepCache
    replans_per_call = True

    def timed_modules(self, adapter) -> set[str]:
        return {path for branch in adapter.skip_branches() for path in cached_modules(adapter.denoiser, branch.branch_id)}

    def costs(self, adapter, module_flops: dict[str, int]) -> dict:
        paths = {str(b.branch_id): cached_modules(adapter.denoiser, b.branch_id) for b in adapter.skip_branches()}
        return {"deepcache_saved": {b: sum(module_flops.get(p, 0) for p in ps) for b, ps in paths.items()},
                "deepcache_paths": paths}

    @contextlib.contextmanager
    def probe(self, pipe, adapter):
        if REUSE_BRANCH not in {b.branch_id for b in adapter.skip_branches()}:
            yield None
            return
        from diffaccel.profiler.reuse_error import ReuseProbe

        with ReuseProbe(pipe, REUSE_BRANCH, REUSE_AGES) as probe:
            yield probe

    def probe_result(self, probe) -> list:
        return probe.errors

    def reuse_error(self, pipe, results: list) -> dict:
        from diffaccel.profiler.reuse_error import aggregate_reuse, sigma_curve

        sigma = sigma_curve(pipe.scheduler)
        if sigma is None:
            return {}
        return {"deepcache": {str(REUSE_BRANCH): aggregate_reuse(results)}, "sigma": sigma,
                "statistic": "RMS change of the guided denoiser output when DeepCache's deep features are [age] "
                             "steps old (age 1..K), at the profiled trajectory's inputs, mean over prompts; sigma = "
                             "sqrt((1 - alpha_bar) / alpha_bar) over normalised time"}

    def plan(self, profile, times, target, like=None) -> Plan:
        return plan_deepcache(profile, times, target, skip_branch=like.skip_branch if like is not None else 0)

    def verified_times(self, profile, steps=None) -> list[float] | None:
        return forecast_times(profile, steps)

    def simulate(self, profile, times, config) -> Plan:
        return plan_deepcache(profile, times, None, config.skip_branch, full_steps=resolved_full_steps(config, times))

    def call_config(self, config, plan) -> DeepCache:
        return replace(config, schedule=[i for i, c in enumerate(plan.computed) if c],
                       forecast_order=plan.config.forecast_order, guard=plan.config.guard)

    def summary(self, plan) -> str:
        forecast = plan.config.forecast_order and f", forecast order {plan.config.forecast_order}" + (
            f" guard {plan.config.guard:g}" if plan.config.guard < 1 else "")
        return f"branch {plan.config.skip_branch}, full steps {[i for i, c in enumerate(plan.computed) if c]}{forecast or ''}"

"""From predicted error to PSNR: the profiler checks its error model against real outputs.

After profiling, the plans for a few targets (``PROBE_TARGETS``) of each planner method are run on
the first profiled prompts and compared with the unaccelerated output of the same seed. The pairs
(predicted error, measured PSNR) go into the profile; ``diffaccel schedule --min-psnr X`` fits
``psnr = a + b * log10(error)`` to them (PSNR = 10 log10(1 / MSE) and the error model predicts a
latent RMS, so b should be near -20; with fewer than two usable points b = -20 is assumed) and
takes the fastest plan whose predicted PSNR is at least X.

For a planner with ``forecast_calibrated`` (AdaptiveCache) each probe plan also runs with each forecast of
the reused residuals (``FORECASTS``), so the planner can pick the forecast the model measured best at
that cost (:func:`~diffaccel.profiler.plan_adaptive.verified_forecast`).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import replace

import torch

from diffaccel.metrics import psnr
from diffaccel.pipelines import detect
from diffaccel.profiler.plan_common import FORECASTS, Plan, UnreachableTarget
from diffaccel.profiler.planner import planner_for, planners_for
from diffaccel.profiler.profile import Profile, ProfileError
from diffaccel.profiler.schedule import max_reachable_for, plan_method, planning_times, speed_key
from diffaccel.state import attach, detach, session_of

PROBE_TARGETS = (1.5, 2.0, 3.0)
DEFAULT_SLOPE = -20.0


def _images(pipe, prompt, call_kwargs, seed) -> torch.Tensor:
    device = getattr(pipe, "device", torch.device("cpu"))
    kwargs = {**call_kwargs, "output_type": "pt"}
    if prompt is not None:
        kwargs["prompt"] = prompt
    with torch.no_grad():
        out = pipe(generator=torch.Generator(device=device).manual_seed(seed), **kwargs)
    images = out.frames if hasattr(out, "frames") else out.images
    return images.float().clamp(0, 1)


def run_config(plan: Plan):
    """The method config that reproduces ``plan`` at the planned step count."""
    return planner_for(plan.method).call_config(plan.config, plan)


def calibrate_psnr(pipe, profile: Profile, prompts: list, call_kwargs: dict, seeds: list[int],
                   targets=PROBE_TARGETS) -> dict:
    """{method: {"pairs": [[predicted error, PSNR dB, predicted speed-up, measured speed-up], ...],
    "settings": [config of each pair], ...}} measured on ``pipe``."""
    adapter = detect(pipe)
    call_kwargs = {k: v for k, v in call_kwargs.items() if k != "output_type"}
    times = profile.times
    baselines = [_images(pipe, p, call_kwargs, s) for p, s in zip(prompts, seeds)]
    out = {}
    for planner in planners_for(profile.family):
        pairs, settings, forecasts = [], [], []
        for target in targets:
            try:
                plan = plan_method(planner.name, profile, times, target)
            except (UnreachableTarget, ProfileError):  # out of reach, or the profile lacks this method's data
                continue
            config = run_config(plan)
            value, speedup = _run(pipe, adapter, config, prompts, seeds, baselines, call_kwargs)
            # The measured speed-up lets a planner correct its cost model (plan_adaptive's feedback).
            pairs.append([plan.error, value, plan.speedup, speedup])
            settings.append({k: v for k, v in plan.config.to_dict().items() if isinstance(v, (int, float, str, bool))})
            if planner.forecast_calibrated:
                forecasts.append({label: [value, speedup] if (order, guard) == (config.forecast_order, config.guard) else
                                  list(_run(pipe, adapter, replace(config, forecast_order=order, guard=guard), prompts, seeds,
                                            baselines, call_kwargs))
                                  for label, (order, guard) in FORECASTS.items()})
        if not pairs:
            continue
        out[planner.name] = {"pairs": pairs, "settings": settings, "prompts": len(prompts), "steps": len(times),
                       "statistic": "PSNR of the decoded output vs the unaccelerated output of the same seed, mean over prompts"}
        if forecasts:  # per pair: forecast label -> [PSNR, measured speed-up] of the same plan with that forecast
            out[planner.name]["forecasts"] = forecasts
    return out


def _run(pipe, adapter, config, prompts, seeds, baselines, call_kwargs) -> tuple[float, float]:
    """(mean PSNR, mean measured FLOPs speed-up) of ``config`` over the prompts."""
    config.validate()
    values, speedups = [], []
    for prompt, seed, base in zip(prompts, seeds, baselines):
        attach(pipe, adapter, [config])
        try:
            values.append(psnr(_images(pipe, prompt, call_kwargs, seed), base))
            speedups.append(1.0 / (1.0 - session_of(pipe).stats()["flops_saved_fraction"]))
        finally:
            detach(pipe)
    return statistics.mean(values), statistics.mean(speedups)


def fit(pairs: list) -> tuple[float, float]:
    """(a, b) of psnr = a + b log10(error) over the usable pairs (finite PSNR, error > 0)."""
    pts = [(math.log10(e), p) for e, p, *_ in pairs if e and e > 0 and math.isfinite(p)]
    if not pts:
        raise ProfileError("The profile's PSNR calibration has no usable points (all probe schedules were exact).")
    xs = [x for x, _ in pts]
    if len(pts) >= 2 and max(xs) - min(xs) > 1e-6:
        mx, my = statistics.mean(xs), statistics.mean(p for _, p in pts)
        b = sum((x - mx) * (p - my) for x, p in pts) / sum((x - mx) ** 2 for x in xs)
        if b < 0:
            return my - b * mx, b
    b = DEFAULT_SLOPE  # one point, or a fit that makes more error look better: keep the physics
    return statistics.mean(p - b * x for x, p in pts), b


def predicted_psnr(profile: Profile, plan: Plan) -> float | None:
    """The calibrated PSNR prediction for ``plan`` (its measured PSNR for a verified schedule; None
    without a calibration for its method)."""
    if plan.psnr is not None:
        return plan.psnr
    cal = (profile.calibration or {}).get(plan.method)
    if not cal or not cal.get("pairs"):
        return None
    a, b = fit(cal["pairs"])
    return math.inf if plan.error <= 0 else a + b * math.log10(plan.error)


def plan_for_min_psnr(profile: Profile, min_psnr: float, steps: int | None = None) -> tuple[Plan, list[Plan]]:
    """The fastest plan whose calibrated predicted PSNR is at least ``min_psnr`` dB, of the most
    preferred method that has one (:func:`~diffaccel.profiler.schedule.speed_key`)."""
    if isinstance(min_psnr, bool) or not isinstance(min_psnr, (int, float)) or not math.isfinite(min_psnr):
        raise ValueError(f"--min-psnr must be a number of dB (e.g. 35), got {min_psnr!r}.")
    from diffaccel.profiler.plan_step_cache import verified

    methods = [p.name for p in planners_for(profile.family) if (profile.calibration or {}).get(p.name, {}).get("pairs")]
    times = planning_times(profile, steps)  # where schedules were verified at this step count, their timesteps
    # StepCache's verified schedules carry their measured PSNR: no fit needed (at the timesteps they ran at).
    runs = verified(profile, times)
    if not methods and not runs:
        raise ProfileError(f"This profile of {profile.model} has no PSNR calibration, which --min-psnr needs. Re-profile "
                           "with this diffaccel (`diffaccel profile MODEL --out P.json`) or use --target-speedup / --max-error.")
    # Predicted PSNRs of different methods are not equally trustworthy (StepCache's are measured, the
    # others' fitted on 2 prompts): speed_key ranks the planners' measured preference first.
    best = max((p for p in runs if p.psnr >= min_psnr and p.speedup > 1.0 + 1e-9), key=speed_key, default=None)
    saving = [p for p in runs if p.speedup > 1.0 + 1e-9]
    closest = (max(p.psnr for p in saving), None) if saving else None
    methods = [m for m in methods if not (runs and m == "step_cache")]
    for method in methods:
        top = max_reachable_for(method, profile, times)
        plans = [plan_method(method, profile, times, top ** (i / 60)) for i in range(61)]  # 1x to the most, geometric
        if any(p.psnr is not None for p in plans):  # some were run for real at these timesteps (DeepCache's
            plans = [p for p in plans if p.psnr is not None]  # verified ones): a 2-prompt fit does not overrule them
        for plan in plans:
            value = predicted_psnr(profile, plan)
            if plan.speedup > 1.0 + 1e-9 and (closest is None or value > closest[0]):
                closest = (value, plan)
            if value >= min_psnr and (best is None or speed_key(plan) > speed_key(best)):
                best = plan
    if best is None or best.speedup <= 1.0 + 1e-9:
        reach = f"the most accurate schedule that saves anything is predicted at {closest[0]:.1f} dB" if closest else "nothing saves compute"
        raise UnreachableTarget(f"No schedule is predicted to keep PSNR >= {min_psnr:g} dB for {profile.model} at "
                                f"{len(times)} steps ({reach}); ask for a lower --min-psnr.")
    return best, [best]

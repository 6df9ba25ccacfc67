"""AdaptiveCache planner: per-CFG-branch simulation, checked against the method's own decisions."""
from __future__ import annotations

import pytest
import torch

import diffaccel
import tiny_pipes as tp
from diffaccel.profiler.measure import measure
from diffaccel.profiler.plan_adaptive import half_signals, fitted_feedback, plan_adaptive, simulate_adaptive
from diffaccel.profiler.plan_common import step_times
from diffaccel.profiler.profile import Profile

STEPS = 8


def _kwargs(name):
    kw = tp.call_kwargs(name, steps=STEPS)
    kw.pop("generator"), kw.pop("output_type")
    return kw


def _two_branch_profile(cond, uncond):
    """A hand-made profile: one head block whose residual changes by ``cond`` / ``uncond`` per step."""
    n = len(cond)
    rows = lambda vals: [[v, v] for v in vals]  # columns: head block, one cached block
    stats = {"rel_l1": {"mean": rows([None] + [0.1] * (n - 1))},
             "residual_rel_l1": {"mean": rows([None] + [(a + b) / 2 for a, b in zip(cond[1:], uncond[1:])])},
             "residual_rel_l1@cond": {"mean": rows([None] + cond[1:])},
             "residual_rel_l1@uncond": {"mean": rows([None] + uncond[1:])}}
    return Profile(model="hand", pipeline="PixArtAlphaPipeline", family="image_dit", fingerprint={},
                   times=[1 - i / n for i in range(n)], modules=[{"name": "b0", "kind": "block"}, {"name": "b1", "kind": "block"}],
                   stats=stats, costs={"call": 100.0, "blocks": ["b0", "b1"], "modules": {"b0": 50.0, "b1": 50.0}})


def test_branches_are_simulated_on_their_own_signals():
    # cond changes little, uncond a lot: at threshold 0.25 only cond reuses (half the cached blocks).
    profile = _two_branch_profile([0] + [0.1] * 5, [0] + [0.5] * 5)
    assert len(half_signals(profile, "b0")) == 2
    plan = plan_adaptive(profile, profile.times, None, warmup=1, threshold=0.25, max_consecutive=8)
    cond_reuse = [False, True, True, False, True, True]  # accumulated 0.1, 0.2, then 0.3 >= 0.25 computes
    expected = 100 * 6 / sum(100 - 50 * r / 2 for r in cond_reuse)  # a reusing branch saves half of b1
    assert plan.speedup == pytest.approx(expected)
    # The batch-wide average (0.3 per step after warm-up) never reuses at this threshold.
    del profile.stats["residual_rel_l1@cond"], profile.stats["residual_rel_l1@uncond"]
    assert plan_adaptive(profile, profile.times, None, warmup=1, threshold=0.25, max_consecutive=8).speedup == 1.0


@pytest.mark.parametrize("name", ["pixart", "wan"])  # batched CFG, separate CFG calls
def test_profile_records_branches_and_predicts_the_method(name):
    pipe = tp.build(name)
    kwargs = _kwargs(name)
    profile = measure(pipe, [None], kwargs, model=f"{name}-test", progress=False)
    assert {"residual_rel_l1@cond", "residual_rel_l1@uncond"} <= set(profile.stats)
    times = step_times(profile)
    checked = 0
    for threshold in (0.05, 0.2, 0.5, 2.0):
        plan = plan_adaptive(profile, times, None, warmup=1, threshold=threshold, max_consecutive=3)
        diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=threshold, warmup=1, max_consecutive=3)])
        try:
            with torch.no_grad():  # same seed and inputs as the profiled generation
                pipe(**tp.call_kwargs(name, steps=STEPS))
            measured = 1 / (1 - diffaccel.stats(pipe)["flops_saved_fraction"])
        finally:
            diffaccel.disable(pipe)
        checked += measured > 1.01
        assert measured == pytest.approx(plan.speedup, rel=0.01), threshold  # batch-wide signal: wan 3% off at 0.2
    assert checked >= 2  # the thresholds exercised reuse, not only full computation


def test_feedback_adds_the_staleness_a_reuse_leaves_behind():
    d, stale = [0, 0.1, 0.1, 0.1, 0.1, 0.1], [0, 1, 2, 3, 4, 5]  # the cached blocks change by 1 per step
    assert simulate_adaptive(d, 0.35, 1, 8) == [True, False, False, False, True, False]
    # Step 2 sees 0.1 + 0.1 * (stale[1] - stale[0]) = 0.2 (accumulated 0.3), step 3 sees 0.1 + 0.1 * 2: 0.6 computes.
    assert simulate_adaptive(d, 0.35, 1, 8, stale, feedback=0.1) == [True, False, False, True, False, False]


def test_feedback_is_fitted_to_the_calibration_runs():
    profile = _two_branch_profile([0] + [0.1] * 11, [0] + [0.1] * 11)
    profile.stats["rel_l1"]["mean"] = [[None, None]] + [[0.1, 0.3]] * 11  # the cached block moves 0.3 per step
    assert fitted_feedback(profile) == 0.0  # no calibration runs: the plain simulation
    settings = [{"threshold": t, "warmup": 1, "max_consecutive": 8} for t in (0.25, 0.45, 0.8)]
    measured = [plan_adaptive(profile, profile.times, None, warmup=1, threshold=s["threshold"], max_consecutive=8,
                              feedback=0.4).speedup for s in settings]
    profile.calibration = {"adaptive_cache": {"settings": settings, "pairs": [[0, 30, 0, m] for m in measured]}}
    kappa = fitted_feedback(profile)
    assert kappa > 0  # some feedback is needed to explain the measured speed-ups ...
    for s, m in zip(settings, measured):  # ... and the fitted one reproduces them (the smallest that does)
        assert plan_adaptive(profile, profile.times, None, warmup=1, threshold=s["threshold"], max_consecutive=8).speedup == pytest.approx(m)
    assert plan_adaptive(profile, profile.times, None, warmup=1, threshold=0.45, max_consecutive=8, feedback=0.0).speedup > measured[1]


def _with_forecast_runs(profile, runs):
    """Calibration pairs at predicted speed-ups 1.5 / 3 whose forecast runs measured ``runs[i]``."""
    profile.calibration = {"adaptive_cache": {"settings": [{}, {}], "pairs": [[0.1, 40, 1.5, 1.5], [0.5, 30, 3.0, 2.8]],
                                              "forecasts": runs}}
    return profile


def test_the_forecast_is_the_one_measured_better_at_no_less_saving():
    from diffaccel.profiler.plan_adaptive import verified_forecast
    from diffaccel.profiler.plan_common import FORECASTS, MARGIN_DB

    profile = _two_branch_profile([0] + [0.1] * 5, [0] + [0.1] * 5)
    assert verified_forecast(profile, 2.0) is None  # no forecast runs: the caller's default
    damped = "order 1, guard 0.15"
    low = {"order 0": [40.0, 1.5], "order 1": [39.0, 1.5], damped: [40.0 + MARGIN_DB, 1.5]}
    high = {"order 0": [30.0, 2.8], "order 1": [35.0, 2.2], damped: [30.0 + MARGIN_DB / 2, 2.8]}
    _with_forecast_runs(profile, [low, high])
    assert verified_forecast(profile, 1.4) == FORECASTS[damped]  # nearest run (1.5x): damped wins by the margin
    # At 3x order 1 gained 5 dB but reused less (2.2x measured vs 2.8x): not a win at equal cost; damped is
    # within the margin: plain reuse.
    assert verified_forecast(profile, 3.2) == FORECASTS["order 0"]
    plan = plan_adaptive(profile, profile.times, None, warmup=1, threshold=0.05, max_consecutive=8)
    assert (plan.config.forecast_order, plan.config.guard) == verified_forecast(profile, plan.speedup)
    # An explicit forecast (what simulate passes for a given config) is evaluated as it is.
    given = plan_adaptive(profile, profile.times, None, warmup=1, threshold=0.05, max_consecutive=8, forecast=(2, 1.0))
    assert (given.config.forecast_order, given.config.guard) == (2, 1.0)


def test_calibration_runs_each_forecast_and_the_planner_uses_them():
    from diffaccel.profiler.calibrate_psnr import calibrate_psnr
    from diffaccel.profiler.plan_adaptive import AdaptiveCachePlanner
    from diffaccel.profiler.plan_common import FORECASTS

    pipe = tp.build("pixart")
    kwargs = _kwargs("pixart")
    profile = measure(pipe, [None], kwargs, model="pixart-test", progress=False)
    profile.calibration = calibrate_psnr(pipe, profile, [None], kwargs, [0], targets=(1.5,))
    cal = profile.calibration["adaptive_cache"]
    assert len(cal["forecasts"]) == len(cal["pairs"]) == 1
    runs = cal["forecasts"][0]
    assert set(runs) == set(FORECASTS) and runs["order 0"] == cal["pairs"][0][1::2]  # plain = the pair's own run
    assert all(v[1] >= 1.0 for v in runs.values())
    planner = AdaptiveCachePlanner()
    plan = planner.plan(profile, profile.times, 1.5)
    chosen = planner.call_config(diffaccel.AdaptiveCache(forecast_order=2), plan)
    assert (chosen.forecast_order, chosen.guard) == (plan.config.forecast_order, plan.config.guard)
    # Without forecast runs in the profile a user's forecast is kept.
    del profile.calibration["adaptive_cache"]["forecasts"]
    like = diffaccel.AdaptiveCache(forecast_order=2, guard=1.0)
    assert planner.call_config(like, planner.plan(profile, profile.times, 1.5, like)).forecast_order == 2

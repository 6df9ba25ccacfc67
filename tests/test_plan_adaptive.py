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

"""The profiler's wall-clock model: measured module seconds, half-batch cost, per-step prediction."""
from __future__ import annotations

import copy

import pytest

import tiny_pipes as tp
from diffaccel.profiler.measure import measure
from diffaccel.profiler.plan_adaptive import adaptive_wall_speedup
from diffaccel.profiler.plan_common import skipped_time_share, wall_speedup, wall_speedup_per_step

STEPS = 4


def _profile(name):
    kw = tp.call_kwargs(name, steps=STEPS)
    kw.pop("generator"), kw.pop("output_type")
    return measure(tp.build(name), [None], kw, progress=False)


@pytest.fixture(scope="module")
def pixart_profile():
    return _profile("pixart")


def test_profile_records_module_seconds_and_half_batch_ratio(pixart_profile):
    costs = pixart_profile.costs
    blocks = costs["blocks"]
    assert costs["call_seconds"] > 0
    assert set(blocks) <= set(costs["module_seconds"])
    block_time = sum(costs["module_seconds"][b] for b in blocks)
    assert 0 < block_time <= costs["call_seconds"] * 1.05  # blocks run inside the call
    # PixArt batches its CFG halves, so the half-batch time is measured (a wall-clock ratio: only
    # its presence is checked, a bound would fail on a loaded machine).
    assert costs["calls_per_step"] == 1
    assert costs["half_batch_time_ratio"] > 0


def test_wall_prediction_uses_measured_time_not_flops(pixart_profile):
    profile = copy.deepcopy(pixart_profile)
    costs = profile.costs
    costs["denoiser_share"] = 1.0
    blocks = costs["blocks"][1:]
    flops_share = sum(costs["modules"][b] for b in blocks) / costs["call"]
    # Pretend those blocks take half the call's time: a FLOPs saving of their full cost saves half the time.
    costs["module_seconds"] = {b: 0.5 * costs["call_seconds"] / len(blocks) for b in blocks}
    assert skipped_time_share(profile, blocks) == pytest.approx(0.5)
    speedup = 1.0 / (1.0 - flops_share)  # every step skips them
    assert wall_speedup(profile, speedup, blocks) == pytest.approx(2.0)
    assert wall_speedup_per_step(profile, [0.5, 0.0]) == pytest.approx(1 / 0.75)


def test_half_batch_steps_save_what_the_other_half_does_not_cost(pixart_profile):
    profile = copy.deepcopy(pixart_profile)
    costs = profile.costs
    costs["denoiser_share"] = 1.0
    blocks = costs["blocks"][1:]
    costs["module_seconds"] = {b: 0.8 * costs["call_seconds"] / len(blocks) for b in blocks}
    costs["half_batch_time_ratio"] = 0.75
    both = [[False, False], [False, False]]  # two steps, both branches reuse
    one = [[False, False], [True, True]]  # one branch reuses, the other computes
    assert adaptive_wall_speedup(profile, both, 1, 99.0) == pytest.approx(1 / 0.2)
    assert adaptive_wall_speedup(profile, one, 1, 99.0) == pytest.approx(1 / (1 - 0.8 * 0.25))
    costs["calls_per_step"] = 2  # separate CFG calls: a reusing branch skips its own call's blocks
    assert adaptive_wall_speedup(profile, one, 1, 99.0) == pytest.approx(1 / (1 - 0.8 * 0.5))


def test_old_profiles_fall_back_to_flops(pixart_profile):
    profile = copy.deepcopy(pixart_profile)
    for key in ("module_seconds", "call_seconds"):
        profile.costs.pop(key)
    profile.costs["denoiser_share"] = 1.0
    assert wall_speedup(profile, 2.0, profile.costs["blocks"][1:]) == pytest.approx(2.0)


def test_replanner_plans_once_per_step_schedule(pixart_profile, monkeypatch):
    """Planning costs milliseconds; repeated calls with the same timesteps reuse the plan."""
    import diffaccel
    from diffaccel.profiler import schedule

    calls = []
    real = schedule.plan_method
    monkeypatch.setattr(schedule, "plan_method", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    pipe = tp.build("pixart")
    profile = copy.deepcopy(pixart_profile)
    profile.costs["denoiser_share"] = 1.0
    from diffaccel.methods.adaptive_cache import AdaptiveCache

    controlled = AdaptiveCache(threshold=0.1)
    diffaccel.accelerate(pipe, methods=[schedule.ProfileSchedule(profile=profile, target_speedup=1.2, controlled=controlled),
                                        controlled])
    for steps in (STEPS, STEPS, STEPS + 1):
        pipe(**tp.call_kwargs("pixart", steps=steps))
    assert calls == ["adaptive_cache", "adaptive_cache"]  # one plan per distinct step schedule
    diffaccel.disable(pipe)


def test_replanner_feeds_the_handle_in_any_order_and_changes_no_config(pixart_profile):
    """The plan lives in the handle (asked from the re-planner when the call needs it): the
    controlled config stays as given, and installation order does not matter."""
    import torch

    import diffaccel
    from diffaccel.methods.adaptive_cache import AdaptiveCache
    from diffaccel.profiler import schedule

    pipe = tp.build("pixart")
    outputs, planned = [], []
    for order in (1, -1):
        controlled = AdaptiveCache(threshold=0.1)
        replanner = schedule.ProfileSchedule(profile=pixart_profile, target_speedup=1.3, controlled=controlled)
        diffaccel.accelerate(pipe, methods=[replanner, controlled][::order])
        outputs.append(tp.run("pixart", pipe, steps=STEPS))
        planned.append(diffaccel.stats(pipe)["methods"]["profile_schedule"]["planned"])
        diffaccel.disable(pipe)
        assert controlled == AdaptiveCache(threshold=0.1)
    assert torch.equal(outputs[0], outputs[1]) and planned[0] == planned[1]
    assert planned[0]["threshold"] != 0.1


def test_module_times_wait_for_queued_gpu_work(monkeypatch):
    import time
    from types import SimpleNamespace

    import torch

    from diffaccel.profiler.costs import _clock

    assert _clock(torch.nn.Linear(2, 2)) is time.perf_counter  # CPU work is done when the call returns
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    on_gpu = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 1))]))
    clock = _clock(on_gpu)
    clock(), clock()
    assert synced == [torch.device("cuda", 1)] * 2  # every reading waits for that device's kernels

"""target_speedup counts TextCache: alone where its lossless saving meets the target, composed under
the step schedules elsewhere (a gentler schedule then meets the target), never where it caches nothing
or where its time does not follow its FLOPs (the bundled models: there a FLOPs target would overstate
the speed-up)."""
import copy

import pytest
import torch

import diffaccel
from diffaccel.bundled.loader import default_call_kwargs
from diffaccel.pipelines import detect
from diffaccel.profiler.plan_common import UnreachableTarget
from diffaccel.profiler.planner import planner_for
from diffaccel.profiler.schedule import plan_all, shipped_profile, step_times

CAPTION = "a red circle in the center on a black background"


@pytest.fixture(scope="module")
def dit():
    pipe = diffaccel.load_bundled("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wall_efficient(profile):
    """``profile`` as if its text modules took the blocks' time per FLOP (as large projections do)."""
    from diffaccel.profiler.plan_text_cache import wall_efficiency, text_saving

    profile = copy.deepcopy(profile)
    scale = 1.0 / wall_efficiency(profile, text_saving(profile))
    profile.costs["module_seconds"].update({m: t * scale for m, t in profile.costs["module_seconds"].items()
                                            if m in profile.costs["text_modules"]})
    return profile


def _run(pipe):
    kw = default_call_kwargs("tiny-dit")
    return pipe(CAPTION, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images


def test_a_target_within_text_cache_reach_is_met_losslessly(dit):
    base = _run(dit)
    diffaccel.accelerate(dit, target_speedup=1.2, profile=_wall_efficient(shipped_profile(detect(dit))))
    out = _run(dit)
    stats = diffaccel.stats(dit)
    diffaccel.disable(dit)
    assert list(stats["methods"]) == ["text_cache"] and torch.equal(out, base)
    assert 1 / (1 - stats["flops_saved_fraction"]) >= 1.2


def test_step_schedules_compose_text_cache_and_its_saving_is_what_the_counter_measures(dit):
    profile = _wall_efficient(shipped_profile(detect(dit)))
    times = profile.calibration["step_cache_verified"]["times"]  # the default call's 20 timesteps
    plan = planner_for("step_cache").plan
    composed = plan(profile, times, 2.5)
    plain = copy.deepcopy(profile)
    plain.costs.pop("text_modules")  # a profile from before text costs were recorded
    alone = plan(plain, times, 2.5)
    assert [m.name for m in composed.with_methods] == ["text_cache"] and alone.with_methods == ()
    # The text saving lets a schedule that computes more steps (less error) meet the same target.
    assert sum(composed.computed) > sum(alone.computed) and composed.error < alone.error
    assert plan_all(profile, 2.5, 20)[0].with_methods == composed.with_methods
    diffaccel.accelerate(dit, target_speedup=2.5, profile=profile)
    _run(dit)
    stats = diffaccel.stats(dit)
    diffaccel.disable(dit)
    assert stats["methods"]["text_cache"]["reused"] > 0
    assert stats["methods"]["step_cache"]["computed_steps"] == [i for i, c in enumerate(composed.computed) if c]
    assert 1 / (1 - stats["flops_saved_fraction"]) == pytest.approx(composed.speedup, rel=1e-3)


def test_not_counted_where_its_time_does_not_follow_its_flops(dit):
    profile = shipped_profile(detect(dit))  # measured: half the blocks' time per FLOP
    chosen, plans = plan_all(profile, 2.5, 20)
    assert chosen.with_methods == () and "text_cache" not in [p.method for p in plans]
    with pytest.raises(UnreachableTarget, match=r"measured time gain is \d+% of the blocks' per FLOP"):
        planner_for("text_cache").plan(profile, step_times(profile, 20), 1.01)


def test_nothing_is_counted_where_text_cache_would_cache_nothing(dit):
    profile = _wall_efficient(shipped_profile(detect(dit)))
    profile.costs["tokens"] = {"text": 7, "visual": 64}  # under the presets' ratio of 1/8
    chosen, plans = plan_all(profile, 2.0, 20)
    assert chosen.with_methods == () and "text_cache" not in [p.method for p in plans]
    with pytest.raises(UnreachableTarget, match="caches nothing at the profile's shape"):
        planner_for("text_cache").plan(profile, step_times(profile, 20), 1.01)


def test_a_schedule_file_keeps_the_text_cache_its_plan_counts_on(tmp_path, capsys):
    from diffaccel import cli
    from diffaccel.bundled.loader import bundled_dir
    from diffaccel.profiler.profile import load_profile
    from diffaccel.profiler.schedule_file import load_schedule

    out, profile = tmp_path / "s.json", tmp_path / "p.json"
    _wall_efficient(load_profile(bundled_dir() / "tiny-dit" / "profile.json")).save(profile)
    assert cli.main(["schedule", str(profile), "--target-speedup", "2.5", "--steps", "20", "--out", str(out)]) == 0
    assert "+ text_cache" in capsys.readouterr().out
    assert [m.name for m in load_schedule(out)] == ["text_cache", "step_cache"]


def test_the_quick_calibration_never_counts_it(dit):
    """Counting TextCache reads module timings; timed at accelerate time they would make the chosen
    schedule depend on the machine's load, so only a saved profile may count it."""
    from diffaccel.profiler.schedule import calibrate

    profile = calibrate(dit, detect(dit), steps=4)
    assert profile.costs["tokens"]["text"] > 0 and profile.costs["module_seconds"]  # measured, but
    assert "text_modules" not in profile.costs and plan_all(profile, 1.01, 4)[0].with_methods == ()

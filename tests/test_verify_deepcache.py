"""A U-Net profile's verified DeepCache forecasts: `diffaccel profile UNET --verify M` runs the planned
schedules with each forecast of the deep features, and plans then forecast as was measured best."""
import math

import pytest
import torch

import diffaccel
from diffaccel import cli
from diffaccel.profiler.plan_deepcache import (chosen_run, composed_cfg, full_step_count, plan_deepcache, step_speedup,
                                              verified_forecast)
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.plan_common import FORECASTS, MARGIN_DB, best_label
from diffaccel.profiler.verify_deepcache import FORECAST_KEY, full_step_counts, uniform_full_steps

STEPS = 8
DAMPED = "order 1, guard 0.15"
CAPTION = "a red circle in the center on a black background"


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify_dc") / "p.json"
    assert cli.main(["profile", "tiny-sd", "--out", str(out), "--num-prompts", "2", "--steps", str(STEPS),
                     "--calibration-prompts", "1", "--verify", "2", "--no-progress"]) == 0
    return out


def _pixels(pipe, seed: int) -> torch.Tensor:
    out = pipe(CAPTION, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np")
    return torch.from_numpy(out.images).double()


def test_every_schedule_is_run_with_every_forecast_and_the_best_is_kept(profile_path):
    entry = load_profile(profile_path).calibration[FORECAST_KEY]
    assert entry["steps"] == STEPS and entry["prompts"] == 2 and entry["skip_branch"] == 0
    assert full_step_counts(STEPS) == [2, 3, 4, 6, 7]
    planned = [r for r in entry["runs"] if r["schedule"] == "planned"]
    assert [len(r["full_steps"]) for r in planned] == [2, 3, 4, 6, 7]
    for run in entry["runs"]:
        if run["schedule"] == "uniform":  # beside the planned schedule of as many full steps, when it differs
            assert run["full_steps"] == uniform_full_steps(STEPS, len(run["full_steps"]))
            assert run["full_steps"] != next(r for r in planned if len(r["full_steps"]) == len(run["full_steps"]))["full_steps"]
        assert run["full_steps"][0] == 0 and set(run["psnr"]) == set(FORECASTS)
        top = max(run["psnr"], key=run["psnr"].get)  # kept only with a margin over plain reuse
        assert run["best"] == (top if run["psnr"][top] >= run["psnr"]["order 0"] + MARGIN_DB else "order 0")
        assert all(run["psnr_worst"][label] <= run["psnr"][label] + 1e-9 for label in FORECASTS)


def test_a_forecast_or_another_schedule_needs_a_margin_over_plain_reuse(profile_path):
    assert best_label({"order 0": 30.0, "order 1": 30.0 + MARGIN_DB / 2, DAMPED: 29.0}) == "order 0"
    assert best_label({"order 0": 30.0, "order 1": 30.0 + MARGIN_DB, DAMPED: 31.0}) == DAMPED
    profile = load_profile(profile_path)
    entry = profile.calibration[FORECAST_KEY]
    k = 3
    planned = next(r for r in entry["runs"] if len(r["full_steps"]) == k and r["schedule"] == "planned")
    other = [0, 1, 5] if planned["full_steps"] != [0, 1, 5] else [0, 2, 5]  # any schedule unlike the planned one
    uniform = dict(planned, schedule="uniform", full_steps=other, best="order 0")
    for gain, chosen in ((MARGIN_DB / 2, planned), (2 * MARGIN_DB, uniform)):
        uniform["psnr"] = {label: planned["psnr"][planned["best"]] + gain for label in FORECASTS}
        entry["runs"] = [planned, uniform]
        assert verified_forecast(profile, entry["times"], k).steps == chosen["full_steps"]


def test_verified_psnr_is_what_the_schedule_gives(profile_path):
    """The recorded number is a real run: re-running one schedule on the same prompts and seeds gives it."""
    from diffaccel.bundled.loader import default_call_kwargs
    from diffaccel.commands.profile import read_prompts

    entry = load_profile(profile_path).calibration[FORECAST_KEY]
    run = entry["runs"][1]
    order, guard = FORECASTS[DAMPED]
    prompts = read_prompts(None, 2, "tiny-sd")
    kwargs = {**default_call_kwargs("tiny-sd"), "num_inference_steps": STEPS, "output_type": "np"}  # as profiled
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    mses = []
    for i, prompt in enumerate(prompts):
        ref = pipe(prompt, generator=torch.Generator().manual_seed(1000 + i), **kwargs).images
        diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(schedule=run["full_steps"], forecast_order=order, guard=guard)])
        out = pipe(prompt, generator=torch.Generator().manual_seed(1000 + i), **kwargs).images
        diffaccel.disable(pipe)
        mses.append(float(((torch.from_numpy(out).double() - torch.from_numpy(ref).double()) ** 2).mean()))
    assert -10 * math.log10(sum(mses) / len(mses)) == pytest.approx(run["psnr"][DAMPED], abs=2e-3)


def _plain(profile):
    """``profile`` without the runs composed with CfgCache (as profiled from calls without CFG)."""
    for run in profile.calibration[FORECAST_KEY]["runs"]:
        run.pop("cfg", None)
    return profile


def test_plans_take_the_best_verified_run_at_the_verified_step_count_only(profile_path):
    profile = _plain(load_profile(profile_path))
    runs, times = profile.calibration[FORECAST_KEY]["runs"], profile.calibration[FORECAST_KEY]["times"]
    for k in (2, 3, 4):
        planned = next(r for r in runs if len(r["full_steps"]) == k and r["schedule"] == "planned")
        best = max((r for r in runs if len(r["full_steps"]) == k), key=lambda r: r["psnr"][r["best"]])
        if best["psnr"][best["best"]] < planned["psnr"][planned["best"]] + MARGIN_DB:
            best = planned  # the evenly spread schedule replaces the planned one only with a margin
        v = verified_forecast(profile, times, k)
        assert v.steps == best["full_steps"] and (v.forecast_order, v.guard) == FORECASTS[best["best"]]
        assert best["best"] in v.note and v.psnr == best["psnr"][best["best"]]
        plan = plan_deepcache(profile, times, target=best["speedup"] - 1e-3)
        assert plan.psnr == v.psnr and plan.config.forecast_order == v.forecast_order  # `schedule` shows the measured PSNR
    assert verified_forecast(profile, times, 1)[:3] == (None, *FORECASTS["order 0"])  # one full step: nothing to extrapolate
    assert verified_forecast(profile, times[::2], 3)[:3] == (None, *FORECASTS["order 0"])  # not verified at 4 steps
    other = [t * 0.97 for t in times]  # as many steps, another scheduler's timesteps
    assert verified_forecast(profile, other, 3)[:3] == (None, *FORECASTS["order 0"])
    # no run of 5 full steps: the planner's schedule, with the forecast measured best on the nearest planned one
    # (4 and 6 are as near: the one with fewer full steps)
    nearest = next(r for r in runs if r["schedule"] == "planned" and len(r["full_steps"]) == 4)
    v = verified_forecast(profile, times, 5)
    assert v[:3] == (None, *FORECASTS[nearest["best"]]) and v.psnr is None
    profile.calibration.pop(FORECAST_KEY)
    assert verified_forecast(profile, times, 3) == (None, 0, 2.0, "", None)


def test_a_planned_call_runs_the_verified_forecast(profile_path):
    """accelerate(target_speedup=, profile=) runs exactly DeepCache(schedule, forecast) of the plan."""
    profile = _plain(load_profile(profile_path))
    run = next(r for r in profile.calibration[FORECAST_KEY]["runs"] if r["schedule"] == "uniform")
    forced = dict(run, best=DAMPED)  # a best that differs from plain reuse, so the test can fail
    profile.calibration[FORECAST_KEY]["runs"] = [forced]
    target = run["speedup"] - 1e-3  # recorded to 4 decimals
    plan = plan_deepcache(profile, profile.calibration[FORECAST_KEY]["times"], target=target)
    assert [i for i, c in enumerate(plan.computed) if c] == run["full_steps"]
    assert (plan.config.forecast_order, plan.config.guard) == FORECASTS[DAMPED]
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, target_speedup=target, profile=profile)
    planned = _pixels(pipe, 7)
    chosen = diffaccel.stats(pipe)["methods"]["profile_schedule"]["planned"]
    assert (chosen["schedule"], chosen["forecast_order"], chosen["guard"]) == (run["full_steps"], 1, 0.15)
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(schedule=run["full_steps"], forecast_order=1, guard=0.15)])
    explicit = _pixels(pipe, 7)
    diffaccel.disable(pipe)
    assert torch.equal(planned, explicit)


def test_min_psnr_takes_the_fastest_verified_run_over_the_fit(profile_path):
    """A PSNR bound is met by measured PSNRs where the timesteps were verified (the 1-prompt fit may say otherwise)."""
    from diffaccel.profiler.calibrate_psnr import plan_for_min_psnr

    profile = _plain(load_profile(profile_path))
    runs = profile.calibration[FORECAST_KEY]["runs"]
    best_per_k = {}
    for r in runs:
        k = len(r["full_steps"])
        best_per_k[k] = max(best_per_k.get(k, -math.inf), r["psnr"][r["best"]])
    bound = sorted(best_per_k.values())[len(best_per_k) // 2]
    plan, _ = plan_for_min_psnr(profile, bound, STEPS)
    fastest = min(k for k, db in best_per_k.items() if db >= bound)
    assert plan.psnr is not None and plan.psnr >= bound and sum(plan.computed) == fastest


@pytest.mark.parametrize("args, message", [
    (["--verify", "1", "--refine", "1"], "--refine and --stress work on StepCache's verified schedules"),
    (["--step-graph", "1"], "apply to image and video DiTs; tiny-sd is a unet model"),
])
def test_unet_verification_flags(tmp_path, capsys, args, message):
    assert cli.main(["profile", "tiny-sd", "--out", str(tmp_path / "p.json"), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_verification_runs_on_every_unet_pipeline(name):
    """SD and SDXL (added text embeddings, tuple-valued down blocks) verify and plan the same way."""
    import tiny_pipes as tp
    from diffaccel.profiler.measure import measure
    from diffaccel.profiler.verify_deepcache import verify_deepcache

    steps = 6
    pipe = tp.build(name)
    kw = {**tp.call_kwargs(name, steps=steps), "height": 8, "width": 8}
    kw.pop("generator"), kw.pop("output_type")
    profile = measure(pipe, [None], kw, model=f"tiny-{name}-test", progress=False)
    entry = verify_deepcache(pipe, profile, [None], [0], kw)
    assert entry["steps"] == steps and len(entry["times"]) == steps
    assert {len(r["full_steps"]) for r in entry["runs"]} == set(full_step_counts(steps))
    assert all(math.isfinite(db) for r in entry["runs"] for db in r["psnr"].values())
    run = next(r for r in entry["runs"] if r["schedule"] == "planned")
    plan = plan_deepcache(profile, entry["times"], target=run["speedup"] - 1e-3)
    assert plan.psnr == run["psnr"][run["best"]] or plan.psnr >= run["psnr"][run["best"]] + MARGIN_DB


def test_schedule_cli_shows_the_measured_psnr_of_a_verified_plan(profile_path, capsys):
    profile = load_profile(profile_path)
    entry = profile.calibration[FORECAST_KEY]
    run = next(r for r in entry["runs"] if r["schedule"] == "planned" and len(r["full_steps"]) == 3)
    target = round(run["speedup"] - 1e-3, 4)
    plan = plan_deepcache(profile, entry["times"], target=target)  # composed with CfgCache or not: measured either way
    assert plan.psnr is not None
    assert cli.main(["schedule", str(profile_path), "--target-speedup", f"{target:.4f}", "--steps", str(STEPS)]) == 0
    out = capsys.readouterr().out
    assert f"measured PSNR vs the unaccelerated output: {plan.psnr:.1f} dB" in out
    assert ("+ cfg_cache" in out) == bool(plan.with_methods)


# ---- DeepCache composed with CfgCache ------------------------------------------------------------
def test_each_schedule_also_runs_composed_with_cfg_cache(profile_path):
    entry = load_profile(profile_path).calibration[FORECAST_KEY]
    for run in entry["runs"]:
        cfg = run["cfg"]  # the bundled model is called with CFG: every schedule also ran composed
        assert set(cfg["psnr"]) == set(FORECASTS) and cfg["best"] == best_label(cfg["psnr"])
        assert all(cfg["psnr_worst"][label] <= cfg["psnr"][label] + 1e-9 for label in FORECASTS)
        assert cfg["psnr"] != run["psnr"]  # CfgCache acted: the outputs differ from the schedule alone


def test_no_composed_runs_without_cfg():
    import tiny_pipes as tp
    from diffaccel.profiler.measure import measure
    from diffaccel.profiler.verify_deepcache import verify_deepcache

    pipe = tp.build("sd")
    kw = {**tp.call_kwargs("sd", steps=6, guidance=1.0), "height": 8, "width": 8}
    kw.pop("generator"), kw.pop("output_type")
    profile = measure(pipe, [None], kw, model="tiny-sd-nocfg-test", progress=False)
    entry = verify_deepcache(pipe, profile, [None], [0], kw)
    assert entry["runs"] and not any("cfg" in r for r in entry["runs"])
    assert composed_cfg(profile, 1.5) is None


def _cfg_at(profile, k: int, gain: float):
    """The profile's composed runs of k full steps set to ``gain`` dB over the plain run a target met by
    k composed full steps would otherwise take; returns (target, that plain run's PSNR)."""
    entry = profile.calibration[FORECAST_KEY]
    full, saved = float(profile.costs["call"]), float(profile.costs["deepcache_saved"]["0"])
    target = step_speedup(full, saved, STEPS, k, cfg=True) - 1e-6
    plain_k = full_step_count(full, saved, STEPS, target)
    assert plain_k < k  # without CfgCache the target takes fewer full steps
    plain = chosen_run(entry["runs"], min(len(r["full_steps"]) for r in entry["runs"] if len(r["full_steps"]) >= plain_k))
    bound = plain["psnr"][plain["best"]]
    for run in entry["runs"]:
        run["cfg"] = dict(run["cfg"], psnr={label: bound - 5.0 for label in FORECASTS}, best="order 0")
        if len(run["full_steps"]) == k:
            run["cfg"]["psnr"] = {label: bound + gain for label in FORECASTS}
    return target, bound


@pytest.mark.parametrize("gain, composed", [(MARGIN_DB / 2, False), (2 * MARGIN_DB, True)])
def test_a_target_composes_cfg_cache_only_with_a_measured_margin(profile_path, gain, composed):
    profile = load_profile(profile_path)
    target, bound = _cfg_at(profile, 3, gain)
    times = profile.calibration[FORECAST_KEY]["times"]
    plan = plan_deepcache(profile, times, target=target)
    assert plan.speedup >= target
    if not composed:
        assert composed_cfg(profile, target) is None and plan.with_methods == () and sum(plan.computed) < 3
        return
    run = composed_cfg(profile, target)
    assert run is not None and len(run["full_steps"]) == 3 and run["schedule"] == "planned"
    assert plan.with_methods == (diffaccel.CfgCache(follow_full_steps=True),)
    assert [i for i, c in enumerate(plan.computed) if c] == run["full_steps"] and plan.psnr == bound + gain
    assert "with CfgCache" in plan.note
    replaced = plan_deepcache(_plain(load_profile(profile_path)), times, target=target)
    assert replaced.with_methods == () and sum(replaced.computed) < 3 and plan.error == replaced.error  # its error bound
    # the decision is the profile's and the target's: a call at other timesteps composes too (per-call
    # re-plans must agree with the CfgCache installed once), with plain reuse and its own full-step count
    other = plan_deepcache(profile, [t * 0.97 for t in times] + [0.0], target=target)
    assert other.with_methods == plan.with_methods and other.psnr is None and other.config.forecast_order == 0
    assert other.speedup >= target


def test_a_composed_plan_runs_what_it_predicts(profile_path):
    """accelerate(target_speedup=) installs the composition; outputs equal the explicit methods', and the
    FLOPs counter's saving is the plan's, at the verified step count and at another one (re-planned)."""
    profile = load_profile(profile_path)
    target, _ = _cfg_at(profile, 3, 2 * MARGIN_DB)
    plan = plan_deepcache(profile, profile.calibration[FORECAST_KEY]["times"], target=target)
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, target_speedup=target, profile=profile)
    planned = _pixels(pipe, 7)
    stats = diffaccel.stats(pipe)
    assert stats["methods"]["cfg_cache"]["uncond_skipped"] == STEPS - 3
    assert stats["flops_saved_fraction"] == pytest.approx(1 - 1 / plan.speedup, abs=0.01)
    out = pipe(CAPTION, num_inference_steps=12, generator=torch.Generator().manual_seed(7), output_type="np")
    assert out.images.shape == planned.shape
    stats = diffaccel.stats(pipe)
    k = len(stats["methods"]["profile_schedule"]["planned"]["schedule"])
    full, saved = float(profile.costs["call"]), float(profile.costs["deepcache_saved"]["0"])
    assert k == full_step_count(full, saved, 12, target, cfg=True) and stats["methods"]["cfg_cache"]["uncond_skipped"] == 12 - k
    assert stats["flops_saved_fraction"] == pytest.approx(1 - 1 / step_speedup(full, saved, 12, k, cfg=True), abs=0.01)
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(schedule=plan.config.schedule, forecast_order=plan.config.forecast_order,
                                                            guard=plan.config.guard), diffaccel.CfgCache(follow_full_steps=True)])
    explicit = _pixels(pipe, 7)
    diffaccel.disable(pipe)
    assert torch.equal(planned, explicit)


# ---- DeepCache(min_psnr=...): the fastest verified run that keeps a PSNR ------------------------------
def _chosen_per_count(profile, composed: bool) -> dict[int, float]:
    """Full steps -> PSNR of the run a plan takes with that many (alone or composed with CfgCache)."""
    runs, out = profile.calibration[FORECAST_KEY]["runs"], {}
    for k in {len(r["full_steps"]) for r in runs}:
        run = chosen_run(runs, k, "cfg" if composed else None)
        measured = run["cfg"] if composed else run
        out[k] = measured["psnr"][measured["best"]]
    return out


@pytest.mark.parametrize("composed", [False, True])
def test_min_psnr_runs_the_fastest_verified_run_keeping_it(profile_path, composed):
    from diffaccel.profiler.deepcache_psnr import fastest_verified

    profile = load_profile(profile_path)
    chosen = _chosen_per_count(profile, composed)
    bound = sorted(chosen.values())[len(chosen) // 2]
    fewest = min(k for k, db in chosen.items() if db >= bound)
    config, info = fastest_verified(profile, bound, composed)
    assert len(config.schedule) == fewest and info["measured_psnr"] == chosen[fewest] >= bound
    assert fastest_verified(profile, max(chosen.values()) + 0.01, composed) is None

    extra = [diffaccel.CfgCache(follow_full_steps=True)] if composed else []
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=2, min_psnr=bound), *extra], profile=profile)
    planned = _pixels(pipe, 3)
    stats = diffaccel.stats(pipe)["methods"]
    assert stats["deepcache"]["full_steps"] == list(config.schedule) and stats["deepcache_psnr_schedule"]["planned"]
    other = pipe(CAPTION, num_inference_steps=STEPS + 2, generator=torch.Generator().manual_seed(3), output_type="np")
    assert not diffaccel.stats(pipe)["methods"]["deepcache_psnr_schedule"]["planned"]  # not verified at 10 steps
    diffaccel.accelerate(pipe, methods=[config, *extra])
    assert torch.equal(planned, _pixels(pipe, 3))  # exactly the verified run
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=2), *extra])
    ref = pipe(CAPTION, num_inference_steps=STEPS + 2, generator=torch.Generator().manual_seed(3), output_type="np")
    diffaccel.disable(pipe)
    assert (other.images == ref.images).all()  # elsewhere: the settings as given


def test_min_psnr_without_verified_runs(profile_path, tmp_path):
    import tiny_pipes as tp

    pipe = tp.build("sd")
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=2, min_psnr=30)])  # no profile for this model
    pipe(**tp.call_kwargs("sd", steps=4))
    assert "not planned" in diffaccel.stats(pipe)["methods"]["deepcache"]["why"]
    diffaccel.disable(pipe)
    profile = load_profile(profile_path)
    profile.calibration.pop(FORECAST_KEY)
    bare = tmp_path / "bare.json"
    profile.save(bare)
    sd = diffaccel.load_bundled("tiny-sd")
    with pytest.raises(ValueError, match="no verified DeepCache runs"):
        diffaccel.accelerate(sd, methods=[diffaccel.DeepCache(min_psnr=30)], profile=str(bare))
    with pytest.raises(ValueError, match="min_psnr"):
        diffaccel.DeepCache(min_psnr=-1).validate()


def test_validation_keeps_each_runs_lowest_psnr(tmp_path):
    out = tmp_path / "p.json"
    assert cli.main(["profile", "tiny-sd", "--out", str(out), "--num-prompts", "1", "--steps", "6",
                     "--calibration-prompts", "1", "--verify", "1", "--validate", "1", "--no-progress"]) == 0
    entry = load_profile(out).calibration[FORECAST_KEY]
    assert entry["validation"] == [{"prompts": 1, "seeds": [2000, 2000]}]
    for run in entry["runs"]:
        for measured in (run, run["cfg"]):
            sets = measured["psnr_sets"]
            assert all(len(sets[label]) == 2 and measured["psnr"][label] == min(sets[label]) for label in FORECASTS)
            assert measured["best"] == best_label(measured["psnr"])


def test_min_psnr_out_of_reach_runs_the_settings_as_given(profile_path):
    profile = load_profile(profile_path)
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=2, min_psnr=1000)], profile=profile)
    out = _pixels(pipe, 5)
    info = diffaccel.stats(pipe)["methods"]["deepcache_psnr_schedule"]
    assert not info["planned"] and "no verified run of skip branch 0 keeps min_psnr=1000" in info["why"]
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=2)])
    assert torch.equal(out, _pixels(pipe, 5))
    diffaccel.disable(pipe)

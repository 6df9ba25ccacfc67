"""A user's own profile drives PSNR-targeted StepCache schedules: `diffaccel profile --step-graph N
--verify M --validate K` runs the planned schedules for real, and `accelerate(..., profile=)` plans from it."""
import math

import pytest
import torch

import diffaccel
from diffaccel import cli
from diffaccel.commands.profile import read_prompts
from diffaccel.pipelines import detect
from diffaccel.api import session_of
from diffaccel.profiler.plan_step_cache import VERIFIED, StepCachePsnrSchedule, plan_for_psnr, verified
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.verify_step_cache import stratified_psnr

STEPS = 6
CAPTION = "a red circle in the center on a black background"


@pytest.fixture(scope="module")
def verified_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "p.json"
    assert cli.main(["profile", "tiny-dit", "--out", str(out), "--num-prompts", "2", "--steps", str(STEPS),
                     "--calibration-prompts", "1", "--step-graph", "1", "--verify", "2", "--validate", "2",
                     "--refine", "1", "--confirm", "2", "--stress", "1", "--no-progress"]) == 0
    return out


def _psnr(a, b) -> float:
    mse = float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).pow(2).mean())
    return 300.0 if mse == 0 else -10 * math.log10(mse)


def test_verified_front_holds_real_runs_at_their_worst_seed_set(verified_profile):
    profile = load_profile(verified_profile)
    entry = profile.calibration[VERIFIED]
    runs = entry["runs"]
    assert len(runs) >= 3 and entry["seeds"] == [1000, 1001]
    assert list(entry["validation"]) == ["2000-2001", "stress 4000-4031", "confirm 3000-3001"]
    stress = entry["validation"]["stress 4000-4031"]  # the one of 32 screened seeds one skip changes most
    assert stress["screened"] == 32 and len(stress["seeds"]) == len(stress["single_skip_psnr"]) == 1
    assert runs[0]["mask"] == [1] * STEPS and runs[0]["psnr"] == 300.0  # computing every step is exact
    for r in runs:  # a front: faster means lower PSNR, each PSNR the worse of its seed sets, the stress set weighed in
        ordinary = min(v for k, v in r["psnr_sets"].items() if not k.startswith("stress"))
        assert r["stress_shares"] == {"stress 4000-4031": 1 / 32}
        assert r["psnr"] == pytest.approx(stratified_psnr(r["psnr_sets"], r["stress_shares"]), abs=1e-9)
        assert r["psnr"] <= ordinary + 1e-9
    assert all(a["speedup"] < b["speedup"] and a["psnr"] > b["psnr"] for a, b in zip(runs, runs[1:]))
    assert "step_cache" in profile.calibration  # the PSNR calibration's pairs are kept beside it
    # A verified PSNR is what the schedule really gives: rerun one on the verification seeds.
    pipe = diffaccel.load_bundled("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    run = runs[1]
    prompts = read_prompts(None, 2, "tiny-dit")  # the profile's prompts; verification cycles through them
    kw = dict(num_inference_steps=STEPS, output_type="np")
    refs = [pipe(p, generator=torch.Generator().manual_seed(s), **kw).images for p, s in zip(prompts, entry["seeds"])]
    diffaccel.accelerate(pipe, methods=[diffaccel.StepCache(mask=tuple(bool(c) for c in run["mask"]),
                                                            forecast_orders=tuple(run["orders"]))])
    outs = [pipe(p, generator=torch.Generator().manual_seed(s), **kw).images for p, s in zip(prompts, entry["seeds"])]
    mses = [10 ** (-_psnr(o, r) / 10) for o, r in zip(outs, refs)]
    assert -10 * math.log10(sum(mses) / len(mses)) == pytest.approx(run["psnr_sets"]["verification"], abs=0.01)


def test_presets_and_targets_plan_from_a_given_profile(verified_profile):
    profile = load_profile(verified_profile)
    times = profile.calibration[VERIFIED]["times"]
    pipe = diffaccel.load_bundled("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, methods=[diffaccel.StepCache(min_psnr=20.0)], profile=verified_profile)
    pipe(CAPTION, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    stats = diffaccel.stats(pipe)["methods"]
    plan = plan_for_psnr(profile, times, 20.0)
    assert plan.note == "verified by real runs" and len(verified(profile, times)) == len(profile.calibration[VERIFIED]["runs"])
    assert stats["step_cache_psnr_schedule"]["planned"]
    assert stats["step_cache"]["computed_steps"] == [i for i, c in enumerate(plan.config.mask) if c]
    # The presets take it too; a target_speedup plans from it (the PSNR calibration's pairs sit beside
    # the verified runs under their own key, so neither breaks the other).
    diffaccel.accelerate(pipe, preset="fast", profile=verified_profile)
    pipe(CAPTION, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert diffaccel.stats(pipe)["methods"]["step_cache_psnr_schedule"]["planned"]
    diffaccel.accelerate(pipe, profile=verified_profile, target_speedup=1.5)
    pipe(CAPTION, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert diffaccel.stats(pipe)["flops_saved_fraction"] > 0.2
    diffaccel.disable(pipe)


def test_a_profile_without_step_graph_is_refused_for_psnr_targets(tmp_path):
    out = tmp_path / "p.json"
    assert cli.main(["profile", "tiny-dit", "--out", str(out), "--num-prompts", "1", "--steps", "4",
                     "--calibration-prompts", "0", "--no-progress"]) == 0
    pipe = diffaccel.load_bundled("tiny-dit")
    costs = load_profile(out).costs  # what TextCache's planner reads is recorded while profiling
    assert costs["tokens"] == {"text": 120, "visual": 64}
    assert sorted(costs["text_modules"]) == sorted(detect(pipe).text_modules()) and all(costs["text_modules"].values())
    assert set(costs["text_modules"]) <= set(costs["module_seconds"])
    with pytest.raises(ValueError, match="no measured step graph.*--step-graph 2 --verify 4"):
        diffaccel.accelerate(pipe, preset="balanced", profile=out)
    assert diffaccel.api.session_of(pipe) is None


@pytest.mark.parametrize("args, message", [
    (["--verify", "2"], "--verify runs schedules planned from the step graph: add --step-graph N"),
    (["--step-graph", "1", "--validate", "2"], "--validate, --refine and --stress work on the verified schedules: add --verify M"),
    (["--step-graph", "1", "--stress", "1"], "--validate, --refine and --stress work on the verified schedules: add --verify M"),
    (["--step-graph", "1", "--verify", "2", "--stress", "-1"], "--stress must be"),
    (["--step-graph", "-1"], "--step-graph must be"),
    (["--step-graph", "1", "--verify", "2", "--confirm", "2"], "--confirm checks what the local search changed: add --refine R"),
])
def test_cli_verification_flags_are_checked_first(tmp_path, capsys, args, message):
    assert cli.main(["profile", "tiny-dit", "--out", str(tmp_path / "p.json"), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_stress_set_counts_at_its_share_of_the_screened_pool():
    sets = {"verification": 40.0, "300-323": 38.0, "stress": 20.0}
    assert stratified_psnr(sets, {}) == 20.0  # without a share it is one more validation set: the lowest wins
    expected = -10 * math.log10(0.01 / 32 + (31 / 32) * 10 ** -3.8)  # 8 fragile seeds of 256 screened
    assert stratified_psnr(sets, {"stress": 1 / 32}) == pytest.approx(expected)
    assert 20.0 < expected < 38.0
    assert stratified_psnr({**sets, "stress": 60.0}, {"stress": 1 / 32}) == 38.0  # never above the ordinary sets


def test_skip_fragility_is_the_worst_single_skip_run_for_real():
    from diffaccel.profiler.reuse_error import skip_fragility
    from diffaccel.profiler.verify_step_cache import SeedSet

    pipe = diffaccel.load_bundled("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds, call = [CAPTION, "a blue square at the top left on a white background", CAPTION], [0, 1, 2], {
        "num_inference_steps": STEPS}
    fragility = skip_fragility(pipe, detect(pipe), prompts, seeds, call)
    kw = dict(num_inference_steps=STEPS, output_type="np")
    for prompt, seed, db in zip(prompts, seeds, fragility):
        ref = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw).images
        worst = math.inf
        for k in range(1, STEPS):  # each single skip as StepCache runs it
            diffaccel.accelerate(pipe, methods=[diffaccel.StepCache(mask=tuple(i != k for i in range(STEPS)),
                                                                    forecast_order=0, final_steps=0)])
            worst = min(worst, _psnr(pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw).images, ref))
            diffaccel.disable(pipe)
        assert db == pytest.approx(worst, abs=1e-6)
    # A stress set keeps the most fragile (lowest single-skip PSNR) of its pool, in that order.
    stress = SeedSet.stress(pipe, None, prompts, seeds, call, keep=2)
    expected = sorted(seeds, key=lambda s: fragility[s])[:2]
    assert [s for _, s in stress.kept] == expected and stress.spec == "stress 0-2"
    assert stress.info["stress 0-2"]["single_skip_psnr"] == [round(fragility[s], 2) for s in expected]


def test_step_graph_on_a_unet_is_refused(tmp_path, capsys):
    assert cli.main(["profile", "tiny-sd", "--out", str(tmp_path / "p.json"), "--step-graph", "1"]) == 2
    assert "apply to image and video DiTs; tiny-sd is a unet model" in capsys.readouterr().err
    assert cli.main(["profile", "tiny-sd", "--out", str(tmp_path / "p.json"), "--verify", "1", "--stress", "1"]) == 2
    assert "--refine and --stress work on StepCache's verified schedules (DiTs)" in capsys.readouterr().err


def test_evaluate_runs_a_preset_planned_from_a_given_profile(verified_profile):
    from diffaccel.evaluation.configs import parse_configs

    pipe = diffaccel.load_bundled("tiny-dit")
    pipe.set_progress_bar_config(disable=True)
    config = parse_configs(f"fast@{verified_profile}")[1]
    assert (config.preset, config.profile) == ("fast", str(verified_profile))
    for _ in range(2):  # the second apply installs the configs the first resolved (as timing rounds do)
        config.apply(pipe)
        pipe(CAPTION, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent")
        assert diffaccel.stats(pipe)["methods"]["step_cache_psnr_schedule"]["planned"]  # the shipped one has no 6-step graph
    assert sum(isinstance(m, StepCachePsnrSchedule) for m in session_of(pipe).configs) == 1
    diffaccel.disable(pipe)

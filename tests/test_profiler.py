"""Redundancy profiler: Profile format, measurement (with resume), schedule planning, CLI."""
from __future__ import annotations

import json

import pytest
import torch

import diffaccel
import tiny_pipes as tp
from diffaccel.pipelines import detect
from diffaccel.profiler.measure import measure
from diffaccel.profiler.profile import PROFILE_VERSION, Cumulative, ProfileError, load_profile
from diffaccel.profiler.plan_adaptive import simulate_adaptive
from diffaccel.profiler.plan_deepcache import choose_full_steps, drift_cost, schedule_error
from diffaccel.profiler.schedule import UnreachableTarget, plan_all

STEPS = 6


def _kwargs(name, steps=STEPS):
    kw = tp.call_kwargs(name, steps=steps)
    kw.pop("generator"), kw.pop("output_type")
    if name == "sd":
        kw.update(height=8, width=8)  # 8x8 latents: the smallest this U-Net takes, to keep the suite fast
    return kw


@pytest.fixture(scope="module")
def sd_profile(tmp_path_factory):
    pipe = tp.build("sd")
    path = tmp_path_factory.mktemp("prof") / "sd.json"
    measure(pipe, [None, None], _kwargs("sd"), model="tiny-sd-test", progress=False).save(path)
    return pipe, path


def test_profile_round_trip_and_contents(sd_profile):
    pipe, path = sd_profile
    profile = load_profile(path, detect(pipe))
    assert profile.version == PROFILE_VERSION and len(profile.times) == STEPS
    assert profile.times == sorted(profile.times, reverse=True)  # normalised time runs from noise down
    kinds = {m["kind"] for m in profile.modules}
    assert {"block", "spatial", "cross", "output"} <= kinds
    rel = profile.series("mid_block")
    assert rel[0] is None and all(v > 0 for v in rel[1:])
    assert profile.stats["rel_l1"]["std"][1][0] >= 0  # spread across the two prompts
    assert profile.costs["call"] > 0 and 0 < profile.costs["denoiser_share"] <= 1
    again = load_profile(profile.save(path.with_name("again.json")))
    assert again.to_json() == profile.to_json()


def test_profile_errors(sd_profile, tmp_path):
    pipe, path = sd_profile
    data = json.loads(path.read_text())
    with pytest.raises(ProfileError, match="different architecture.*diffaccel profile"):
        load_profile(path, detect(tp.build("pixart")))
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ProfileError, match="version 99.*reads version 1"):
        load_profile(bad)
    bad.write_text(path.read_text()[:200])
    with pytest.raises(ProfileError, match="corrupted"):
        load_profile(bad)
    bad.write_text(json.dumps({**data, "stats": {"rel_l1": {"mean": [[0.1]]}}}))
    with pytest.raises(ProfileError, match="corrupted.*steps x modules"):
        load_profile(bad)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


def test_cumulative_ports_across_step_counts():
    curve = Cumulative([1.0, 0.5, 0.0], [None, 1.0, 3.0])
    assert curve.at(1.0) == 0.0 and curve.at(0.5) == 1.0 and curve.at(0.0) == 4.0
    assert curve.at(0.25) == pytest.approx(2.5)  # halfway through the second interval
    assert curve.at(-0.5) == pytest.approx(7.0)  # edge rate extended


def test_dp_full_steps_beat_uniform_on_its_own_objective():
    cum = [0, 5, 6, 6.5, 6.7, 6.8, 9, 12]  # fast change early and late
    best = choose_full_steps(cum, 3)
    assert best[0] == 0 and len(best) == 3
    staleness = lambda full: schedule_error(drift_cost(cum), len(cum), full)  # noqa: E731
    assert staleness(best) <= staleness([0, 3, 6]) - 1e-9


def test_adaptive_simulation_follows_the_rule():
    assert simulate_adaptive([0, 0.1, 0.1, 0.1, 0.1, 0.1], threshold=0.25, warmup=2, max_consecutive=3) == [
        True, True, False, False, True, False]
    assert simulate_adaptive([0, 0.0, 0.0, 0.0, 0.0], threshold=1.0, warmup=1, max_consecutive=2) == [
        True, False, False, True, False]


def test_schedule_meets_target_in_flops(sd_profile):
    pipe, path = sd_profile
    target = 2.0
    diffaccel.accelerate(pipe, profile=str(path), target_speedup=target)
    try:
        pipe(**{**tp.call_kwargs("sd", steps=STEPS), "height": 8, "width": 8})
        stats = diffaccel.stats(pipe)
    finally:
        diffaccel.disable(pipe)
    measured = 1 / (1 - stats["flops_saved_fraction"])
    predicted = stats["methods"]["profile_schedule"]["predicted_speedup"]
    assert measured >= target * 0.97 and measured == pytest.approx(predicted, rel=0.05)


def test_replanned_at_other_step_count_and_scheduler(sd_profile):
    pipe, path = sd_profile
    pipe.scheduler = __import__("diffusers").DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    diffaccel.accelerate(pipe, profile=str(path), target_speedup=2.0)
    try:
        pipe(**{**tp.call_kwargs("sd", steps=12), "height": 8, "width": 8})
        stats = diffaccel.stats(pipe)
    finally:
        diffaccel.disable(pipe)
        pipe.scheduler = __import__("diffusers").DDIMScheduler.from_config(pipe.scheduler.config)
    assert stats["methods"]["profile_schedule"]["steps"] == 12
    assert 1 / (1 - stats["flops_saved_fraction"]) >= 2.0 * 0.97


def test_impossible_target_says_what_is_reachable(sd_profile):
    pipe, path = sd_profile
    with pytest.raises(UnreachableTarget, match=r"100x speed-up is out of reach.*up to \d+\.\d+x"):
        diffaccel.accelerate(pipe, profile=str(path), target_speedup=100)
    with pytest.raises(ValueError, match=">= 1"):
        plan_all(load_profile(path), 0.5)


def test_dit_family_gets_a_method_choice(tmp_path):
    pipe = tp.build("pixart")
    profile = measure(pipe, [None], _kwargs("pixart"), model="pixart-test", progress=False)
    chosen, plans = plan_all(profile, 1.3)
    assert {p.method for p in plans} == {"adaptive_cache", "pab", "step_cache"} and chosen in plans
    assert all(p.speedup >= 1.3 - 1e-6 for p in plans)


def test_interrupted_profile_resumes(tmp_path):
    pipe = tp.build("sd")
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += 1
        if calls["n"] == 2 * STEPS + 2:  # the cost run (+1 FLOP-counting call) and prompt 1 pass, prompt 2 is cut
            raise KeyboardInterrupt

    handle = pipe.unet.register_forward_pre_hook(count)
    partial = tmp_path / "p.json.partial.json"
    with pytest.raises(KeyboardInterrupt):
        measure(pipe, [None, None], _kwargs("sd"), partial_path=partial, progress=False)
    assert len(json.loads(partial.read_text())["runs"]) == 1
    calls["n"] = -10**6  # no more interruptions
    measure(pipe, [None, None], _kwargs("sd"), partial_path=partial, progress=False)
    handle.remove()
    assert calls["n"] == -10**6 + STEPS  # only the missing prompt ran again
    with pytest.raises(ProfileError, match="different run"):
        measure(pipe, [None, None, None], _kwargs("sd"), partial_path=partial, progress=False)


def _text_pipeline(folder):
    """The tiny SD pipeline with a character-level CLIP tokenizer and text encoder, saved to disk."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=8)).eval()
    base = tp.build("sd")
    pipe = diffusers.StableDiffusionPipeline(vae=base.vae, text_encoder=encoder, tokenizer=tokenizer, unet=base.unet,
                                             scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_cli_profile_and_schedule_from_pretrained(tmp_path, capsys):
    from diffaccel.cli import main

    model = _text_pipeline(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "p.json"
    assert main(["profile", str(model), "--out", str(out), "--prompts", str(prompts), "--num-prompts", "2", "--steps", "4",
                 "--height", "8", "--width", "8", "--device", "cpu", "--no-progress"]) == 0
    assert out.is_file() and not out.with_name("p.json.partial.json").exists()
    assert main(["schedule", str(out), "--target-speedup", "1.5", "--out", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "predicted speed-up" in text and "deepcache" in text
    from diffaccel.profiler.schedule_file import load_schedule

    assert load_schedule(tmp_path / "s.json")[0].name == "deepcache"
    assert main(["schedule", str(out), "--target-speedup", "100"]) == 2
    assert "out of reach" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n \n")
    assert main(["profile", str(model), "--out", str(out), "--prompts", str(tmp_path / "empty.txt")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_profile_and_no_calibration_possible_says_how_to_profile():
    with pytest.raises(ValueError, match="No profile is shipped.*diffaccel profile"):
        diffaccel.accelerate(tp.build("sd"), target_speedup=2.0)


def test_methods_are_ranked_by_measured_preference_not_by_errors_in_different_units():
    # StepCache's error is a summed output MSE, AdaptiveCache's / PAB's a staleness proxy: a tiny
    # proxy error must not beat StepCache, but between the two proxy planners the least error wins.
    from diffaccel.profiler.plan_common import Plan
    from diffaccel.profiler.schedule import choice_key

    step = Plan("step_cache", diffaccel.StepCache(), 2.0, 2.0, error=10.0)
    adaptive = Plan("adaptive_cache", diffaccel.AdaptiveCache(), 2.0, 2.0, error=1e-9)
    pab = Plan("pab", diffaccel.PAB(), 2.0, 2.0, error=1e-6)
    assert max([adaptive, step, pab], key=choice_key) is step
    assert max([pab, adaptive], key=choice_key) is adaptive
    lossless = Plan("text_cache", diffaccel.TextCache(), 2.0, 2.0, error=0.0)
    assert max([step, lossless, adaptive], key=choice_key) is lossless


def test_schedule_at_the_verified_step_count_shows_the_verified_schedule():
    # `diffaccel schedule --steps 20` on the shipped profile (profiled at 25 steps, schedules verified
    # at the 20 real timesteps) plans at those timesteps: the plan it shows is the one a 20-step call runs.
    from diffaccel.profiler.plan_step_cache import verified_times
    from diffaccel.profiler.schedule import planning_times, shipped_profile

    profile = shipped_profile(detect(diffaccel.load_bundled("tiny-dit")))
    assert planning_times(profile, 20) == verified_times(profile, 20)
    assert planning_times(profile) == profile.times  # the profiled count: the profiled times
    chosen, _ = plan_all(profile, 2.0, 20)
    assert chosen.method == "step_cache" and chosen.psnr is not None  # measured, not predicted

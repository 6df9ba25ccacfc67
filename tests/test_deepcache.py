"""DeepCache: parity with DeepCache's own helper, schedules, state contracts, bad input."""
from __future__ import annotations

import diffusers as D
import pytest
import torch

import diffaccel
from diffaccel.methods.deepcache import DeepCache, cached_modules, centred_steps
from tiny_pipes import build, run
from unet_cases import call, deep_sd, item_inputs

pytest.importorskip("DeepCache")


def ours(pipe, **kw):
    return diffaccel.accelerate(pipe, methods=[DeepCache(**kw)])


def dc_stats(pipe):
    return diffaccel.stats(pipe)["methods"]["deepcache"]


@pytest.mark.parametrize("branch", [0, 1, 2, 4])
def test_matches_deepcache_helper(branch):
    from DeepCache import DeepCacheSDHelper

    ref_pipe = deep_sd()
    helper = DeepCacheSDHelper(pipe=ref_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    reference = call(ref_pipe, [item_inputs(0)], steps=7)
    pipe = ours(deep_sd(), interval=3, branch=branch)
    out = call(pipe, [item_inputs(0)], steps=7)
    assert (out - reference).abs().max().item() <= 1e-4
    assert dc_stats(pipe)["reused"] == 4 and dc_stats(pipe)["computed"] == 3
    baseline = call(deep_sd(), [item_inputs(0)], steps=7)
    assert (out - baseline).abs().max().item() > 1e-3  # caching really changed something


def test_all_compute_and_disable_reproduce_baseline_exactly():
    baseline = call(deep_sd(), [item_inputs(1)], steps=5)
    pipe = ours(deep_sd(), interval=1)
    assert torch.equal(call(pipe, [item_inputs(1)], steps=5), baseline)
    ours(pipe, interval=2)  # accelerate again replaces
    assert not torch.equal(call(pipe, [item_inputs(1)], steps=5), baseline)
    diffaccel.disable(pipe)
    assert torch.equal(call(pipe, [item_inputs(1)], steps=5), baseline)


def test_same_seed_twice_and_steps_change_without_reapplying():
    pipe = ours(deep_sd(), interval=3)
    first = call(pipe, [item_inputs(2)], steps=6)
    assert torch.equal(call(pipe, [item_inputs(2)], steps=6), first)
    nine = call(pipe, [item_inputs(2)], steps=9)
    assert dc_stats(pipe)["full_steps"] == [0, 3, 6] and dc_stats(pipe)["reused"] == 6
    fresh = call(ours(deep_sd(), interval=3), [item_inputs(2)], steps=9)
    assert torch.equal(nine, fresh)


def test_batch_of_two_matches_each_alone():
    pipe = ours(deep_sd(), interval=3, branch=1)
    a, b = item_inputs(3), item_inputs(4)
    both = call(pipe, [a, b], steps=6)
    torch.testing.assert_close(both[:1], call(pipe, [a], steps=6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1:], call(pipe, [b], steps=6), rtol=1e-4, atol=1e-4)


def test_repeated_timesteps_heun():
    # Heun evaluates the U-Net twice per timestep; the reference helper maps both calls to the
    # first occurrence of t. Here every loop iteration is its own step.
    pipe = ours(deep_sd(D.HeunDiscreteScheduler), interval=3)
    out = call(pipe, [item_inputs(5)], steps=4)
    s = dc_stats(pipe)
    assert s["full_steps"] == [0, 3, 6] and s["computed"] == 3 and s["reused"] == 4
    assert torch.isfinite(out).all()
    exact = call(ours(deep_sd(D.HeunDiscreteScheduler), interval=1), [item_inputs(5)], steps=4)
    assert torch.equal(exact, call(deep_sd(D.HeunDiscreteScheduler), [item_inputs(5)], steps=4))


def test_non_uniform_has_equal_cost_and_crowds_the_centre():
    steps = centred_steps(50, 10, center=0.5, power=1.4)
    assert len(steps) == 10 and steps[0] == 0 and len(set(steps)) == 10
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert min(gaps) < 50 / 10 < max(gaps)
    middle = min(range(len(gaps)), key=lambda i: abs((steps[i] + steps[i + 1]) / 2 - 25))
    assert gaps[middle] == min(gaps)
    pipe = ours(deep_sd(), interval=3, schedule="non-uniform")
    call(pipe, [item_inputs(6)], steps=10)
    s = dc_stats(pipe)
    assert s["computed"] == 4 and s["full_steps"] == DeepCache(interval=3, schedule="non-uniform").full_steps(10)
    assert s["full_steps"] != [0, 3, 6, 9]


def test_explicit_steps_and_normalised_times():
    pipe = ours(deep_sd(), schedule=[0, 2, 5])
    call(pipe, [item_inputs(7)], steps=7)
    assert dc_stats(pipe)["full_steps"] == [0, 2, 5]
    times = [float(pipe.scheduler.timesteps[k]) / 1000 for k in (0, 2, 5)]
    by_time = ours(deep_sd(), schedule=times)
    out = call(by_time, [item_inputs(7)], steps=7)
    assert dc_stats(by_time)["full_steps"] == [0, 2, 5]
    assert torch.equal(out, call(pipe, [item_inputs(7)], steps=7))
    # On a finer schedule each time recomputes at the first step that reaches it; step 0 is
    # always full (the 14-step schedule starts at a noisier t than the first listed time).
    call(by_time, [item_inputs(7)], steps=14)
    t14 = [float(t) / 1000 for t in by_time.scheduler.timesteps]
    expected = sorted({0} | {next(i for i, t in enumerate(t14) if t <= tau + 1e-6) for tau in times})
    assert dc_stats(by_time)["full_steps"] == expected and len(expected) == 4


def test_max_span_makes_a_step_full_where_reuse_would_stretch_too_far():
    """A step whose reuse would let the last full step's features drive more than ``max_span`` of the
    trajectory (to the end of the step) is full; a uniform schedule restarts its interval there; a call
    whose steps are close enough is unchanged."""
    from diffaccel.profiler.plan_deepcache import resolved_full_steps

    pipe = ours(deep_sd(), interval=4)
    reference = call(pipe, [item_inputs(3)], steps=10)
    assert dc_stats(pipe)["full_steps"] == [0, 4, 8]
    gap = float(pipe.scheduler.timesteps[0] - pipe.scheduler.timesteps[1]) / 1000  # even spacing here
    times = [float(t) / 1000 for t in pipe.scheduler.timesteps]
    for span, expected in ((1.0, [0, 4, 8]), (3.5 * gap, [0, 3, 6, 9]), (2 * gap, [0, 2, 4, 6, 8]), (0.5 * gap, list(range(10)))):
        bounded = ours(deep_sd(), interval=4, max_span=span)
        out = call(bounded, [item_inputs(3)], steps=10)
        assert dc_stats(bounded)["full_steps"] == expected, span
        assert resolved_full_steps(DeepCache(interval=4, max_span=span), times) == expected  # what plans count
        assert torch.equal(out, reference) == (expected == [0, 4, 8])
    listed = ours(deep_sd(), schedule=[0, 5], max_span=2.5 * gap)  # listed steps stay, more are added
    call(listed, [item_inputs(3)], steps=10)
    assert dc_stats(listed)["full_steps"] == [0, 2, 4, 5, 7, 9]
    with pytest.raises(ValueError, match="max_span"):
        ours(deep_sd(), max_span=0.0 - 1.0)


@pytest.mark.parametrize("order", ["before", "after"])
def test_model_cpu_offload_either_order(order):
    # accelerate's offload hook works on CPU when the device is named; it wraps unet.forward,
    # which is where the reference helper breaks. Ours hooks the submodules instead.
    expected = call(ours(deep_sd(), interval=3), [item_inputs(8)], steps=6)
    pipe = deep_sd()
    if order == "before":
        pipe.enable_model_cpu_offload(device="cpu")
    ours(pipe, interval=3)
    if order == "after":
        pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")
    assert torch.equal(call(pipe, [item_inputs(8)], steps=6), expected)
    assert dc_stats(pipe)["reused"] == 4


@pytest.mark.parametrize("name", ["sd_img2img", "sd_inpaint", "sdxl"])
def test_other_unet_pipelines(name):
    baseline = run(name, build(name), steps=5)
    pipe = diffaccel.accelerate(build(name), methods=[DeepCache(interval=2)])
    out = run(name, pipe, steps=5)
    s = dc_stats(pipe)
    assert s["reused"] >= 1 and s["computed"] >= 1 and torch.isfinite(out).all()
    assert not torch.equal(out, baseline)
    assert diffaccel.stats(pipe)["flops_saved_fraction"] > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_smoke(dtype):
    pipe = ours(deep_sd(dtype=dtype), interval=3)
    out = call(pipe, [item_inputs(9, dtype)], steps=4)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    assert dc_stats(pipe)["reused"] == 2


def test_direct_unet_call_passes_through_and_stats():
    plain = deep_sd()
    pipe = ours(deep_sd(), interval=3)
    call(pipe, [item_inputs(10)], steps=6)
    s = diffaccel.stats(pipe)
    assert 0.2 < s["flops_saved_fraction"] < 0.6
    assert set(s["methods"]["deepcache"]["skipped_modules"]) == set(cached_modules(pipe.unet, 0))
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 8, 16)
    for t in (900, 500):  # outside a pipeline call every U-Net call computes in full
        assert torch.equal(pipe.unet(x, t, emb).sample, plain.unet(x, t, emb).sample)


def test_bad_input_messages():
    pipe = build("sd")
    with pytest.raises(ValueError, match="interval must be a positive integer"):
        diffaccel.accelerate(pipe, methods=[DeepCache(interval=0)])
    with pytest.raises(ValueError, match=r"branch 12 does not exist.*valid branches are \[0, 1, 3\]"):
        diffaccel.accelerate(pipe, methods=[DeepCache(branch=12)])
    with pytest.raises(ValueError, match="schedule must be one of"):
        diffaccel.accelerate(pipe, methods=[DeepCache(schedule="quadratic")])
    with pytest.raises(ValueError, match="only ints"):
        diffaccel.accelerate(pipe, methods=[DeepCache(schedule=[0, 0.5])])
    with pytest.raises(ValueError, match="cannot accelerate pipelines of the image_dit family"):
        diffaccel.accelerate(build("pixart"), methods=[DeepCache()])

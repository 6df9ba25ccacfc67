"""CfgCache: the rebuilt unconditional half against a recorded reference, batched vs separate CFG,
its composition with DeepCache (per-half deep features), FLOPs, state contracts, bad input."""
from __future__ import annotations

import pytest
import torch

import diffaccel
import tiny_pipes as tp
from cache_harness import denoise, inputs, pipe_for_harness
from diffaccel.evaluation.timing import count_call_flops
from unet_cases import call, deep_sd, item_inputs


def cfg_stats(pipe):
    return diffaccel.stats(pipe)["methods"]["cfg_cache"]


def test_interval_one_and_disable_reproduce_the_pipeline_exactly():
    baseline = call(deep_sd(), [item_inputs(1)], steps=6)
    pipe = diffaccel.accelerate(deep_sd(), methods=[diffaccel.CfgCache(interval=1)])
    assert torch.equal(call(pipe, [item_inputs(1)], steps=6), baseline)
    diffaccel.accelerate(pipe, methods=[diffaccel.CfgCache(interval=3)])
    assert not torch.equal(call(pipe, [item_inputs(1)], steps=6), baseline)
    diffaccel.disable(pipe)
    assert torch.equal(call(pipe, [item_inputs(1)], steps=6), baseline)


def test_uncond_is_cond_plus_the_last_difference_and_cond_rows_run_alone():
    pipe = pipe_for_harness()
    x, c, u = inputs(1)
    reference = pipe_for_harness()  # the same weights, unaccelerated: what the cond rows alone give
    diffaccel.accelerate(pipe, methods=[diffaccel.CfgCache(interval=3)])
    record = []
    denoise(pipe, x, c, u, separate=False, steps=8, record=record)
    full = [0, 3, 6]
    assert cfg_stats(pipe) == {"calls": 8, "both_run": 3, "uncond_skipped": 5, "skipped_modules": {"": 2.5}}
    for step, (uo, co) in enumerate(record):
        if step in full:
            delta = uo - co
        else:  # never compounded: the stored difference as it was
            torch.testing.assert_close(uo - co, delta, rtol=0, atol=1e-6)
    # The conditional prediction of a cached step is the model's on the conditional rows alone.
    assert record[1][1].shape[0] == 1
    with torch.no_grad():
        t = pipe.scheduler.timesteps[-1]
        extra = dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
        alone = reference.transformer(x, encoder_hidden_states=c, timestep=t.expand(1), **extra)[0]
        both = pipe.transformer(torch.cat([x, x]), encoder_hidden_states=torch.cat([u, c]), timestep=t.expand(2), **extra)[0]
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)  # outside a call: plain


def test_separate_cfg_calls_match_batched_cfg_and_batch_items_are_independent():
    pipe = pipe_for_harness()
    x, c, u = inputs(2)
    plain = denoise(pipe, x, c, u, separate=False)
    diffaccel.accelerate(pipe, methods=[diffaccel.CfgCache(interval=3)])
    batched = denoise(pipe, x, c, u, separate=False)
    separate = denoise(pipe, x, c, u, separate=True)
    assert (batched - plain).abs().max() > 1e-3
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched[:1], denoise(pipe, x[:1], c[:1], u[:1], separate=False), rtol=1e-4, atol=1e-5)


def test_wan_answers_the_unconditional_call_without_running_it():
    pipe = tp.build("wan")
    runs = []
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda *a: runs.append(1))
    diffaccel.accelerate(pipe, methods=[diffaccel.CfgCache(interval=4)])
    tp.run("wan", pipe, steps=8)
    assert len(runs) == 8 + 2  # every conditional call, the unconditional one at steps 0 and 4
    assert cfg_stats(pipe)["uncond_skipped"] == 6


def test_with_deepcache_aligned_the_deep_features_refresh_at_the_same_steps():
    pipe = deep_sd()
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=3), diffaccel.CfgCache(interval=3)])
    out = call(pipe, [item_inputs(2)], steps=7)
    dc = diffaccel.stats(pipe)["methods"]["deepcache"]
    assert dc["computed"] == 3 and dc["reused"] == 4 and torch.isfinite(out).all()


def test_with_deepcache_a_half_that_missed_the_last_full_step_computes_in_full():
    # DeepCache full at 0, 2, 4, 6; both CFG halves at 0, 3, 6. At step 3 the unconditional half's deep
    # features date from step 0, before full step 2: the call computes in full instead of mixing them in.
    pipe = deep_sd()
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=2), diffaccel.CfgCache(interval=3)])
    call(pipe, [item_inputs(2)], steps=7)
    dc = diffaccel.stats(pipe)["methods"]["deepcache"]
    assert dc["full_steps"] == [0, 2, 4, 6] and dc["computed"] == 5 and dc["reused"] == 2


@pytest.mark.parametrize("reverse", [False, True], ids=["deepcache first", "cfg_cache first"])
def test_following_deepcache_full_steps_whatever_its_schedule(reverse):
    pipe = deep_sd()
    methods = [diffaccel.DeepCache(schedule=[0, 2, 5]), diffaccel.CfgCache(interval=3, follow_full_steps=True)]
    diffaccel.accelerate(pipe, methods=methods[::-1] if reverse else methods)  # CfgCache's interval is unused
    call(pipe, [item_inputs(2)], steps=7)
    stats = diffaccel.stats(pipe)["methods"]
    assert stats["deepcache"]["full_steps"] == [0, 2, 5] and stats["deepcache"]["computed"] == 3
    assert stats["cfg_cache"]["both_run"] == 3 and stats["cfg_cache"]["uncond_skipped"] == 4


def test_following_full_steps_without_deepcache_is_a_clear_error():
    pipe = diffaccel.accelerate(deep_sd(), methods=[diffaccel.CfgCache(follow_full_steps=True)])
    with pytest.raises(ValueError, match=r"found no DeepCache deciding the full steps.*add DeepCache"):
        call(pipe, [item_inputs(2)], steps=4)
    diffaccel.disable(pipe)  # the failed call left nothing behind
    assert torch.equal(call(pipe, [item_inputs(2)], steps=4), call(deep_sd(), [item_inputs(2)], steps=4))


@pytest.mark.parametrize("methods", [
    lambda: [diffaccel.CfgCache(interval=3)],
    lambda: [diffaccel.DeepCache(interval=3), diffaccel.CfgCache(interval=3)],
])
def test_flops_estimate_matches_the_counted_flops(methods):
    kwargs = lambda: dict(**{k: v for k, v in item_inputs(5).items()}, num_inference_steps=7, guidance_scale=4.0,
                          height=16, width=16, output_type="latent")
    base = deep_sd()
    _, full = count_call_flops(base, base.unet, lambda: base(**kwargs()))
    pipe = diffaccel.accelerate(deep_sd(), methods=methods())
    _, fast = count_call_flops(pipe, pipe.unet, lambda: pipe(**kwargs()))
    assert diffaccel.stats(pipe)["flops_saved_fraction"] == pytest.approx(1 - fast / full, abs=0.01)


def test_without_guidance_nothing_is_skipped_and_stats_say_why():
    pipe = diffaccel.accelerate(deep_sd(), methods=[diffaccel.CfgCache(interval=3)])
    plain = call(deep_sd(), [item_inputs(1)], steps=5, guidance=1.0)
    assert torch.equal(call(pipe, [item_inputs(1)], steps=5, guidance=1.0), plain)
    assert "without classifier-free guidance" in cfg_stats(pipe)["why"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(interval=0), "interval"), (dict(max_span=1.5), "max_span"), (dict(min_time=-0.1), "min_time"),
    (dict(follow_full_steps="yes"), "follow_full_steps"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffaccel.accelerate(deep_sd(), methods=[diffaccel.CfgCache(**kwargs)])

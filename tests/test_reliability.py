"""Misuse must not corrupt a pipeline (issue 13): threads, copies, failed or interrupted installs,
shared denoisers, accelerating twice, diffusers' own cache hooks, pickling."""
from __future__ import annotations

import copy
import io
import pickle
import threading

import diffusers as D
import pytest
import torch

import diffaccel
from diffaccel import compat
from diffaccel.methods.deepcache import DeepCache
from diffaccel.methods.tome import ToMe
from diffaccel.state import session_of
from tiny_pipes import build, call_kwargs, run

STEPS = 4


def accelerated_sd(*methods):
    return diffaccel.accelerate(build("sd"), methods=list(methods) or [DeepCache(interval=2)])


def assert_no_trace(pipe, denoiser, others_hooked=False):
    """Nothing of diffaccel is left on ``pipe`` or its denoiser (``others_hooked``: diffusers' own
    hooks were there too, and diffusers leaves its emptied registries behind)."""
    assert session_of(pipe) is None and not hasattr(type(pipe), "_diffaccel_base")
    assert "step" not in vars(pipe.scheduler)
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if others_hooked:
            assert registry is None or not any(name.startswith("diffaccel") for name in registry.hooks)
        else:
            assert "forward" not in vars(module) and registry is None
        assert not hasattr(module, "_diffaccel_session")
    assert not denoiser._forward_pre_hooks and not denoiser._forward_hooks


# ---- item 3: threads ---------------------------------------------------------------------
def test_concurrent_calls_of_one_pipeline_equal_sequential_calls():
    pipe = accelerated_sd(DeepCache(interval=2), ToMe(ratio=0.5))
    expected = {seed: run("sd", pipe, steps=STEPS, seed=seed) for seed in range(4)}
    results, errors = {}, []
    start = threading.Barrier(4)

    def worker(seed):
        try:
            start.wait()
            results[seed] = run("sd", pipe, steps=STEPS, seed=seed)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for seed in range(4):
        assert torch.equal(results[seed], expected[seed])
    assert "step" not in vars(pipe.scheduler)
    assert torch.equal(run("sd", pipe, steps=STEPS, seed=1), expected[1])  # later calls are unaffected
    assert diffaccel.stats(pipe)["steps"] == STEPS


def test_a_second_thread_waits_for_the_running_call():
    pipe = accelerated_sd()
    expected = [run("sd", pipe, steps=STEPS, seed=s) for s in (0, 1)]
    other: dict = {}
    entered = threading.Event()

    def second_call():
        entered.set()
        other["out"] = run("sd", pipe, steps=STEPS, seed=1)

    thread = threading.Thread(target=second_call)

    def on_step(p, step, t, kw):
        if step == 0:  # the first call is running: start a second one from another thread
            thread.start()
            entered.wait()
        return kw

    first = pipe(**call_kwargs("sd", steps=STEPS, seed=0), callback_on_step_end=on_step).images
    thread.join()
    assert torch.equal(first, expected[0]) and torch.equal(other["out"], expected[1])
    assert "step" not in vars(pipe.scheduler)


def test_a_denoiser_call_from_another_thread_during_a_call_is_plain():
    pipe = accelerated_sd()
    x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 16)
    with torch.no_grad():
        plain = build("sd").unet(x, 500, emb).sample
    outputs = []

    def on_step(p, step, t, kw):
        if step == 1:  # DeepCache reuses at this step: its caches must not leak into the other thread
            def direct():
                with torch.no_grad():
                    outputs.append(pipe.unet(x, 500, emb).sample)
            thread = threading.Thread(target=direct)
            thread.start()
            thread.join()
        return kw

    pipe(**call_kwargs("sd", steps=STEPS), callback_on_step_end=on_step)
    assert torch.equal(outputs[0], plain)
    assert diffaccel.stats(pipe)["denoiser_calls"] == STEPS  # the direct call was not counted


def test_nested_call_of_the_same_pipeline_is_refused():
    pipe = accelerated_sd()

    def on_step(p, step, t, kw):
        run("sd", p, steps=2)
        return kw

    with pytest.raises(RuntimeError, match="called from inside its own call"):
        pipe(**call_kwargs("sd", steps=STEPS), callback_on_step_end=on_step)
    assert torch.equal(run("sd", pipe, steps=STEPS), run("sd", accelerated_sd(), steps=STEPS))


# ---- item 5: copies ----------------------------------------------------------------------
def test_deepcopy_is_an_independent_accelerated_pipeline():
    pipe = accelerated_sd()
    plain = run("sd", build("sd"), steps=STEPS)
    accelerated = run("sd", pipe, steps=STEPS)
    clone = copy.deepcopy(pipe)
    assert clone.unet is not pipe.unet and session_of(clone).adapter.denoiser is clone.unet
    assert torch.equal(run("sd", clone, steps=STEPS), accelerated)
    assert diffaccel.stats(clone)["methods"]["deepcache"]["reused"] == 2  # reuse that really happened
    diffaccel.disable(pipe)  # either one can go first
    assert torch.equal(run("sd", pipe, steps=STEPS), plain)
    assert torch.equal(run("sd", clone, steps=STEPS), accelerated)
    diffaccel.disable(clone)
    assert torch.equal(run("sd", clone, steps=STEPS), plain)
    assert_no_trace(clone, clone.unet)


def test_copying_the_accelerated_denoiser_alone_says_what_to_do():
    pipe = accelerated_sd()
    with pytest.raises(TypeError, match=r"Copy the whole pipeline \(copy.deepcopy\(pipe\)"):
        copy.deepcopy(pipe.unet)
    assert torch.equal(run("sd", pipe, steps=STEPS), run("sd", accelerated_sd(), steps=STEPS))


# ---- item 6: all-or-nothing install, shared denoisers ---------------------------------------
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_an_install_interrupted_half_way_leaves_nothing(monkeypatch, interrupt):
    pipe = build("sd")
    real, calls = compat.hook_forward, []

    def flaky(module, new_forward, name):
        calls.append(name)
        if len(calls) == 3:  # inside DeepCache's handle, after two of its hooks went in
            raise interrupt()
        return real(module, new_forward, name)

    monkeypatch.setattr(compat, "hook_forward", flaky)
    with pytest.raises(interrupt):
        diffaccel.accelerate(pipe, methods=[DeepCache(interval=2), ToMe()])
    monkeypatch.setattr(compat, "hook_forward", real)
    assert_no_trace(pipe, pipe.unet)
    diffaccel.accelerate(pipe)  # the default preset installs cleanly afterwards
    assert torch.equal(run("sd", pipe, steps=STEPS), run("sd", diffaccel.accelerate(build("sd")), steps=STEPS))


def test_a_failed_second_accelerate_keeps_the_first(monkeypatch):
    pipe = accelerated_sd(DeepCache(interval=2))
    before = run("sd", pipe, steps=STEPS)
    with pytest.raises(ValueError, match="ratio must be"):
        diffaccel.accelerate(pipe, methods=[ToMe(ratio=2.0)])
    real, calls = compat.hook_forward, []

    def interrupted_once(module, new_forward, name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt()
        return real(module, new_forward, name)

    monkeypatch.setattr(compat, "hook_forward", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        diffaccel.accelerate(pipe, methods=[DeepCache(interval=3)])
    monkeypatch.setattr(compat, "hook_forward", real)
    assert torch.equal(run("sd", pipe, steps=STEPS), before)
    assert diffaccel.stats(pipe)["methods"]["deepcache"]["full_steps"] == [0, 2]


def test_pipelines_sharing_a_denoiser_cannot_both_be_accelerated():
    pipe = accelerated_sd()
    accelerated = run("sd", pipe, steps=STEPS)
    twin = type(pipe)(**pipe.components)
    with pytest.raises(ValueError, match="already accelerated by another pipeline.*diffaccel.disable"):
        diffaccel.accelerate(twin)
    assert torch.equal(run("sd", twin, steps=STEPS), run("sd", build("sd"), steps=STEPS))  # the twin runs plain
    assert torch.equal(run("sd", pipe, steps=STEPS), accelerated)  # the refused accelerate did not touch pipe
    diffaccel.disable(pipe)
    diffaccel.accelerate(twin, methods=[DeepCache(interval=2)])
    assert torch.equal(run("sd", twin, steps=STEPS), accelerated)


# ---- item 7: accelerating again ------------------------------------------------------------
@pytest.mark.slow
def test_accelerate_again_with_a_target_calibrates_the_plain_model():
    from diffaccel.bundled.models import UNET_CONFIG, build_pipeline

    torch.manual_seed(1)  # a bundled pipeline whose U-Net differs from the shipped profile's: quick calibration
    pipe = build_pipeline("tiny-sd", denoiser=D.UNet2DConditionModel(**{**UNET_CONFIG, "layers_per_block": 2}))
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, methods=[ToMe(max_downsample=None), DeepCache(interval=2)])
    diffaccel.accelerate(pipe, target_speedup=1.5)  # failed: the calibration met the first acceleration
    names = [h.config.name for h in session_of(pipe).installed]
    assert "tome" not in names and names[-1] in ("deepcache", "adaptive_cache")
    pipe("a red circle", num_inference_steps=6, output_type="latent")
    assert diffaccel.stats(pipe)["steps"] == 6


def test_accelerate_inside_record_keeps_the_new_acceleration():
    from diffaccel.methods.instrument import record

    pipe = build("sd")
    with record(pipe):
        diffaccel.accelerate(pipe, methods=[DeepCache(interval=2)])
    assert session_of(pipe) is not None and diffaccel.stats(pipe)["methods"].keys() == {"deepcache"}


# ---- item 8: diffusers' own cache hooks -----------------------------------------------------
def fbc():
    return D.FirstBlockCacheConfig(threshold=0.2)


def test_diffusers_cache_then_accelerate_is_refused_and_leaves_it_working():
    reference = build("wan")
    reference.transformer.enable_cache(fbc())
    with_fbc = run("wan", reference, steps=STEPS)
    pipe = build("wan")
    pipe.transformer.enable_cache(fbc())
    with pytest.raises(ValueError, match=r"does not stack with diffusers' cache hooks.*FirstBlockCacheConfig"
                                         r".*fbc_leader_block_hook.*disable_cache\(\)"):
        diffaccel.accelerate(pipe)
    assert session_of(pipe) is None and torch.equal(run("wan", pipe, steps=STEPS), with_fbc)


@pytest.mark.parametrize("removed_first", ["diffaccel", "diffusers"])
def test_diffusers_cache_after_accelerate_is_refused_at_the_call_and_either_can_be_removed(removed_first):
    reference = build("wan")
    reference.transformer.enable_cache(fbc())
    with_fbc = run("wan", reference, steps=STEPS)
    with_ours = run("wan", diffaccel.accelerate(build("wan")), steps=STEPS)

    pipe = diffaccel.accelerate(build("wan"))
    run("wan", pipe, steps=STEPS)
    pipe.transformer.enable_cache(fbc())
    with pytest.raises(ValueError, match=r"does not stack.*FirstBlockCacheConfig"):
        run("wan", pipe, steps=STEPS)
    stats = diffaccel.stats(pipe)  # no extra forward through diffusers' hooks, no crash
    # None: counting skipped because of the foreign hooks; 0.0: the preset skipped nothing in this short call
    assert stats["denoiser_calls"] == 2 * STEPS and stats["flops_saved_fraction"] in (None, 0.0)
    if removed_first == "diffaccel":
        diffaccel.disable(pipe)
        assert torch.equal(run("wan", pipe, steps=STEPS), with_fbc)  # diffusers' cache still runs, alone
        pipe.transformer.disable_cache()
        assert torch.equal(run("wan", pipe, steps=STEPS), run("wan", build("wan"), steps=STEPS))
    else:
        pipe.transformer.disable_cache()
        assert torch.equal(run("wan", pipe, steps=STEPS), with_ours)
        diffaccel.disable(pipe)
        assert torch.equal(run("wan", pipe, steps=STEPS), run("wan", build("wan"), steps=STEPS))
    assert_no_trace(pipe, pipe.transformer, others_hooked=True)


def test_removing_our_hook_keeps_a_later_hook_in_the_chain():
    # diffusers' remove_hook relinks a following new_forward hook wrongly; compat fixes it.
    module = torch.nn.Linear(2, 2)
    calls = []
    remove_first = compat.hook_forward(module, lambda f, *a, **k: calls.append("first") or f(*a, **k), "first")
    compat.hook_forward(module, lambda f, *a, **k: calls.append("second") or f(*a, **k), "second")
    x = torch.randn(1, 2)
    expected = torch.nn.functional.linear(x, module.weight, module.bias)
    remove_first()
    assert torch.equal(module(x), expected) and calls == ["second"]


# ---- item 11: pickling -----------------------------------------------------------------------
def test_pickling_an_accelerated_denoiser_says_to_disable_first():
    pipe = accelerated_sd(DeepCache(interval=2), ToMe())
    for obj in (pipe.unet, pipe.unet.down_blocks[0], pipe):
        with pytest.raises(TypeError, match=r"cannot be pickled.*diffaccel\.disable\(pipe\) first"):
            pickle.dumps(obj)
    with pytest.raises(TypeError, match=r"diffaccel\.disable\(pipe\) first"):
        torch.save(pipe.unet, io.BytesIO())
    diffaccel.disable(pipe)
    buffer = io.BytesIO()
    torch.save(pipe.unet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 8, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, 300, emb).sample, pipe.unet(x, 300, emb).sample)

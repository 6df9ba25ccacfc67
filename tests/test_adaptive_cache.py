import pytest
import torch

import diffaccel
import tiny_pipes as tp
from cache_harness import denoise, inputs, pipe_for_harness
from diffaccel.methods import adaptive_cache


@pytest.mark.parametrize("name", ["pixart", "flux", "latte"])  # tensor blocks, tuple blocks + separate CFG, reshaping blocks
def test_threshold_zero_reproduces_original_exactly(name):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=5)
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.0)])
    out = tp.run(name, pipe, steps=5)
    assert torch.equal(base, out)
    assert diffaccel.stats(pipe)["methods"]["adaptive_cache"].get("reused", 0) == 0


@pytest.mark.parametrize("name", ["sd3", "cogvideox", "latte", "wan"])
def test_reuse_skips_blocks_and_stays_close(name):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=8)
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=1e9, warmup=2, max_consecutive=2)])
    out = tp.run(name, pipe, steps=8)
    s = diffaccel.stats(pipe)
    m = s["methods"]["adaptive_cache"]
    # steps 0,1 warm up; then two reuses, one compute: 2,3 reused, 4 computed, 5,6 reused, 7 computed
    branches = m["computed"] + m["reused"]
    assert m["reused"] == branches * 4 // 8
    assert 0.1 < s["flops_saved_fraction"] < 0.9
    assert torch.isfinite(out).all() and not torch.equal(base, out)
    assert (out - base).abs().max() < 0.5 * base.abs().max()


def test_separate_cfg_calls_match_batched_cfg():
    pipe = pipe_for_harness()
    x, c, u = inputs(1)
    plain = denoise(pipe, x, c, u, separate=False)
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.3, warmup=1, max_consecutive=3)])
    batched = denoise(pipe, x, c, u, separate=False)
    counts = lambda: {k: v for k, v in diffaccel.stats(pipe)["methods"]["adaptive_cache"].items() if k != "skipped_modules"}
    decisions_batched = counts()
    separate = denoise(pipe, x, c, u, separate=True)
    decisions_separate = counts()
    assert decisions_batched["reused"] > 0
    assert decisions_batched == decisions_separate
    # Equal up to batch-size-dependent float rounding, far closer than caching moves the result.
    assert (batched - plain).abs().max() > 1e-2
    torch.testing.assert_close(batched, separate, rtol=1e-3, atol=1e-4)


def test_branches_decide_separately_and_mixed_batches_match(monkeypatch):
    # CFG-Cache drops the unconditional half every other step, so the two branches' reuse
    # counters drift apart and batched calls must run the blocks for one half only.
    mixed = []
    original = adaptive_cache.AdaptiveCacheInstalled._mixed
    monkeypatch.setattr(adaptive_cache.AdaptiveCacheInstalled, "_mixed", lambda self, *a: mixed.append(1) or original(self, *a))
    methods = [diffaccel.FasterCache(attention_interval=1, cfg_interval=2, cfg_range=(0.0, 1.0)),
               diffaccel.AdaptiveCache(threshold=1e9, warmup=1, max_consecutive=1)]
    pipe = pipe_for_harness()
    x, c, u = inputs(1)
    diffaccel.accelerate(pipe, methods=methods)
    batched = denoise(pipe, x, c, u, separate=False)
    assert mixed, "expected steps where one CFG half computes and the other reuses"
    separate = denoise(pipe, x, c, u, separate=True)
    torch.testing.assert_close(batched, separate, rtol=1e-3, atol=1e-4)


def test_batch_of_two_matches_each_sample_alone():
    pipe = pipe_for_harness()
    x, c, u = inputs(2)
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=1e9, warmup=1, max_consecutive=2)])
    both = denoise(pipe, x, c, u, separate=False)
    for i in range(2):
        alone = denoise(pipe, x[i : i + 1], c[i : i + 1], u[i : i + 1], separate=False)
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-3, atol=1e-4)


def test_same_seed_twice_same_output_and_disable_restores():
    pipe = tp.build("cogvideox")
    base = tp.run("cogvideox", pipe, steps=6)
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.5, warmup=1)])
    a, b = tp.run("cogvideox", pipe, steps=6), tp.run("cogvideox", pipe, steps=6)
    assert torch.equal(a, b)
    diffaccel.disable(pipe)
    assert torch.equal(tp.run("cogvideox", pipe, steps=6), base)


def test_outside_a_pipeline_call_blocks_run_normally():
    pipe = tp.build("pixart")
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=1e9, warmup=0)])
    tr = pipe.transformer
    x, emb = torch.randn(1, 4, 8, 8), torch.randn(1, tp.TXT, 16)
    kw = dict(encoder_hidden_states=emb, added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    with torch.no_grad():
        first = tr(x, timestep=torch.tensor([500]), **kw)[0]
        again = tr(x, timestep=torch.tensor([500]), **kw)[0]
        diffaccel.disable(pipe)
        plain = tr(x, timestep=torch.tensor([500]), **kw)[0]
    assert torch.equal(first, plain) and torch.equal(again, plain)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=-0.1), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(max_consecutive=0), "max_consecutive"),
        (dict(head_blocks=0), "head_blocks"),
        (dict(warmup=-1), "warmup"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    pipe = tp.build("pixart")
    with pytest.raises(ValueError, match=message):
        diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(**kwargs)])


def test_no_block_left_to_cache_and_wrong_family():
    pipe = tp.build("pixart")  # 2 blocks
    with pytest.raises(ValueError, match="leaves no block to cache"):
        diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(head_blocks=1, tail_blocks=1)])
    with pytest.raises(ValueError, match="cannot accelerate pipelines of the unet family"):
        diffaccel.accelerate(tp.build("sd"), methods=[diffaccel.AdaptiveCache()])


@pytest.mark.parametrize("name", ["pixart", "wan"])
def test_dit_presets_accelerate_and_order_by_savings(name):
    saved = []
    for preset in ("quality", "balanced", "fast"):
        pipe = tp.build(name)
        diffaccel.accelerate(pipe, preset=preset)
        tp.run(name, pipe, steps=12)
        saved.append(diffaccel.stats(pipe)["flops_saved_fraction"])
    assert saved[0] <= saved[1] <= saved[2] and saved[2] > 0

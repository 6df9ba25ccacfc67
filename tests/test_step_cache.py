"""StepCache (whole-step skipping) and the forecast it reuses residuals with."""
import pytest
import torch

import diffaccel
import tiny_pipes as tp
from cache_harness import denoise, inputs, pipe_for_harness
from diffaccel.methods.forecast import History
from diffaccel.methods.step_cache import StepCache, step_schedule


@pytest.mark.parametrize("name", ["pixart", "flux", "latte"])  # tensor blocks, tuple blocks + separate CFG, reshaping blocks
def test_all_compute_mask_and_disable_reproduce_original_exactly(name):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=5)
    diffaccel.accelerate(pipe, methods=[StepCache(mask=(True,) * 5)])
    assert torch.equal(tp.run(name, pipe, steps=5), base)
    assert diffaccel.stats(pipe)["methods"]["step_cache"].get("reused", 0) == 0
    diffaccel.accelerate(pipe, methods=[StepCache(threshold=1e9, retention=0.0, final_steps=0, max_consecutive=3)])
    assert not torch.equal(tp.run(name, pipe, steps=5), base)
    diffaccel.disable(pipe)
    assert torch.equal(tp.run(name, pipe, steps=5), base)


@pytest.mark.parametrize("name, order", [("sd3", 0), ("cogvideox", 1), ("latte", 2), ("wan", 1)])
def test_planned_steps_skip_every_block_and_stay_close(name, order):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=8)
    mask = (True, True, True, False, True, False, True, True)
    diffaccel.accelerate(pipe, methods=[StepCache(mask=mask, forecast_order=order)])
    out = tp.run(name, pipe, steps=8)
    s = diffaccel.stats(pipe)
    m = s["methods"]["step_cache"]
    assert m["computed_steps"] == [0, 1, 2, 4, 6, 7]
    assert m["reused"] * 8 == (m["computed"] + m["reused"]) * 2  # 2 of 8 steps, every CFG half
    blocks = len(diffaccel.api.session_of(pipe).adapter.blocks())
    assert set(m["skipped_modules"]) == {n for n, _ in diffaccel.api.session_of(pipe).adapter.blocks()} and blocks > 0
    assert 0.1 < s["flops_saved_fraction"] < 0.25 + 1e-6
    assert torch.isfinite(out).all() and not torch.equal(base, out)
    assert (out - base).abs().max() < 0.5 * base.abs().max()
    assert torch.equal(tp.run(name, pipe, steps=8), out)  # deterministic, nothing crosses calls


def test_separate_cfg_calls_match_batched_cfg():
    pipe = pipe_for_harness()
    x, c, u = inputs(1)
    plain = denoise(pipe, x, c, u, separate=False)
    diffaccel.accelerate(pipe, methods=[StepCache(threshold=0.15, forecast_order=1)])
    batched = denoise(pipe, x, c, u, separate=False)
    stats_batched = diffaccel.stats(pipe)["methods"]["step_cache"]
    separate = denoise(pipe, x, c, u, separate=True)
    assert stats_batched["reused"] > 0
    assert diffaccel.stats(pipe)["methods"]["step_cache"]["computed_steps"] == stats_batched["computed_steps"]
    assert (batched - plain).abs().max() > 1e-3
    torch.testing.assert_close(batched, separate, rtol=1e-3, atol=1e-4)


def test_rule_keeps_retention_final_steps_and_cap():
    times = [1 - i / 10 for i in range(10)]
    config = StepCache(threshold=10.0, retention=0.2, final_steps=2, max_consecutive=2)
    assert step_schedule(config, times) == [True, True, False, False, True, False, False, True, True, True]
    # On a curve, only the change accumulated since the last computed step counts.
    curve = ((0.0, 0.0), (0.5, 0.0), (1.0, 1.0))  # flat below t = 0.5: free to skip there
    config = StepCache(threshold=0.15, retention=0.0, final_steps=0, max_consecutive=9, curve=curve)
    plan = step_schedule(config, times)
    assert all(plan[:5:1][i] for i in (0, 1, 2, 3, 4)) and plan[5:] == [True, False, False, False, False]
    with pytest.raises(ValueError, match="mask.*has 3 entries but the call runs 10 steps"):
        step_schedule(StepCache(mask=(True, False, True)), times)


def test_forecast_is_exact_on_polynomials_of_its_order_and_guarded():
    f = lambda t: torch.tensor([1.0 + 2.0 * t + 3.0 * t * t, -t])
    h = History()
    for t in (0.9, 0.7, 0.6):
        h.push(t, f(t))
    assert torch.equal(h.forecast(0.4, order=0), f(0.6))
    torch.testing.assert_close(h.forecast(0.4, order=2, guard=0), f(0.4))
    lin = History()
    for t in (0.9, 0.8):
        lin.push(t, torch.tensor([2.0 * t]))
    torch.testing.assert_close(lin.forecast(0.5, order=1, guard=0), torch.tensor([1.0]))
    torch.testing.assert_close(lin.forecast(0.5, order=2, guard=0), torch.tensor([1.0]))  # lowered to what is kept
    # The guard bounds the change to guard x (last change per interval) x intervals ahead.
    torch.testing.assert_close(lin.forecast(0.5, order=1, guard=0.5), torch.tensor([1.6 - 0.5 * 0.2 * 3]))
    tup = History()
    tup.push(1.0, (torch.ones(2), None))
    tup.push(0.5, (torch.zeros(2), None))
    out = tup.forecast(0.0, order=1)
    assert out[1] is None and torch.equal(out[0], -torch.ones(2))


def test_veto_computes_planned_skips_where_the_input_moved():
    pipe = tp.build("wan")
    mask = (True, True, False, True, False, True)
    diffaccel.accelerate(pipe, methods=[StepCache(mask=mask)])
    planned = tp.run("wan", pipe, steps=6)
    diffaccel.accelerate(pipe, methods=[StepCache(mask=mask, veto=1e9)])
    assert torch.equal(tp.run("wan", pipe, steps=6), planned)
    assert diffaccel.stats(pipe)["methods"]["step_cache"]["vetoed"] == 0
    diffaccel.accelerate(pipe, methods=[StepCache(mask=mask, veto=1e-9)])
    tp.run("wan", pipe, steps=6)
    m = diffaccel.stats(pipe)["methods"]["step_cache"]
    assert m["vetoed"] == 4 and m.get("reused", 0) == 0  # 2 planned skips x 2 calls (Wan calls once per CFG half)


@pytest.mark.parametrize("bad, match", [
    (dict(forecast_order=3), "forecast_order"), (dict(retention=1.5), "retention"), (dict(max_consecutive=0), "max_consecutive"),
    (dict(mask=(1, 0)), "one bool per step"), (dict(curve=((0.0, 1.0),)), "two"), (dict(guard=-1), "guard"),
])
def test_bad_parameters_say_what_to_do(bad, match):
    with pytest.raises(ValueError, match=match):
        diffaccel.accelerate(tp.build("pixart"), methods=[StepCache(**bad)])


def test_unet_pipelines_are_refused_clearly():
    with pytest.raises(ValueError, match="StepCache cannot accelerate pipelines of the unet family"):
        diffaccel.accelerate(tp.build("sd"), methods=[StepCache()])

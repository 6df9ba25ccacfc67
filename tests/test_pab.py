import pytest
import torch

import diffaccel
import tiny_pipes as tp
from cache_harness import denoise, inputs, pipe_for_harness
from diffaccel.api import session_of

OFF = dict(spatial_interval=1, temporal_interval=1, cross_interval=1)


@pytest.mark.parametrize("name", ["pixart", "latte"])
def test_interval_one_reproduces_original_exactly(name):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=5)
    diffaccel.accelerate(pipe, methods=[diffaccel.PAB(**OFF)])
    assert torch.equal(tp.run(name, pipe, steps=5), base)


def _expected_reuses(trace, interval, t_range, branches):
    """Reference schedule: per branch, reuse when inside the range and last compute < interval ago."""
    last, reused = {}, 0
    for step, branch, t in trace:
        for b in branches(branch):
            inside = t_range[0] < t < t_range[1]
            if inside and b in last and step - last[b] < interval:
                reused += 1
            else:
                last[b] = step
    return reused


@pytest.mark.parametrize("name", ["pixart", "flux", "latte"])  # t/1000, sigma timesteps, temporal kind
def test_schedule_follows_normalised_time(name):
    pipe = tp.build(name)
    pab = diffaccel.PAB(spatial_interval=2, temporal_interval=3, cross_interval=4)
    diffaccel.accelerate(pipe, methods=[pab])
    tp.run(name, pipe, steps=12)
    session = session_of(pipe)
    trace = session.ctx.trace
    batched = session.adapter.cfg_mode == "batched"
    branches = (lambda b: ["uncond", "cond"]) if batched else (lambda b: [b])
    settings = pab.resolved(session.adapter.family)
    expected = sum(
        _expected_reuses(trace, *settings[info.kind], branches)
        for info in session.adapter.attention_modules()
        if settings[info.kind][0] > 1
    )
    stats = diffaccel.stats(pipe)
    assert expected > 0
    assert stats["methods"]["pab"]["reused"] == expected
    assert stats["flops_saved_fraction"] > 0


def test_step_count_change_keeps_time_window():
    # The same normalised window covers the same share of the trajectory at 10 and 20 steps.
    shares = []
    for steps in (10, 20):
        pipe = tp.build("pixart")
        diffaccel.accelerate(pipe, methods=[diffaccel.PAB(spatial_interval=1000, cross_interval=1, spatial_range=(0.2, 0.6))])
        tp.run("pixart", pipe, steps=steps)
        m = diffaccel.stats(pipe)["methods"]["pab"]
        shares.append(m["reused"] / (m["reused"] + m["computed"]))
    assert abs(shares[0] - shares[1]) < 0.1 and shares[0] > 0.2


def test_separate_cfg_calls_match_batched_cfg_and_batch_of_two():
    pipe = pipe_for_harness()
    x, c, u = inputs(2)
    plain = denoise(pipe, x, c, u, separate=False)
    diffaccel.accelerate(pipe, methods=[diffaccel.PAB(spatial_interval=2, cross_interval=3, spatial_range=(0.0, 0.95))])
    batched = denoise(pipe, x, c, u, separate=False)
    separate = denoise(pipe, x, c, u, separate=True)
    assert (batched - plain).abs().max() > 1e-3
    torch.testing.assert_close(batched, separate, rtol=1e-3, atol=1e-4)
    alone = denoise(pipe, x[1:], c[1:], u[1:], separate=False)
    torch.testing.assert_close(batched[1:], alone, rtol=1e-3, atol=1e-4)


def test_family_defaults_follow_the_pyramid():
    for family in diffaccel.PAB.supported_families():
        kinds = diffaccel.PAB().resolved(family)
        assert kinds["cross"][0] >= kinds["spatial"][0]
    video = diffaccel.PAB().resolved("video_dit")
    assert video["cross"][0] > video["temporal"][0] > video["spatial"][0] == video["joint"][0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(spatial_interval=0), "spatial_interval"),
        (dict(cross_interval=-2), "cross_interval"),
        (dict(temporal_interval=1.5), "temporal_interval"),
        (dict(spatial_range=(0.9, 0.1)), "spatial_range"),
        (dict(cross_range=(0.0, 900)), "cross_range"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffaccel.accelerate(tp.build("pixart"), methods=[diffaccel.PAB(**kwargs)])


def test_wrong_family_is_refused():
    with pytest.raises(ValueError, match="PAB cannot accelerate pipelines of the unet family"):
        diffaccel.accelerate(tp.build("sd"), methods=[diffaccel.PAB()])

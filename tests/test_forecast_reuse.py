"""Forecasting in the existing caches: opt-in, off by default (outputs unchanged), and it moves the output."""
import pytest
import torch

import diffaccel
import tiny_pipes as tp


@pytest.mark.parametrize("name, make", [
    ("wan", lambda order: diffaccel.AdaptiveCache(threshold=1e9, warmup=2, max_consecutive=2, forecast_order=order)),
    ("latte", lambda order: diffaccel.AdaptiveCache(threshold=1e9, warmup=2, max_consecutive=2, forecast_order=order)),
    ("sd", lambda order: diffaccel.DeepCache(interval=3, forecast_order=order)),
])
def test_forecast_changes_only_the_reused_values(name, make):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=8)
    outs, counts = {}, {}
    for order in (0, 1, 2):
        diffaccel.accelerate(pipe, methods=[make(order)])
        outs[order] = tp.run(name, pipe, steps=8)
        counts[order] = {k: v for k, v in diffaccel.stats(pipe)["methods"][make(0).name].items() if k in ("computed", "reused")}
    assert counts[0] == counts[1] == counts[2] and counts[0]["reused"] > 0  # same decisions
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    for out in outs.values():
        assert torch.isfinite(out).all() and (out - base).abs().max() < 0.5 * base.abs().max()


def test_forecast_default_is_off_and_validated():
    assert diffaccel.AdaptiveCache().forecast_order == 0 and diffaccel.DeepCache().forecast_order == 0
    with pytest.raises(ValueError, match="forecast_order"):
        diffaccel.accelerate(tp.build("sd"), methods=[diffaccel.DeepCache(forecast_order=5)])
    with pytest.raises(ValueError, match="forecast_order"):
        diffaccel.accelerate(tp.build("wan"), methods=[diffaccel.AdaptiveCache(forecast_order=-1)])

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


def test_deepcache_forecast_span_bounds_the_gap_a_forecast_bridges():
    """A forecast extrapolates only from full steps at most ``forecast_span`` apart in normalised time."""
    pipe = tp.build("sd")
    outs = {}
    for key, kwargs in {"plain": dict(), "wide": dict(forecast_order=1, forecast_span=1.0),
                        "narrow": dict(forecast_order=1, forecast_span=0.05)}.items():
        diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=3, **kwargs)])
        outs[key] = tp.run("sd", pipe, steps=8)  # every 3 of 8 steps: full steps ~0.37 apart
    diffaccel.disable(pipe)
    assert torch.equal(outs["narrow"], outs["plain"]) and not torch.equal(outs["wide"], outs["plain"])
    with pytest.raises(ValueError, match="forecast_span"):
        diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(forecast_span=1.5)])


def test_unet_presets_forecast_only_where_full_steps_are_close():
    """quality / balanced / fast forecast at 50 steps and reuse plainly at 10 (full steps >= 0.2 apart),
    where their max_span also adds full steps (quality and balanced: every step; fast: every 2)."""
    from dataclasses import replace

    from diffaccel.bundled.loader import default_call_kwargs
    from diffaccel.presets import preset_methods

    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v for k, v in default_call_kwargs("tiny-sd").items() if k != "num_inference_steps"}

    def run(steps, **accel):
        diffaccel.accelerate(pipe, **accel)
        out = pipe("a red circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   output_type="np", **kwargs).images
        diffaccel.disable(pipe)
        return torch.from_numpy(out)

    for preset, interval, every in (("quality", 2, 1), ("balanced", 3, 1), ("fast", 4, 2)):
        cfg = [diffaccel.CfgCache(interval=every)] if preset == "fast" else []  # at DeepCache's full steps
        plain = [diffaccel.TextCache(required=False), diffaccel.DeepCache(interval=every), *cfg]
        assert torch.equal(run(10, preset=preset), run(10, methods=plain)), preset
        cfg = [diffaccel.CfgCache(interval=interval)] if preset == "fast" else []
        plain = [diffaccel.TextCache(required=False), diffaccel.DeepCache(interval=interval), *cfg]
        assert not torch.equal(run(50, preset=preset), run(50, methods=plain)), preset
        # At the 20 steps the presets were tuned at, max_span adds no full step.
        unbounded = [replace(m, max_span=1.0) if isinstance(m, (diffaccel.DeepCache, diffaccel.CfgCache)) else m
                     for m in preset_methods(preset, "unet")]
        assert torch.equal(run(20, preset=preset), run(20, methods=unbounded)), preset

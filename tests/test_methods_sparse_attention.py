"""SlidingTileAttention and MediatorAttention on tiny real pipelines: they run where the
adapter says, compute what the kernels define (text first or last), keep full attention
early, disable exactly, and reject bad parameters."""

import math

import pytest
import torch

import diffaccel
import diffaccel.methods.attention_intercept as intercept
import tiny_pipes as tp
from diffaccel.kernels.sliding_tile_reference import sliding_tile_mask
from diffaccel.kernels.tile_layout import make_spec
from diffaccel.methods.mediator import MediatorAttention
from diffaccel.methods.sliding_tile import SlidingTileAttention
from diffaccel.pipelines import detect

# grids large enough that a window is smaller than the grid
BIG = {"pixart": {}, "sd3": {}, "cogvideox": dict(height=64, width=64), "wan": dict(height=64, width=64),
       "sd": dict(height=32, width=32), "hunyuan": dict(height=64, width=64)}
STA = dict(tile=(1, 2, 2), window=(1, 1, 1), min_tokens=0, full_attention_fraction=0.25)


def _run(name, pipe, steps=4):
    kwargs = tp.call_kwargs(name, steps=steps)
    kwargs.update(BIG[name])
    out = pipe(**kwargs)
    return out[0] if isinstance(out, tuple) else getattr(out, "images", getattr(out, "frames", None))


@pytest.mark.parametrize("name", ["pixart", "sd3", "cogvideox", "wan", "sd", "hunyuan"])
@pytest.mark.parametrize("method", [SlidingTileAttention(**STA), MediatorAttention(min_tokens=0)],
                         ids=["sliding_tile", "mediator"])
def test_runs_sparse_and_disables_exactly(name, method):
    pipe = tp.build(name)
    baseline = _run(name, pipe)
    diffaccel.accelerate(pipe, methods=[method])
    accelerated = _run(name, pipe)
    stats = diffaccel.stats(pipe)["methods"][method.name]
    assert stats.get("sparse_calls", 0) > 0 and "dense_fallback_calls" not in stats, stats
    assert stats["flops_saved"] > 0
    assert not torch.equal(accelerated, baseline)
    diffaccel.disable(pipe)
    assert torch.equal(_run(name, pipe), baseline)


def test_full_attention_phase_and_covering_window_leave_output_unchanged():
    pipe = tp.build("pixart")
    baseline = _run("pixart", pipe)
    for config in (SlidingTileAttention(**(STA | dict(full_attention_fraction=1.0))),
                   SlidingTileAttention(**(STA | dict(window=(1, 9, 9)))),  # covers the 8x8 grid
                   SlidingTileAttention(**(STA | dict(min_tokens=10_000)))):
        diffaccel.accelerate(pipe, methods=[config])
        assert torch.equal(_run("pixart", pipe), baseline)
        assert "sparse_calls" not in diffaccel.stats(pipe)["methods"]["sliding_tile"]
    diffaccel.disable(pipe)


def test_first_steps_stay_dense():
    pipe = tp.build("pixart")
    diffaccel.accelerate(pipe, methods=[SlidingTileAttention(**(STA | dict(full_attention_fraction=0.5)))])
    _run("pixart", pipe, steps=4)
    stats = diffaccel.stats(pipe)["methods"]["sliding_tile"]
    attention_modules = 2  # two transformer blocks, batched CFG: one call per step
    assert stats["dense_calls"] == 2 * attention_modules and stats["sparse_calls"] == 2 * attention_modules


@pytest.mark.parametrize("name", ["sd3", "cogvideox"])  # text last / text first
def test_pipeline_attention_equals_masked_reference_in_model_order(name, monkeypatch):
    """Every sparse SDPA call inside the pipeline equals dense SDPA with the sliding-tile mask
    laid out in the model's own token order (text first or last)."""
    calls = []
    original = intercept.SparseAttentionHook._sparse

    def spy(self, layout, setting, call):
        out = original(self, layout, setting, call)
        calls.append((layout, call.query, call.key, call.value, out))
        return out

    monkeypatch.setattr(intercept.SparseAttentionHook, "_sparse", spy)
    pipe = tp.build(name)
    config = SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 3), min_tokens=0, full_attention_fraction=0.0)
    diffaccel.accelerate(pipe, methods=[config])
    _run(name, pipe, steps=2)
    assert calls
    for layout, q, k, v, out in calls:
        grid, text = (layout.frames, layout.height, layout.width), layout.text_tokens
        tile = tuple(min(t, s) for t, s in zip(config.tile, grid))
        mask = sliding_tile_mask(make_spec(q, k, v, grid, tile, config.window, text), q.shape[1])[0]
        if layout.text_position == "last":  # mask is text-first: move text rows/cols to the end
            order = torch.cat([torch.arange(text, text + layout.num_visual), torch.arange(text)])
            mask = mask[order][:, order]
        expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                    attn_mask=mask)
        assert (out.double() - expected).abs().max() <= 1e-4


def test_per_layer_windows_and_cpu_vs_dense_backend_agree():
    pipe = tp.build("cogvideox")
    names = [info.name for info in detect(pipe).attention_modules()]
    layer_windows = {names[0]: [(1, 1, 1), (3, 1, 3)]}  # per-head windows on the first layer
    outs = []
    for backend in ("cpu", "dense"):
        diffaccel.accelerate(pipe, methods=[SlidingTileAttention(**STA, layer_windows=layer_windows, backend=backend)])
        outs.append(_run("cogvideox", pipe))
    diffaccel.disable(pipe)
    assert (outs[0] - outs[1]).abs().max() <= 1e-4


def test_mediator_count_grows_with_steps():
    config = MediatorAttention(mediator_ratio=(1 / 16, 1 / 4), full_attention_fraction=0.2)
    ratios = [config.ratio_at(step / 10) for step in range(2, 10)]
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1 / 16) and ratios[-1] < 1 / 4


@pytest.mark.parametrize("config,message", [
    (lambda: SlidingTileAttention(window=(2, 3, 3)), "odd positive ints"),
    (lambda: SlidingTileAttention(tile=(1, 0, 8)), "positive ints"),
    (lambda: SlidingTileAttention(full_attention_fraction=1.5), "full_attention_fraction"),
    (lambda: SlidingTileAttention(backend="tpu"), "backend"),
    (lambda: SlidingTileAttention(layer_windows={"transformer_blocks.0.attn1": (3, 3)}), "layer_windows"),
    (lambda: MediatorAttention(mediator_ratio=(0.0, 0.5)), "must be > 0"),
    (lambda: MediatorAttention(mediator_ratio=(0.1, 1.0)), "mediator_ratio"),
])
def test_bad_parameters_name_the_problem(config, message):
    with pytest.raises(ValueError, match=message):
        diffaccel.accelerate(tp.build("pixart"), methods=[config()])


def test_unknown_layer_name_is_rejected():
    with pytest.raises(ValueError, match="not spatial/joint self-attention"):
        diffaccel.accelerate(tp.build("pixart"), methods=[SlidingTileAttention(layer_windows={"nope": (1, 3, 3)})])


def test_unet_and_text_last_grids_match_layout():
    """The adapter's layout and the sequence seen by SDPA agree (no dense fallbacks)."""
    for name in ("sd", "sd3"):
        pipe = tp.build(name)
        diffaccel.accelerate(pipe, methods=[MediatorAttention(min_tokens=0)])
        _run(name, pipe, steps=2)
        stats = diffaccel.stats(pipe)["methods"]["mediator"]
        assert stats["sparse_calls"] > 0 and "dense_fallback_calls" not in stats
        assert math.isfinite(stats["flops_saved"])

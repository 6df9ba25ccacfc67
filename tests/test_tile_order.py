"""Sliding-tile attention with the tokens kept in tile order (permute once per call): the order,
the tile-ordered kernels against the dense masked reference, and every video family whose
adapter supports it against the per-layer path (the same attention on unpermuted tokens), with
checks that a missing position table would be caught."""

import dataclasses
import inspect
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers as D
import pytest
import torch

import diffaccel
import tiny_pipes as tp
from diffaccel.kernels.sliding_tile_reference import sliding_tile_attention_reference
from diffaccel.kernels.tile_order import (join_text, sliding_tile_attention_tile_ordered, tile_order,
                                          tile_order_inverse)
from diffaccel.methods.mediator import MediatorAttention
from diffaccel.methods.sliding_tile import SlidingTileAttention
from diffaccel.pipelines import detect

CASES = [  # (grid, tile, window, text, heads): ragged edge tiles, per-head windows, 2D
    ((3, 5, 7), (2, 2, 3), (1, 3, 1), 0, 2),
    ((3, 5, 7), (2, 2, 3), (3, 1, 3), 5, 2),
    ((1, 9, 10), (1, 4, 3), (1, 1, 3), 7, 3),
    ((3, 5, 7), (2, 2, 3), [(1, 3, 1), (3, 3, 3), (1, 1, 1)], 4, 3),
    ((4, 6, 6), (2, 3, 3), (1, 1, 1), 0, 2),
]


def test_tile_order_is_the_tile_major_permutation():
    grid, tile = (3, 5, 7), (2, 2, 3)
    order = tile_order(grid, tile)
    assert sorted(order.tolist()) == list(range(math.prod(grid)))
    assert torch.equal(order[tile_order_inverse(grid, tile)], torch.arange(math.prod(grid)))
    coords = [(i // 35, (i // 7) % 5, i % 7) for i in order.tolist()]
    tiles = [(t // 2, h // 2, w // 3) for t, h, w in coords]
    assert tiles == sorted(tiles)  # tiles in row-major tile order, each contiguous
    first = [c for c, t in zip(coords, tiles) if t == (0, 0, 0)]
    assert first == sorted(first) and len(first) == 2 * 2 * 3
    assert len([t for t in tiles if t == (1, 2, 2)]) == 1 * 1 * 1  # the ragged corner tile


def _model_order(x, grid, tile, text, position):
    """Row-major, text-first (B, h, seq, D) -> the model's order: video in tile order, text first or last."""
    return join_text(x[:, :, :text], x[:, :, text:][:, :, tile_order(grid, tile)], position)


@pytest.mark.parametrize("grid,tile,window,text,heads", CASES)
@pytest.mark.parametrize("position", ["first", "last"])
def test_tile_ordered_attention_matches_reference(grid, tile, window, text, heads, position):
    gen = torch.Generator().manual_seed(0)
    seq = text + math.prod(grid)
    # (B, seq, heads, D) memory seen as (B, heads, seq, D), as attention processors pass it
    q, k, v = (torch.randn(2, seq, heads, 16, generator=gen).transpose(1, 2) for _ in range(3))
    expected = _model_order(sliding_tile_attention_reference(q.double(), k.double(), v.double(), grid, tile, window,
                                                             text), grid, tile, text, position)
    qm, km, vm = (_model_order(x, grid, tile, text, position) for x in (q, k, v))
    for backend in (None, "boxes", "dense"):
        out = sliding_tile_attention_tile_ordered(qm, km, vm, grid, tile, window, text, position, backend=backend)
        assert out.shape == qm.shape and (out.double() - expected).abs().max() <= 1e-5, backend


def test_even_window_covering_the_axis_is_accepted():
    """The HunyuanVideo case that errored on the H100: window = tile counts (5, 6, 10), even."""
    from diffaccel.kernels import sliding_tile_attention, sliding_tile_density
    grid, tile, text = (5, 12, 20), (1, 2, 2), 3  # (5, 6, 10) tiles
    q, k, v = (torch.randn(1, 2, text + math.prod(grid), 8) for _ in range(3))
    assert sliding_tile_density(grid, tile, (5, 6, 10), text) == 1.0
    covering = sliding_tile_attention(q, k, v, grid, tile, (5, 7, 11), text, backend="boxes")
    for window in ((5, 6, 10), (6, 6, 10)):
        assert torch.allclose(sliding_tile_attention(q, k, v, grid, tile, window, text, backend="boxes"), covering,
                              atol=1e-6)
    with pytest.raises(ValueError, match="odd .* or cover the whole axis"):
        sliding_tile_attention(q, k, v, grid, tile, (5, 4, 10), text)


TRITON_SCRIPT = textwrap.dedent("""
    import math, torch
    from diffaccel.kernels.sliding_tile_reference import sliding_tile_attention_reference
    from diffaccel.kernels.tile_order import join_text, sliding_tile_attention_tile_ordered, tile_order
    # ragged tiles with text first; 64-token tiles (one block each) with text last; per-head windows
    cases = [((3, 5, 7), (2, 2, 3), (3, 1, 3), 5, 1), ((2, 8, 16), (1, 8, 8), (1, 1, 1), 3, 1),
             ((2, 5, 7), (1, 2, 3), [(1, 3, 1), (1, 1, 3)], 4, 2)]
    for i, (grid, tile, window, text, heads) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        seq = text + math.prod(grid)
        q, k, v = (torch.randn(1, seq, heads, 16, generator=gen).transpose(1, 2) for _ in range(3))
        position = "last" if i % 2 else "first"
        order = lambda x: join_text(x[:, :, :text], x[:, :, text:][:, :, tile_order(grid, tile)], position)
        exact = order(sliding_tile_attention_reference(q.double(), k.double(), v.double(), grid, tile, window, text))
        for dtype in ((torch.float32, torch.bfloat16) if i == 0 else (torch.float32,)):
            qm, km, vm = (order(x).to(dtype) for x in (q, k, v))
            out = sliding_tile_attention_tile_ordered(qm, km, vm, grid, tile, window, text, position, backend="triton")
            ref = order(sliding_tile_attention_reference(*(x.to(dtype) for x in (q, k, v)), grid, tile, window, text))
            print(str(dtype)[6:], (out.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item())
""")


def test_tile_ordered_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 4
    for kind, err, torch_err in lines:
        assert float(err) <= (1e-5 if kind == "float32" else 2 * float(torch_err) + 1e-6), lines


@pytest.mark.parametrize("dtype,head_dim,block,capability", [("bf16", 64, 64, 90), ("fp16", 128, 128, 80)])
def test_tile_ordered_triton_kernel_compiles_for_gpu_targets(dtype, head_dim, block, capability):
    """Full Triton compile to cubin without a GPU (frontend rules, shared memory)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffaccel.kernels import sliding_tile_ordered_triton as module
    kernel = module._sliding_tile_ordered_fwd
    if not hasattr(kernel, "fn") or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernel imported in interpreter mode")
    names = list(inspect.signature(kernel.fn).parameters)
    constants = dict(HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_M=block, BLOCK_N=64, IEEE=False)
    types = ({"TileStart": "*i32", "QBlocks": "*i32", "Windows": "*i32", "scale_log2": "fp32"}
             | {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")})
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=8 if block == 128 else 4, num_stages=2))
    assert "cubin" in compiled.asm and compiled.metadata.shared <= 160 * 1024 + 8 * 1024


# ---- whole models --------------------------------------------------------------------------------

def _build(name):
    """Tiny pipelines, plus variants that exercise each kind of position table."""
    if name == "cogvideox_rope":  # CogVideoX-5b style: the pipeline passes a rotary table per video token
        pipe = tp.build("cogvideox")
        torch.manual_seed(0)
        tr = D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                           time_embed_dim=8, text_embed_dim=16, num_layers=2, sample_width=8,
                                           sample_height=8, sample_frames=9, patch_size=2,
                                           temporal_compression_ratio=4, max_text_seq_length=tp.TXT,
                                           use_rotary_positional_embeddings=True).eval()
        pipe = D.CogVideoXPipeline(**(pipe.components | dict(transformer=tr)))
    elif name == "ltx_i2v":  # per-token timesteps (the conditioning frame is less noisy)
        pipe = D.LTXImageToVideoPipeline(**tp.build("ltx").components)
    elif name == "wan_ti2v":  # Wan 2.2 TI2V: per-token timesteps
        pipe = D.WanPipeline(**tp.build("wan").components, expand_timesteps=True)
    else:
        pipe = tp.build(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(name, pipe):
    kwargs = tp.call_kwargs(name.split("_")[0], steps=3) | dict(height=64, width=64)
    if name == "ltx_i2v":
        kwargs["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = pipe(**kwargs)
    return out[0] if isinstance(out, tuple) else getattr(out, "frames", None)


STA = dict(tile=(2, 3, 3), window=(1, 1, 1), min_tokens=0, full_attention_fraction=0.3)  # ragged tiles


def _accelerated(name, pipe, **config):
    diffaccel.accelerate(pipe, methods=[SlidingTileAttention(**(STA | config))])
    try:
        return _run(name, pipe), diffaccel.stats(pipe)["methods"]["sliding_tile"]
    finally:
        diffaccel.disable(pipe)


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox_rope", "hunyuan", "wan", "wan_ti2v", "ltx_i2v"])
def test_permute_once_equals_per_layer_reorder(name):
    pipe = _build(name)
    baseline = _run(name, pipe)
    per_layer, _ = _accelerated(name, pipe)
    once, stats = _accelerated(name, pipe, permute_once=True)
    assert stats["tile_ordered_calls"] == stats["sparse_calls"] > 0, stats
    assert not torch.allclose(per_layer, baseline, atol=1e-3)  # the windows do change the output
    assert torch.allclose(once, per_layer, atol=1e-5, rtol=1e-5), (once - per_layer).abs().max()
    assert torch.equal(_run(name, pipe), baseline)  # disable leaves nothing behind


@pytest.mark.parametrize("name,drop", [("hunyuan", "tables"), ("cogvideox_rope", "call_tables"),
                                       ("ltx_i2v", "call_tables")])
def test_a_missing_position_table_would_be_caught(name, drop, monkeypatch):
    """Without reordering the rotary table / per-token timesteps the output moves: the test
    above would fail if an adapter missed one."""
    pipe = _build(name)
    per_layer, _ = _accelerated(name, pipe)
    adapter_cls = type(detect(pipe))
    original = adapter_cls.token_sequence
    monkeypatch.setattr(adapter_cls, "token_sequence", lambda self: dataclasses.replace(original(self), **{drop: ()}))
    once, _ = _accelerated(name, pipe, permute_once=True)
    assert (once - per_layer).abs().max() > 1e-2


def test_unsupported_models_and_combinations_say_why():
    with pytest.raises(ValueError, match="permute_once=True.*Latte folds frames"):
        diffaccel.accelerate(tp.build("latte"), methods=[SlidingTileAttention(**STA, permute_once=True)])
    pipe = tp.build("hunyuan")
    pipe.transformer.register_to_config(image_condition_type="token_replace")
    with pytest.raises(ValueError, match="first frame"):
        diffaccel.accelerate(pipe, methods=[SlidingTileAttention(**STA, permute_once=True)])
    pipe = tp.build("wan")
    # refused either by the tile-order check or, first, by the routing (one processor, one sparse method)
    with pytest.raises(ValueError, match="mediator|already routed by another diffaccel method"):
        diffaccel.accelerate(pipe, methods=[MediatorAttention(min_tokens=0), SlidingTileAttention(**STA,
                                                                                                   permute_once=True)])
    assert torch.equal(_run("wan", pipe), _run("wan", tp.build("wan")))  # the failed install left nothing
    with pytest.raises(ValueError, match="permute_once"):
        SlidingTileAttention(permute_once="yes").validate()

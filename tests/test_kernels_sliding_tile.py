"""Sliding-tile attention: every path against the dense masked reference, the reference
against the written semantics, low precision against PyTorch's own error, bad input."""

import importlib.util
import inspect
import itertools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffaccel.kernels import sliding_tile_attention, sliding_tile_density
from diffaccel.kernels.sliding_tile_reference import sliding_tile_attention_reference, sliding_tile_mask
from diffaccel.kernels.tile_layout import make_spec

# (grid, tile, window, text_tokens, heads): odd grids, ragged edge tiles, per-head windows
CASES = [
    ((3, 5, 7), (2, 2, 3), (1, 3, 1), 0, 2),
    ((3, 5, 7), (2, 2, 3), (3, 1, 3), 5, 2),
    ((3, 5, 7), (1, 2, 2), (3, 3, 3), 3, 1),
    ((1, 9, 10), (1, 4, 3), (1, 1, 3), 0, 3),
    ((9, 10), (2, 3), (1, 3), 7, 2),  # 2D grid given as (H, W)
    ((3, 5, 7), (2, 2, 3), [(1, 3, 1), (3, 3, 3), (1, 1, 1)], 4, 3),
    ((4, 6, 6), (2, 3, 3), (1, 1, 1), 0, 2),  # grid a multiple of the tile
]


def _inputs(grid, text, heads, dim=16, dtype=torch.float32, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seq = text + math.prod(grid)
    return [torch.randn(batch, heads, seq, dim, generator=gen).to(dtype) for _ in range(3)]


def _reference64(q, k, v, grid, tile, window, text):
    return sliding_tile_attention_reference(q.double(), k.double(), v.double(), grid, tile, window, text)


def test_reference_mask_matches_written_semantics():
    """Brute force over every (query, key) pair of an odd grid, straight from the issue text."""
    grid, tile, window, text = (3, 5, 7), (2, 2, 3), (1, 3, 1), 2
    q = torch.zeros(1, 1, text + math.prod(grid), 1)
    mask = sliding_tile_mask(make_spec(q, q, q, grid, tile, window, text), heads=1)[0]
    coords = list(itertools.product(*(range(s) for s in grid)))
    for i, j in itertools.product(range(mask.shape[0]), repeat=2):
        if i < text or j < text:
            expected = True
        else:
            expected = True
            for a_pos, x_pos, size, t, w in zip(coords[i - text], coords[j - text], grid, tile, window):
                n = -(-size // t)
                if w < n:
                    a, x = a_pos // t, x_pos // t
                    expected &= abs(min(max(a, w // 2), n - 1 - w // 2) - x) <= w // 2
        assert bool(mask[i, j]) == expected, (i, j)


@pytest.mark.parametrize("grid,tile,window,text,heads", CASES)
def test_density_counts_mask(grid, tile, window, text, heads):
    q = torch.zeros(1, heads, text + math.prod(grid), 1)
    spec = make_spec(q, q, q, grid, tile, window, text)
    mask = sliding_tile_mask(spec, heads)
    assert sliding_tile_density(grid, tile, window, text, heads) == pytest.approx(mask.float().mean().item())


@pytest.mark.parametrize("grid,tile,window,text,heads", CASES)
def test_box_path_matches_reference_fp32(grid, tile, window, text, heads):
    q, k, v = _inputs(grid, text, heads)
    out = sliding_tile_attention(q, k, v, grid, tile, window, text, backend="cpu")
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out.double() - _reference64(q, k, v, grid, tile, window, text)).abs().max() <= 1e-4


def test_default_backend_on_cpu_is_exact_and_custom_scale():
    grid, tile, window, text = (3, 5, 7), (2, 2, 3), (3, 1, 3), 5
    q, k, v = _inputs(grid, text, 2)
    out = sliding_tile_attention(q, k, v, grid, tile, window, text, scale=0.3)
    ref = sliding_tile_attention_reference(q.double(), k.double(), v.double(), grid, tile, window, text, scale=0.3)
    assert (out.double() - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,tile,window,text,heads", [CASES[1], CASES[4], CASES[5]])
def test_box_path_low_precision_within_2x_pytorch_error(dtype, grid, tile, window, text, heads):
    q, k, v = _inputs(grid, text, heads, dtype=dtype)
    exact = _reference64(q, k, v, grid, tile, window, text)
    torch_error = (sliding_tile_attention_reference(q, k, v, grid, tile, window, text).double() - exact).abs().max()
    out = sliding_tile_attention(q, k, v, grid, tile, window, text, backend="boxes")
    assert out.dtype == dtype
    assert (out.double() - exact).abs().max() <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("grid,tile,window,text,heads", [CASES[1], CASES[3], CASES[5]])
def test_flex_path_matches_reference(grid, tile, window, text, heads):
    q, k, v = _inputs(grid, text, heads)
    out = sliding_tile_attention(q, k, v, grid, tile, window, text, backend="flex")
    assert (out.double() - _reference64(q, k, v, grid, tile, window, text)).abs().max() <= 1e-4


@pytest.mark.parametrize("grid,tile,window,text,heads", CASES[1:2] + CASES[5:6])
def test_flex_arithmetic_mask_matches_reference(grid, tile, window, text, heads, monkeypatch):
    """The mask_mod FlexAttention uses past the lookup table's size limit."""
    from diffaccel.kernels import sliding_tile_flex

    monkeypatch.setattr(sliding_tile_flex, "MAX_TABLE", 0)
    sliding_tile_flex._cached_block_mask.cache_clear()
    try:
        q, k, v = _inputs(grid, text, heads)
        out = sliding_tile_attention(q, k, v, grid, tile, window, text, backend="flex")
        assert (out.double() - _reference64(q, k, v, grid, tile, window, text)).abs().max() <= 1e-4
    finally:
        sliding_tile_flex._cached_block_mask.cache_clear()


def test_dense_backend_is_the_reference():
    grid, tile, window, text, heads = CASES[5]
    q, k, v = _inputs(grid, text, heads)
    out = sliding_tile_attention(q, k, v, grid, tile, window, text, backend="dense")
    assert (out.double() - _reference64(q, k, v, grid, tile, window, text)).abs().max() <= 1e-4


def test_window_covering_grid_is_full_attention():
    """window >= tile count on every axis (here even far larger than the grid): plain SDPA."""
    grid, text = (3, 5, 7), 4
    q, k, v = _inputs(grid, text, 2)
    out = sliding_tile_attention(q, k, v, grid, (2, 2, 3), (9, 9, 9), text)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5
    # one axis full, others windowed: the full axis is unrestricted, not an error
    out = sliding_tile_attention(q, k, v, grid, (2, 2, 3), (5, 1, 1), text, backend="boxes")
    ref = _reference64(q, k, v, grid, (2, 2, 3), (1, 1, 1), text)
    assert (out.double() - _reference64(q, k, v, grid, (2, 2, 3), (5, 1, 1), text)).abs().max() <= 1e-4
    assert (out.double() - ref).abs().max() > 1e-3  # and it differs from the windowed T axis


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=(1, 2, 1)), "must be odd"),
    (dict(window=(1, 0, 1)), "must be odd and >= 1"),
    (dict(tile=(2, 0, 3)), "tile sizes must be >= 1"),
    (dict(grid=(3, 5, 6)), "mismatched layout"),
    (dict(text_tokens=3), "mismatched layout"),
    (dict(window=[(1, 1, 1)] * 3), "3 windows for 2 heads"),
    (dict(window=3), "one value per axis"),
    (dict(backend="cuda"), "unknown backend"),
])
def test_bad_input_raises_clear_error(kwargs, message):
    grid, tile, window, text = (3, 5, 7), (2, 2, 3), (1, 3, 1), 0
    q, k, v = _inputs(grid, text, 2)
    args = dict(grid=grid, tile=tile, window=window, text_tokens=text) | kwargs
    with pytest.raises(ValueError, match=message):
        sliding_tile_attention(q, k, v, **args)


def test_forced_triton_on_cpu_explains_why_not(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _inputs((3, 5, 7), 0, 2)
    # CI has no triton (it is the `gpu` extra); a dev box may have it without CUDA
    has_triton = importlib.util.find_spec("triton") is not None
    why = "needs a CUDA tensor.*TRITON_INTERPRET=1" if has_triton else r"triton is not installed \(pip install"
    with pytest.raises(ValueError, match=why):
        sliding_tile_attention(q, k, v, (3, 5, 7), (2, 2, 3), (1, 3, 1), backend="triton")
    big = torch.randn(1, 1, 105, 320)
    with pytest.raises(ValueError, match="head_dim 320 > 256" if has_triton else "triton is not installed"):
        sliding_tile_attention(big, big, big, (3, 5, 7), (2, 2, 3), (1, 3, 1), backend="triton")
    # the automatic choice falls back to the exact box path instead
    out = sliding_tile_attention(big, big, big, (3, 5, 7), (2, 2, 3), (1, 3, 1))
    assert (out.double() - _reference64(big, big, big, (3, 5, 7), (2, 2, 3), (1, 3, 1), 0)).abs().max() <= 1e-4


TRITON_SCRIPT = textwrap.dedent("""
    import math, torch
    from diffaccel.kernels import sliding_tile_attention
    from diffaccel.kernels.sliding_tile_reference import sliding_tile_attention_reference
    from diffaccel.kernels.sliding_tile_triton import sliding_tile_attn
    cases = [((3, 5, 7), (2, 2, 3), (3, 1, 3), 5, 2, 24),
             ((1, 9, 10), (1, 4, 3), [(1, 1, 3), (1, 3, 1)], 0, 2, 16)]
    for grid, tile, window, text, heads, dim in cases:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, text + math.prod(grid), dim, generator=gen) for _ in range(3))
        exact = sliding_tile_attention_reference(q.double(), k.double(), v.double(), grid, tile, window, text)
        out = sliding_tile_attention(q, k, v, grid, tile, window, text, backend="triton")
        print("fp32", (out.double() - exact).abs().max().item())
        for dtype in (torch.float16, torch.bfloat16):  # bf16: the interpreter's dot runs in fp32
            ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
            torch_err = (sliding_tile_attention_reference(ql, kl, vl, grid, tile, window, text).double()
                         - exact).abs().max()
            out = sliding_tile_attention(ql, kl, vl, grid, tile, window, text, backend="triton")
            assert out.dtype == dtype
            print(str(dtype), (out.double() - exact).abs().max().item(), torch_err.item())
    # the custom op's fake implementation: schema and FakeTensor checks
    args = (torch.randn(1, 2, 32, 16), torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16), torch.zeros(48),
            torch.ones(2, 3, dtype=torch.int32), 16, 1, 1, 2, 16, 0.25, 16, 16, 4, 2)
    torch.library.opcheck(sliding_tile_attn, args, test_utils=("test_schema", "test_faketensor"))
    # torch.compile traces through the public function and the custom op without graph breaks
    grid, tile, window, text = cases[0][:4]
    q, k, v = (torch.randn(1, 2, text + math.prod(grid), 16) for _ in range(3))
    run = lambda q, k, v: sliding_tile_attention(q, k, v, grid, tile, window, text, backend="triton")
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)(q, k, v)
    assert (compiled - run(q, k, v)).abs().max() <= 1e-6
    print("opcheck ok")
""")


def test_triton_kernel_under_interpreter():
    """The Triton kernel itself, run on CPU by Triton's interpreter (fresh process, because
    triton.jit reads TRITON_INTERPRET when the kernel module is imported)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[-1] == ["opcheck", "ok"]
    for kind, *errors in lines[:-1]:
        if kind == "fp32":
            assert float(errors[0]) <= 1e-4
        else:
            assert float(errors[0]) <= 2 * float(errors[1]) + 1e-6


@pytest.mark.parametrize("dtype,head_dim,config,capability", [
    ("bf16", 64, dict(block_m=64, block_n=64, num_warps=4, num_stages=2), 90),
    ("fp32", 128, dict(block_m=128, block_n=64, num_warps=8, num_stages=2), 80),
])
def test_triton_kernel_compiles_for_gpu_targets(dtype, head_dim, config, capability):
    """Full Triton compile (to cubin) for sm_80 / sm_90 without a GPU: catches what the
    interpreter does not check (frontend rules, shared memory) before the GPU run."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffaccel.kernels import sliding_tile_triton as module
    kernel = module._sliding_tile_fwd
    if not hasattr(kernel, "fn") or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("kernel imported in interpreter mode")
    names = list(inspect.signature(kernel.fn).parameters)
    constants = dict(HEAD_DIM=head_dim, D_PAD=head_dim, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
                     IEEE=dtype == "fp32")
    types = {"Bias": "*fp32", "Windows": "*i32", "scale_log2": "fp32"} | {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))
    assert "cubin" in compiled.asm and compiled.metadata.shared <= 160 * 1024 + 8 * 1024

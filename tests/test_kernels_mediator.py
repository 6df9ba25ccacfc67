"""Mediator attention: fused (two SDPA) path against the explicit reference, pooling,
low precision against PyTorch's own error, the m -> N limit, bad input."""

import math

import pytest
import torch

from diffaccel.kernels import mediator_attention, mediator_grid
from diffaccel.kernels.mediator_reference import mediator_attention_reference, pooling_matrix

CASES = [  # (grid or token count, text_tokens, num_mediators)
    (105, 0, 7),
    ((3, 5, 7), 4, 12),
    ((9, 10), 0, 20),
    ((1, 9, 10), 6, 9),
    ((4, 4, 4), 3, 8),
]


def _inputs(layout, text, heads=3, dim=16, dtype=torch.float32, seed=0):
    tokens = layout if isinstance(layout, int) else math.prod(layout)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, text + tokens, dim, generator=gen).to(dtype) for _ in range(3)]


def _grid(layout):
    return None if isinstance(layout, int) else layout


@pytest.mark.parametrize("layout,text,m", CASES)
@pytest.mark.parametrize("constants", [{}, dict(scale=0.2, query_scale_factor=1.0, shortcut=0.0)])
def test_fused_matches_reference_fp32(layout, text, m, constants):
    q, k, v = _inputs(layout, text)
    out = mediator_attention(q, k, v, m, _grid(layout), text_tokens=text, **constants)
    ref = mediator_attention_reference(q.double(), k.double(), v.double(), m, _grid(layout), text_tokens=text,
                                       **constants)
    assert out.shape == q.shape
    assert (out.double() - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_pytorch_error(dtype):
    layout, text, m = CASES[1]
    q, k, v = _inputs(layout, text, dtype=dtype)
    exact = mediator_attention_reference(q.double(), k.double(), v.double(), m, layout, text_tokens=text)
    torch_error = (mediator_attention_reference(q, k, v, m, layout, text_tokens=text).double() - exact).abs().max()
    out = mediator_attention(q, k, v, m, layout, text_tokens=text)
    assert out.dtype == dtype
    assert (out.double() - exact).abs().max() <= 2 * torch_error + 1e-6


def test_mediator_grid_keeps_aspect_and_count():
    assert mediator_grid((13, 30, 45), 13 * 30 * 45 // 27) == (4, 10, 15)
    assert mediator_grid((1, 64, 64), 256) == (1, 16, 16)
    assert mediator_grid((64, 64), 64) == (1, 8, 8)
    rows = pooling_matrix(13 * 30 * 45, 650, (13, 30, 45), torch.float64, "cpu")
    assert rows.shape[0] == 4 * 10 * 15 and torch.allclose(rows.sum(1), torch.ones(600, dtype=torch.float64))


def test_without_shortcut_output_is_a_convex_combination_of_values():
    """Both steps are softmax averages, so each output lies in the per-channel range of V."""
    q, k, v = _inputs((9, 10), 5)
    out = mediator_attention(q, k, v, 12, (9, 10), text_tokens=5, shortcut=0.0)
    assert (out <= v.amax(2, keepdim=True) + 1e-5).all() and (out >= v.amin(2, keepdim=True) - 1e-5).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_mediators=105), r"num_mediators must be an int in \[1, 105\)"),
    (dict(num_mediators=0), "num_mediators must be"),
    (dict(grid=(3, 5, 6)), "mismatched layout"),
    (dict(text_tokens=105), "text_tokens must be"),
    (dict(grid=(3, 0, 7)), "positive ints"),
])
def test_bad_input_raises_clear_error(kwargs, message):
    q, k, v = _inputs((3, 5, 7), 0)
    args = dict(num_mediators=8, grid=(3, 5, 7)) | kwargs
    with pytest.raises(ValueError, match=message):
        mediator_attention(q, k, v, **args)

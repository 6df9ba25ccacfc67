"""Public sliding-tile attention: checks the layout, then dispatches to one of four
backends, each declaring when it can run (capabilities as data, xformers style).

* ``"triton"``: fused Triton kernel (CUDA; CPU only under ``TRITON_INTERPRET=1``).
* ``"flex"``: FlexAttention with a block mask (compiled on CUDA, eager on CPU).
* ``"boxes"`` (alias ``"cpu"``): exact SDPA per group of query tiles; the CPU path.
* ``"dense"``: SDPA with the full mask (the reference; O(seq^2) memory).

Automatic choice: when every window covers its whole axis the attention *is* dense, and
plain SDPA runs (no mask); otherwise Triton on CUDA when it can run the inputs, else
the box path (CPU, or CUDA fallback e.g. for head_dim > 256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sliding_tile_cpu import sliding_tile_attention_boxes
from .sliding_tile_flex import flex_unavailable_reason, sliding_tile_attention_flex
from .sliding_tile_reference import sliding_tile_mask
from .sliding_tile_triton import sliding_tile_attention_triton, triton_unavailable_reason
from .tile_layout import TileSpec, make_spec

BACKENDS = ("triton", "flex", "boxes", "dense")


def _dense_masked(q, k, v, spec: TileSpec, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_tile_mask(spec, q.shape[1], q.device)[None],
                                          scale=scale)


def backend_unavailable_reason(backend: str, q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when ``backend`` can run these tensors, else the reason (shown in errors)."""
    if backend == "triton":
        return triton_unavailable_reason(q.device, q.shape[-1], v.shape[-1])
    if backend == "flex":
        reason = flex_unavailable_reason()
        if reason is None and q.shape[-1] != v.shape[-1]:
            reason = "flex path needs v's head_dim equal to q's"
        return reason
    return None


def choose_backend(q: torch.Tensor, v: torch.Tensor, spec: TileSpec) -> str:
    if spec.is_dense():
        return "sdpa"
    if q.device.type == "cuda" and backend_unavailable_reason("triton", q, v) is None:
        return "triton"
    return "boxes"


def sliding_tile_attention(q, k, v, grid, tile, window, text_tokens: int = 0, *, scale: float | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """Sliding-tile attention over a (T, H, W) token grid, with optional joint text tokens.

    Args:
        q, k, v: (batch, heads, seq, head_dim) with seq = text_tokens + T*H*W; the text tokens
            come first, then the video tokens in row-major (t, h, w) order (CogVideoX order).
        grid: (T, H, W) token grid; (H, W) or T=1 for images.
        tile: tile size in tokens per axis, e.g. (6, 8, 8). Grids that are not a multiple of
            the tile get shorter edge tiles (exact, no wrong results).
        window: odd window size in *tiles* per axis, e.g. (3, 3, 3), or one such triple per head.
            An axis whose window >= its tile count is unrestricted; if all are, dense SDPA runs.
        text_tokens: leading tokens that attend to all and are attended by all.
        scale: softmax scale, default head_dim ** -0.5.
        backend: force "triton", "flex", "boxes" (= "cpu") or "dense"; default picks the fastest
            that can run (see module docstring). A forced backend that cannot run raises.

    Returns:
        (batch, heads, seq, head_dim_v) in the input order.

    Example::

        >>> q = k = v = torch.randn(1, 2, 4 * 16 * 16, 32)
        >>> out = sliding_tile_attention(q, k, v, grid=(4, 16, 16), tile=(2, 8, 8), window=(1, 1, 1))
        >>> out.shape
        torch.Size([1, 2, 1024, 32])
    """
    spec = make_spec(q, k, v, grid, tile, window, text_tokens)
    if backend == "cpu":
        backend = "boxes"
    if backend is None:
        backend = choose_backend(q, v, spec)
    elif backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} (or 'cpu') or leave it None")
    else:
        reason = backend_unavailable_reason(backend, q, v)
        if reason:
            raise ValueError(f"backend {backend!r} cannot run these inputs: {reason}. "
                             f"Pass backend=None to pick one that can (the box path always can).")
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "triton":
        return sliding_tile_attention_triton(q, k, v, spec, scale)
    if backend == "flex":
        return sliding_tile_attention_flex(q, k, v, spec, scale)
    if backend == "boxes":
        return sliding_tile_attention_boxes(q, k, v, spec, scale)
    return _dense_masked(q, k, v, spec, scale)


def sliding_tile_density(grid, tile, window, text_tokens: int = 0, heads: int = 1) -> float:
    """Fraction of (query, key) pairs computed (1.0 = dense), averaged over heads."""
    probe_seq = text_tokens + math.prod(grid)
    probe = torch.empty(1, heads, probe_seq, 1, device="meta")
    return make_spec(probe, probe, probe, grid, tile, window, text_tokens).density(heads)

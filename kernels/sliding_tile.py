"""Public sliding-tile attention: checks the layout, then dispatches to a backend.

Backends declare what they need as data (:class:`Backend`, xformers style): a ``declines``
function that says why it cannot run some inputs (None when it can), and the device types on
which the automatic choice considers it. The automatic choice takes the first backend of
:data:`BACKENDS` that is considered on the inputs' device and does not decline; a forced
backend that declines raises with its reason.

* ``"sdpa"``: plain SDPA without a mask; runs only when every window covers its whole axis
  (then the attention *is* dense).
* ``"triton"``: fused Triton kernel (CUDA; CPU only under ``TRITON_INTERPRET=1``).
* ``"flex"``: FlexAttention with a block mask (compiled on CUDA, eager on CPU).
* ``"boxes"`` (alias ``"cpu"``): exact SDPA per group of query tiles; runs everywhere.
* ``"dense"``: SDPA with the full mask (the reference; O(seq^2) memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .sliding_tile_cpu import sliding_tile_attention_boxes
from .sliding_tile_flex import flex_unavailable_reason, sliding_tile_attention_flex
from .sliding_tile_reference import sliding_tile_mask
from .sliding_tile_triton import sliding_tile_attention_triton, triton_unavailable_reason
from .tile_layout import TileSpec, make_spec


@dataclass(frozen=True)
class Backend:
    """One way to compute sliding-tile attention, with the conditions it needs."""

    name: str
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TileSpec, float | None], torch.Tensor]
    declines: Callable[[torch.Tensor, torch.Tensor, TileSpec], str | None]  # why it cannot run (q, v, spec)
    automatic_on: frozenset[str]  # device types on which the automatic choice considers it


def _sdpa(q, k, v, spec: TileSpec, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _dense_masked(q, k, v, spec: TileSpec, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_tile_mask(spec, q.shape[1], q.device)[None],
                                          scale=scale)


def _sparse_windows(q, v, spec: TileSpec) -> str | None:
    return None if spec.is_dense() else "a window is smaller than its axis, so the attention is not dense"


def _flex_declines(q, v, spec: TileSpec) -> str | None:
    reason = flex_unavailable_reason()
    if reason is None and q.shape[-1] != v.shape[-1]:
        reason = "flex path needs v's head_dim equal to q's"
    return reason


def _never(q, v, spec: TileSpec) -> str | None:
    return None


_ANY_DEVICE = frozenset({"cpu", "cuda", "xpu", "mps"})
_BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("sdpa", _sdpa, _sparse_windows, _ANY_DEVICE),
    Backend("triton", sliding_tile_attention_triton,
            lambda q, v, spec: triton_unavailable_reason(q.device, q.shape[-1], v.shape[-1]), frozenset({"cuda"})),
    # forced only: 0.06x of SDPA on an H100 at the CogVideoX-2b shape (per-element mask on mostly
    # partial blocks, see sliding_tile_flex); the Triton paths cover CUDA
    Backend("flex", sliding_tile_attention_flex, _flex_declines, frozenset()),
    Backend("boxes", sliding_tile_attention_boxes, _never, _ANY_DEVICE),
    Backend("dense", _dense_masked, _never, frozenset()),
)}
BACKENDS = tuple(_BACKENDS)  # in the order the automatic choice tries them
ALIASES = {"cpu": "boxes"}


def backend_unavailable_reason(backend: str, q: torch.Tensor, v: torch.Tensor, spec: TileSpec) -> str | None:
    """None when ``backend`` can run these tensors, else the reason (shown in errors)."""
    return _BACKENDS[ALIASES.get(backend, backend)].declines(q, v, spec)


def choose_backend(q: torch.Tensor, v: torch.Tensor, spec: TileSpec) -> str:
    """The first backend of :data:`BACKENDS` considered on ``q``'s device that accepts the inputs."""
    reasons = []
    for backend in _BACKENDS.values():
        if q.device.type not in backend.automatic_on:
            reasons.append(f"{backend.name}: only forced on {q.device.type}")
            continue
        reason = backend.declines(q, v, spec)
        if reason is None:
            return backend.name
        reasons.append(f"{backend.name}: {reason}")
    raise ValueError(f"no sliding-tile backend runs these inputs ({'; '.join(reasons)}); force one with backend=...")


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
        backend: force one of :data:`BACKENDS` (or "cpu" for "boxes"); default picks the
            fastest that can run (see module docstring). A forced backend that cannot run raises.

    Returns:
        (batch, heads, seq, head_dim_v) in the input order.

    Example::

        >>> q = k = v = torch.randn(1, 2, 4 * 16 * 16, 32)
        >>> out = sliding_tile_attention(q, k, v, grid=(4, 16, 16), tile=(2, 8, 8), window=(1, 1, 1))
        >>> out.shape
        torch.Size([1, 2, 1024, 32])
    """
    spec = make_spec(q, k, v, grid, tile, window, text_tokens)
    if backend is None:
        backend = choose_backend(q, v, spec)
    backend = ALIASES.get(backend, backend)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} (or 'cpu') or leave it None")
    reason = _BACKENDS[backend].declines(q, v, spec)
    if reason:
        raise ValueError(f"backend {backend!r} cannot run these inputs: {reason}. "
                         f"Pass backend=None to pick one that can (the box path always can).")
    return _BACKENDS[backend].run(q, k, v, spec, scale)


def sliding_tile_density(grid, tile, window, text_tokens: int = 0, heads: int = 1) -> float:
    """Fraction of (query, key) pairs computed (1.0 = dense), averaged over heads."""
    probe_seq = text_tokens + math.prod(grid)
    probe = torch.empty(1, heads, probe_seq, 1, device="meta")
    return make_spec(probe, probe, probe, grid, tile, window, text_tokens).density(heads)

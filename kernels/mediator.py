"""Mediator (agent) attention, training-free: m pooled queries mediate between all
queries and all keys, so attention costs O(N*m) instead of O(N^2)::

    M = pool(Q)                          # m mediator tokens (m << N)
    Z = softmax(M K^T * s)  V            # mediators gather from all keys  (m x N)
    O = softmax(Q M^T * s') Z + c * V    # queries read from the mediators (N x m)

Constants from AgentSD: s = d^-1/2, s' = 0.3 * d^-1/2, shortcut c = 0.075. Both steps
are ordinary attentions, so the fast path is two fused SDPA calls (FlashAttention on
CUDA, the flash CPU kernel on CPU); no (N x N) or (N x m) matrix is materialised.
Text tokens (joint attention) are queries that attend densely to every key; mediators
pool video queries only, and the keys mediators read include the text.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUERY_SCALE_FACTOR = 0.3  # s' = 0.3 * s
SHORTCUT = 0.075


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def mediator_grid(grid, num_mediators: int) -> tuple[int, int, int]:
    """Pooled (t, h, w) grid with about ``num_mediators`` cells and the grid's aspect ratio.
    Axes shrink by the same factor; the cell count is the closest such grid can get."""
    grid = tuple(grid) if len(grid) == 3 else (1, *grid)
    tokens = math.prod(grid)
    active = [s for s in grid if s > 1]
    factor = (num_mediators / tokens) ** (1 / max(1, len(active)))
    return tuple(min(s, max(1, round(s * factor))) for s in grid)  # type: ignore[return-value]


def pool_queries(q_video: torch.Tensor, num_mediators: int, grid=None) -> torch.Tensor:
    """(B, h, N, D) video queries -> (B, h, m, D) mediators by average pooling: over the
    (T, H, W) grid when given (spatially local mediators), else along the sequence."""
    batch, heads, tokens, dim = q_video.shape
    if grid is None:
        pooled = F.adaptive_avg_pool1d(q_video.reshape(batch * heads, tokens, dim).transpose(1, 2), num_mediators)
        return pooled.transpose(1, 2).reshape(batch, heads, num_mediators, dim)
    T, H, W = tuple(grid) if len(grid) == 3 else (1, *grid)
    cells = mediator_grid((T, H, W), num_mediators)
    x = q_video.reshape(batch * heads, T, H, W, dim).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool3d(x, cells)  # (B*h, D, mt, mh, mw)
    return pooled.flatten(2).transpose(1, 2).reshape(batch, heads, -1, dim)


def check_mediator_args(q, k, v, num_mediators, grid, text_tokens) -> int:
    """Validate; return the number of video tokens."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"mediator attention is self-attention: q and k must have the same shape and v the same "
                         f"(batch, heads, seq); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(text_tokens, int) or not 0 <= text_tokens < q.shape[2]:
        raise ValueError(f"text_tokens must be an int in [0, seq) = [0, {q.shape[2]}), got {text_tokens!r}")
    video = q.shape[2] - text_tokens
    if grid is not None:
        cells = tuple(grid) if len(grid) == 3 else (1, *grid)
        if len(cells) != 3 or any(not isinstance(s, int) or s < 1 for s in cells):
            raise ValueError(f"grid must be (T, H, W) or (H, W) positive ints, got {grid!r}")
        if math.prod(cells) != video:
            raise ValueError(f"mismatched layout: grid {tuple(grid)} has {math.prod(cells)} tokens but seq - text_tokens"
                             f" = {video}; pass the grid of the video tokens that follow the text tokens")
    if not isinstance(num_mediators, int) or not 1 <= num_mediators < video:
        raise ValueError(f"num_mediators must be an int in [1, {video}) (fewer than the video tokens), got "
                         f"{num_mediators!r}; with as many mediators as tokens use dense attention instead")
    return video


def mediator_attention(q, k, v, num_mediators: int, grid=None, *, text_tokens: int = 0, scale: float | None = None,
                       query_scale_factor: float = QUERY_SCALE_FACTOR, shortcut: float = SHORTCUT,
                       attend=None) -> torch.Tensor:
    """Mediator attention. q, k, v: (batch, heads, seq, head_dim), seq = text_tokens + N.

    Args:
        num_mediators: m, the number of mediator tokens (with ``grid``, rounded to a pooled
            grid, see :func:`mediator_grid`).
        grid: (T, H, W) or (H, W) of the video tokens (row-major) for spatial pooling;
            None pools along the sequence.
        text_tokens: leading text tokens, computed with dense attention.
        scale: the attention's softmax scale s (mediators -> keys, and the dense text rows),
            default d^-1/2. query_scale_factor: s' = factor * s for queries -> mediators,
            default 0.3. shortcut: c in ``+ c * V``, default 0.075 (0 disables).
        attend: ``attend(q, k, v, scale)`` computing unmasked attention on (batch, heads, seq,
            dim) tensors, for the three dense attentions inside (e.g. the caller's attention
            backend); default torch SDPA.

    Example::

        >>> q = k = v = torch.randn(1, 2, 32 * 32, 64)
        >>> mediator_attention(q, k, v, num_mediators=64, grid=(32, 32)).shape
        torch.Size([1, 2, 1024, 64])
    """
    check_mediator_args(q, k, v, num_mediators, grid, text_tokens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_video, v_video = q[:, :, text_tokens:], v[:, :, text_tokens:]
    mediators = pool_queries(q_video, num_mediators, grid)
    attend = attend or _sdpa
    gathered = attend(mediators, k, v, scale)
    out = attend(q_video, mediators, gathered, scale * query_scale_factor)
    if shortcut:
        out = out + shortcut * v_video
    if not text_tokens:
        return out
    text_out = attend(q[:, :, :text_tokens], k, v, scale)
    return torch.cat([text_out, out], dim=2)

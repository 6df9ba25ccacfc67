"""Dense masked reference for sliding-tile attention: the boolean mask is built token by
token straight from the semantics in :mod:`tile_layout` and handed to SDPA. O(seq^2)
memory; for tests and small checks only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tile_layout import TileSpec, make_spec


def _axis_allowed(size: int, tile: int, window: int, device) -> torch.Tensor:
    """(size, size) bool: may a query at position i attend a key at position j on this axis."""
    n = -(-size // tile)
    pos_tile = torch.arange(size, device=device) // tile
    if window >= n:
        return torch.ones(size, size, dtype=torch.bool, device=device)
    radius = window // 2
    centre = pos_tile.clamp(radius, n - 1 - radius)
    return (centre[:, None] - pos_tile[None, :]).abs() <= radius


def sliding_tile_mask(spec: TileSpec, heads: int, device="cpu") -> torch.Tensor:
    """(heads or 1, seq, seq) bool mask in the input (text first, row-major video) order."""
    T, H, W = spec.grid
    text, video = spec.text_tokens, spec.video_tokens
    masks = []
    for window in spec.windows:
        mt, mh, mw = (_axis_allowed(s, t, w, device) for s, t, w in zip(spec.grid, spec.tile, window))
        video_mask = (mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None]
                      & mw[None, None, :, None, None, :]).reshape(video, video)
        full = torch.ones(text + video, text + video, dtype=torch.bool, device=device)
        full[text:, text:] = video_mask
        masks.append(full)
    return torch.stack(masks)


def sliding_tile_attention_reference(q, k, v, grid, tile, window, text_tokens: int = 0, scale=None):
    """Dense SDPA with the sliding-tile mask, computed in the dtype of ``q``."""
    spec = make_spec(q, k, v, grid, tile, window, text_tokens)
    mask = sliding_tile_mask(spec, q.shape[1], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale)

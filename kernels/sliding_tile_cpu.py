"""Sliding-tile attention as a handful of exact dense SDPA calls ("box" path).

Why this is fast on CPU. Because the window centre is clamped, the key set of a query
tile is a box of whole tiles in the (T, H, W) grid, and every query tile with the same
clamped centre sees the *same* box. So we group query tiles by clamped centre: each group
is itself a box of queries (the edge tiles of an axis merge with their inner neighbour),
and one SDPA call on (group queries) x (text keys + key box) computes it exactly, with no
mask and no padding: ragged edge tiles are simply shorter boxes. Only allowed pairs are
computed, query blocks are whole tiles or larger, and each key box is copied once per
group (not once per tile). Heads with different windows are run as separate head groups.
Also correct (and reasonable) on GPU, where it serves as a fallback.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .tile_layout import TileSpec, axis_groups


def _head_groups(spec: TileSpec, heads: int):
    """[(window, head index list or None for all heads)] with equal windows merged."""
    if len(spec.windows) == 1:
        return [(spec.windows[0], None)]
    by_window: dict = {}
    for head, window in enumerate(spec.windows):
        by_window.setdefault(spec.effective_window(window), []).append(head)
    return list(by_window.items())


def sliding_tile_attention_boxes(q, k, v, spec: TileSpec, scale=None) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    text = spec.text_tokens
    T, H, W = spec.grid
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    if text:
        # text queries see every key
        out[:, :, :text] = F.scaled_dot_product_attention(q[:, :, :text], k, v, scale=scale)
    for window, head_index in _head_groups(spec, heads):
        if head_index is None:
            qh, kh, vh = q, k, v
        else:
            idx = torch.tensor(head_index, device=q.device)
            qh, kh, vh = q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx)
        n_heads = qh.shape[1]
        q_grid = qh[:, :, text:].view(batch, n_heads, T, H, W, dim)
        k_grid = kh[:, :, text:].view(batch, n_heads, T, H, W, dim)
        v_grid = vh[:, :, text:].view(batch, n_heads, T, H, W, vh.shape[-1])
        o_grid = torch.empty_like(v_grid, dtype=q.dtype) if head_index is not None else \
            out[:, :, text:].view(batch, heads, T, H, W, v.shape[-1])
        per_axis = [axis_groups(s, t, n, w) for s, t, n, w in zip(spec.grid, spec.tile, spec.num_tiles, window)]
        groups = list(itertools.product(*per_axis))
        # One key/value buffer per head group, text keys written once at the front; each
        # group copies its key box in behind them (one copy, no torch.cat per group).
        longest = max((k1 - k0) * (kh1 - kh0) * (kw1 - kw0) for (_, _, k0, k1), (_, _, kh0, kh1), (_, _, kw0, kw1) in groups)
        k_buf = torch.empty(batch, n_heads, text + longest, dim, dtype=k.dtype, device=k.device)
        v_buf = torch.empty(batch, n_heads, text + longest, v.shape[-1], dtype=v.dtype, device=v.device)
        k_buf[:, :, :text] = kh[:, :, :text]
        v_buf[:, :, :text] = vh[:, :, :text]
        for (qt0, qt1, kt0, kt1), (qh0, qh1, kh0, kh1), (qw0, qw1, kw0, kw1) in groups:
            box = (kt1 - kt0, kh1 - kh0, kw1 - kw0)
            keys = text + box[0] * box[1] * box[2]
            k_buf[:, :, text:keys].view(batch, n_heads, *box, dim).copy_(k_grid[:, :, kt0:kt1, kh0:kh1, kw0:kw1])
            v_buf[:, :, text:keys].view(batch, n_heads, *box, -1).copy_(v_grid[:, :, kt0:kt1, kh0:kh1, kw0:kw1])
            q_box = q_grid[:, :, qt0:qt1, qh0:qh1, qw0:qw1].reshape(batch, n_heads, -1, dim)
            o_box = F.scaled_dot_product_attention(q_box, k_buf[:, :, :keys], v_buf[:, :, :keys], scale=scale)
            o_grid[:, :, qt0:qt1, qh0:qh1, qw0:qw1] = o_box.view(batch, n_heads, qt1 - qt0, qh1 - qh0, qw1 - qw0, -1)
        if head_index is not None:
            out[:, idx, text:] = o_grid.reshape(batch, n_heads, T * H * W, -1)
    return out

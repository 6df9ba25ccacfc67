"""Sliding-tile attention as a handful of exact dense SDPA calls ("box" path).

Why this is fast on CPU. Because the window centre is clamped, the key set of a query
tile is a box of whole tiles in the (T, H, W) grid, and every query tile with the same
clamped centre sees the *same* box. So we group query tiles by clamped centre: each group
is itself a box of queries (the edge tiles of an axis merge with their inner neighbour),
and one SDPA call on (group queries) x (text keys + key box) computes it exactly, with no
mask and no padding: ragged edge tiles are simply shorter boxes. Only allowed pairs are
computed and query blocks are whole tiles or larger.

Few, large memory operations. Queries are permuted once into group-major order (so each
group's queries are a contiguous slab, a view), keys and values are stacked once so each
group copies its K/V box with a single copy into a reused buffer behind the text keys, and
outputs are concatenated and permuted back once. Per group that is one copy and one SDPA;
The copies run single-threaded on CPU: they are memory-bound, and on a shared machine a
two-thread copy waits for a busy core (measured: 4 MB copy 0.3 ms on 1 thread, 20 ms on 2
threads next to another job) while SDPA, compute-bound, keeps all threads.
Heads with different windows run as separate head groups. Also exact on GPU (fallback).
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
import torch.nn.functional as F

from .tile_layout import Triple, TileSpec, axis_groups


def _head_groups(spec: TileSpec, heads: int):
    """[(window, head index list or None for all heads)] with equal windows merged."""
    if len(spec.windows) == 1:
        return [(spec.windows[0], None)]
    by_window: dict = {}
    for head, window in enumerate(spec.windows):
        by_window.setdefault(spec.effective_window(window), []).append(head)
    return list(by_window.items())


@contextlib.contextmanager
def _serial_on_cpu(device: torch.device):
    """Run memory-bound ops on one thread (see module docstring); no-op on GPU."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=64)
def _group_plan(spec: TileSpec, window: Triple):
    """Query groups of one window: their key boxes, query counts, and the permutation that
    puts the queries of each group next to each other (and its inverse)."""
    per_axis = [axis_groups(s, t, n, w) for s, t, n, w in zip(spec.grid, spec.tile, spec.num_tiles, window)]
    positions = torch.arange(spec.video_tokens).view(spec.grid)
    order, boxes, counts = [], [], []
    for (qt0, qt1, kt0, kt1), (qh0, qh1, kh0, kh1), (qw0, qw1, kw0, kw1) in itertools.product(*per_axis):
        order.append(positions[qt0:qt1, qh0:qh1, qw0:qw1].reshape(-1))
        boxes.append((slice(kt0, kt1), slice(kh0, kh1), slice(kw0, kw1)))
        counts.append((qt1 - qt0) * (qh1 - qh0) * (qw1 - qw0))
    group_order = torch.cat(order)
    return group_order, torch.argsort(group_order), boxes, counts


def _attend_head_group(q, k, v, spec: TileSpec, window: Triple, scale) -> torch.Tensor:
    """Video-query outputs (B, h, T*H*W, Dv) for heads that share one window."""
    batch, heads, _, dim = q.shape
    text = spec.text_tokens
    group_order, inverse, boxes, counts = _group_plan(spec, window)
    longest = max((t.stop - t.start) * (h.stop - h.start) * (w.stop - w.start) for t, h, w in boxes)
    with _serial_on_cpu(q.device):
        q_groups = q[:, :, text:].index_select(2, group_order.to(q.device)).split(counts, dim=2)
        # reused K/V buffers: text keys once at the front, each group's key box behind them
        k_buf = torch.empty(batch, heads, text + longest, dim, dtype=k.dtype, device=k.device)
        v_buf = torch.empty(batch, heads, text + longest, v.shape[-1], dtype=v.dtype, device=v.device)
        k_buf[:, :, :text] = k[:, :, :text]
        v_buf[:, :, :text] = v[:, :, :text]
    k_grid = k[:, :, text:].view(batch, heads, *spec.grid, dim)
    v_grid = v[:, :, text:].view(batch, heads, *spec.grid, v.shape[-1])
    outputs = []
    for q_group, (st, sh, sw) in zip(q_groups, boxes):
        box = (st.stop - st.start, sh.stop - sh.start, sw.stop - sw.start)
        keys = text + box[0] * box[1] * box[2]
        with _serial_on_cpu(q.device):
            k_buf[:, :, text:keys].view(batch, heads, *box, dim).copy_(k_grid[:, :, st, sh, sw])
            v_buf[:, :, text:keys].view(batch, heads, *box, -1).copy_(v_grid[:, :, st, sh, sw])
        outputs.append(F.scaled_dot_product_attention(q_group, k_buf[:, :, :keys], v_buf[:, :, :keys], scale=scale))
    with _serial_on_cpu(q.device):
        return torch.cat(outputs, dim=2).index_select(2, inverse.to(q.device))


def sliding_tile_attention_boxes(q, k, v, spec: TileSpec, scale=None) -> torch.Tensor:
    text = spec.text_tokens
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    if text:  # text queries see every key
        out[:, :, :text] = F.scaled_dot_product_attention(q[:, :, :text], k, v, scale=scale)
    for window, head_index in _head_groups(spec, q.shape[1]):
        if head_index is None:
            video_out = _attend_head_group(q, k, v, spec, spec.effective_window(window), scale)
            with _serial_on_cpu(q.device):
                out[:, :, text:] = video_out
        else:
            idx = torch.tensor(head_index, device=q.device)
            video_out = _attend_head_group(q.index_select(1, idx), k.index_select(1, idx), v.index_select(1, idx),
                                           spec, window, scale)
            out[:, idx, text:] = video_out
    return out

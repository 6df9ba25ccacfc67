"""Sliding-tile attention as a handful of exact dense SDPA calls ("box" path).

Why this is fast on CPU. Because the window centre is clamped, the key set of a query
tile is a box of whole tiles in the (T, H, W) grid, and every query tile with the same
clamped centre sees the *same* box. So we group query tiles by clamped centre: each group
is itself a box of queries (the edge tiles of an axis merge with their inner neighbour),
and one SDPA call on (group queries) x (text keys + key box) computes it exactly, with no
mask and no padding: ragged edge tiles are simply shorter boxes. Only allowed pairs are
computed and query blocks are whole tiles or larger.

Memory. Queries are permuted once into group-major order, so each group's queries are a
contiguous slab (a view); each group copies its key box once into a reused buffer behind
the text keys; outputs land in a group-major tensor that is permuted back once.

Threads. On CPU the groups are spread over a small pool of worker threads, each running
its SDPA calls single-threaded, instead of running one group after another with every op
split over all cores. Groups are independent, so this needs no synchronisation inside a
group, and a worker slowed by another process just takes fewer groups. Measured on the
2-core shared dev machine (36 groups of 64 queries x 576 keys): 1167 ms one after another
with 2 intra-op threads, 150 ms with 2 single-threaded workers.

Heads with different windows run as separate head groups. Also exact on GPU (fallback),
where the groups run in order on the current stream.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .tile_layout import Triple, TileSpec, axis_groups

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_worker_state = threading.local()


def _cpu_pool() -> ThreadPoolExecutor:
    """Shared worker pool, sized to torch's intra-op thread count at first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()),
                                       thread_name_prefix="diffaccel-sliding-tile",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _pool


@contextlib.contextmanager
def _serial_on_cpu(device: torch.device):
    """Memory-bound ops in the calling thread run on one thread: a multi-thread copy waits
    for a busy core on a shared machine (4 MB copy: 0.3 ms on 1 thread, 20 ms on 2)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _head_groups(spec: TileSpec, heads: int):
    """[(window, head index list or None for all heads)] with equal windows merged."""
    if len(spec.windows) == 1:
        return [(spec.windows[0], None)]
    by_window: dict = {}
    for head, window in enumerate(spec.windows):
        by_window.setdefault(spec.effective_window(window), []).append(head)
    return list(by_window.items())


@functools.lru_cache(maxsize=64)
def _group_plan(spec: TileSpec, window: Triple):
    """Query groups of one window: (query start, query stop, key box) in group-major order,
    the permutation that puts each group's queries next to each other, and its inverse."""
    per_axis = [axis_groups(s, t, n, w) for s, t, n, w in zip(spec.grid, spec.tile, spec.num_tiles, window)]
    positions = torch.arange(spec.video_tokens).view(spec.grid)
    order, groups, start = [], [], 0
    for (qt0, qt1, kt0, kt1), (qh0, qh1, kh0, kh1), (qw0, qw1, kw0, kw1) in itertools.product(*per_axis):
        members = positions[qt0:qt1, qh0:qh1, qw0:qw1].reshape(-1)
        order.append(members)
        groups.append((start, start + members.numel(), (slice(kt0, kt1), slice(kh0, kh1), slice(kw0, kw1))))
        start += members.numel()
    group_order = torch.cat(order)
    return group_order, torch.argsort(group_order), groups


def _buffers(k_video, v_video, rows: int):
    """K/V buffers of at least ``rows`` rows: per worker thread and reused on CPU (no fresh
    allocation and page faults per group), fresh on GPU (the caching allocator reuses)."""
    batch, heads = k_video.shape[:2]
    make = lambda x: torch.empty(batch, heads, rows, x.shape[-1], dtype=x.dtype, device=x.device)  # noqa: E731
    if k_video.device.type != "cpu":
        return make(k_video), make(v_video)
    key = (batch, heads, k_video.shape[-1], v_video.shape[-1], k_video.dtype, v_video.dtype)
    cached = getattr(_worker_state, "buffers", None)
    if cached is None or cached[0] != key or cached[1].shape[2] < rows:
        cached = _worker_state.buffers = (key, make(k_video), make(v_video))
    return cached[1], cached[2]


def _attend_group(q_sorted, k_text, v_text, k_video, v_video, out_sorted, group, scale) -> None:
    """One query group: copy its key box behind the text keys, SDPA, write its output slab."""
    start, stop, (st, sh, sw) = group
    batch, heads = q_sorted.shape[:2]
    text = k_text.shape[2]
    box = (st.stop - st.start, sh.stop - sh.start, sw.stop - sw.start)
    keys = text + box[0] * box[1] * box[2]
    k_buf, v_buf = _buffers(k_video, v_video, keys)
    k_buf[:, :, :text] = k_text
    v_buf[:, :, :text] = v_text
    k_buf[:, :, text:keys].view(batch, heads, *box, -1).copy_(k_video[:, :, st, sh, sw])
    v_buf[:, :, text:keys].view(batch, heads, *box, -1).copy_(v_video[:, :, st, sh, sw])
    out_sorted[:, :, start:stop] = F.scaled_dot_product_attention(
        q_sorted[:, :, start:stop], k_buf[:, :, :keys], v_buf[:, :, :keys], scale=scale)


def _attend_head_group(q, k, v, spec: TileSpec, window: Triple, scale) -> torch.Tensor:
    """Video-query outputs (B, h, T*H*W, Dv) for heads that share one window."""
    batch, heads, _, _ = q.shape
    text = spec.text_tokens
    group_order, inverse, groups = _group_plan(spec, window)
    with _serial_on_cpu(q.device):
        q_sorted = q[:, :, text:].index_select(2, group_order.to(q.device))
    out_sorted = torch.empty(batch, heads, spec.video_tokens, v.shape[-1], dtype=q.dtype, device=q.device)
    args = (q_sorted, k[:, :, :text], v[:, :, :text], k[:, :, text:].view(batch, heads, *spec.grid, -1),
            v[:, :, text:].view(batch, heads, *spec.grid, -1), out_sorted)
    if q.device.type == "cpu" and len(groups) > 1 and torch.get_num_threads() > 1:
        for future in [_cpu_pool().submit(_attend_group, *args, group, scale) for group in groups]:
            future.result()  # re-raises a worker's exception here
    else:
        for group in groups:
            _attend_group(*args, group, scale)
    with _serial_on_cpu(q.device):
        return out_sorted.index_select(2, inverse.to(q.device))


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
            out[:, idx, text:] = _attend_head_group(q.index_select(1, idx), k.index_select(1, idx),
                                                    v.index_select(1, idx), spec, window, scale)
    return out

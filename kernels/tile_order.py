"""Sliding-tile attention on tokens that are *already* in tile order.

A model can put its video tokens into tile order once (after the patch embedding) and back
once (before the output projection), instead of every attention layer reordering q, k, v and
its output (the reorder cost as much as the kernel on an H100). This module defines that order
and computes sliding-tile attention directly on it.

Tile order (ragged, no padding): tiles in row-major (t, h, w) tile order, the tokens of each
tile in row-major order inside the tile. Edge tiles of a grid that is not a multiple of the
tile are simply shorter, so the order is a permutation of the T*H*W tokens and every
token-wise layer (norms, MLPs, modulation, cross-attention) and dense attention are unchanged
by it. The semantics are those of :mod:`tile_layout`; only the token order differs.

Text tokens may sit before (``text_position="first"``) or after (``"last"``) the video tokens;
the Triton path reads them in place, so nothing is concatenated per call.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .tile_layout import TileSpec, make_spec


@functools.lru_cache(maxsize=64)
def _order_cpu(grid: tuple, tile: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, tile_start) on CPU: order[i] = row-major index of the i-th token in tile order;
    tile_start (n_tiles + 1,) = where each tile begins in tile order."""
    (T, H, W), (a, b, c) = grid, tile
    nt, nh, nw = -(-T // a), -(-H // b), -(-W // c)
    index = torch.arange(T * H * W).view(T, H, W)
    index = F.pad(index, (0, nw * c - W, 0, nh * b - H, 0, nt * a - T), value=-1)
    index = index.view(nt, a, nh, b, nw, c).permute(0, 2, 4, 1, 3, 5).reshape(nt * nh * nw, a * b * c)
    sizes = (index >= 0).sum(dim=1)
    order = index[index >= 0]
    tile_start = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return order, tile_start


def _grid3(grid, tile):
    q = torch.empty(1, 1, math.prod(grid), 1, device="meta")
    spec = make_spec(q, q, q, grid, tile, (1, 1, 1), 0)  # checks and completes 2D grids
    return tuple(min(t, s) for t, s in zip(spec.tile, spec.grid)), spec.grid


def tile_order(grid, tile, device="cpu") -> torch.Tensor:
    """(T*H*W,) long: ``x_tiled = x[..., order, :]`` puts row-major tokens into tile order."""
    tile, grid = _grid3(grid, tile)
    return _on_device(grid, tile, str(device))[0]


def tile_order_inverse(grid, tile, device="cpu") -> torch.Tensor:
    """(T*H*W,) long: ``x_row_major = x_tiled[..., inverse, :]``."""
    tile, grid = _grid3(grid, tile)
    return _on_device(grid, tile, str(device))[1]


@functools.lru_cache(maxsize=64)
def _on_device(grid, tile, device: str):
    order, tile_start = _order_cpu(grid, tile)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(device), inverse.to(device), tile_start.to(device=device, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def query_blocks(grid: tuple, tile: tuple, block_m: int, device: str) -> torch.Tensor:
    """(n_blocks, 2) int32 (tile, first row in tile order): the query blocks of the Triton path,
    none straddling two tiles (the last block of a short tile is partly empty)."""
    _, tile_start = _order_cpu(grid, tile)
    rows = []
    for index in range(tile_start.numel() - 1):
        start, stop = int(tile_start[index]), int(tile_start[index + 1])
        rows += [(index, row) for row in range(start, stop, block_m)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def tile_starts(grid: tuple, tile: tuple, device: str) -> torch.Tensor:
    return _on_device(grid, tile, device)[2]


def split_text(x: torch.Tensor, text: int, text_position: str):
    """(text part, video part) views of a (B, heads, seq, D) tensor."""
    video = x.shape[2] - text
    if text_position == "first":
        return x[:, :, :text], x[:, :, text:]
    return x[:, :, video:], x[:, :, :video]


def join_text(text_part: torch.Tensor, video_part: torch.Tensor, text_position: str) -> torch.Tensor:
    if text_part.shape[2] == 0:
        return video_part
    parts = [text_part, video_part] if text_position == "first" else [video_part, text_part]
    return torch.cat(parts, dim=2)


def _via_row_major(q, k, v, spec: TileSpec, text_position: str, scale, backend):
    """Any backend of :mod:`sliding_tile`: gather to row-major, text first, and back (exact; pays
    the reorder the tile-ordered Triton path avoids)."""
    from .sliding_tile import sliding_tile_attention

    text = spec.text_tokens
    order, inverse, _ = _on_device(spec.grid, _grid3(spec.grid, spec.tile)[0], str(q.device))

    def row_major_text_first(x):
        text_part, video_part = split_text(x, text, text_position)
        return torch.cat([text_part, video_part[:, :, inverse]], dim=2)

    out = sliding_tile_attention(row_major_text_first(q), row_major_text_first(k), row_major_text_first(v), spec.grid,
                                 spec.tile, list(spec.windows) if len(spec.windows) > 1 else spec.windows[0], text,
                                 scale=scale, backend=backend)
    return join_text(out[:, :, :text], out[:, :, text:][:, :, order], text_position)


def sliding_tile_attention_tile_ordered(q, k, v, grid, tile, window, text_tokens: int = 0,
                                        text_position: str = "first", *, scale: float | None = None,
                                        backend: str | None = None) -> torch.Tensor:
    """Sliding-tile attention whose video tokens are in tile order (:func:`tile_order`).

    Same arguments and result as :func:`sliding_tile.sliding_tile_attention`, except that the
    video tokens of q, k, v (and of the output) are in tile order, and the text tokens come
    ``text_position`` ("first" or "last"). ``backend=None`` takes the tile-ordered Triton
    kernel where it runs (no reorder at all), else gathers to row-major for the automatic
    choice of :func:`sliding_tile.sliding_tile_attention`; a forced backend other than
    "triton" takes that gather too.
    """
    from .sliding_tile_ordered_triton import sliding_tile_attention_ordered_triton, ordered_triton_unavailable_reason

    if text_position not in ("first", "last"):
        raise ValueError(f"text_position must be 'first' or 'last', got {text_position!r}")
    spec = make_spec(q, k, v, grid, tile, window, text_tokens)  # checks shapes and counts only
    if spec.is_dense():  # dense attention is the same in any token order
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend is None:
        backend = "triton" if ordered_triton_unavailable_reason(q.device, q.shape[-1], v.shape[-1]) is None else None
    if backend == "triton":
        reason = ordered_triton_unavailable_reason(q.device, q.shape[-1], v.shape[-1])
        if reason:
            raise ValueError(f"backend 'triton' cannot run these inputs: {reason}. "
                             f"Pass backend=None to pick one that can.")
        return sliding_tile_attention_ordered_triton(q, k, v, spec, text_position, scale)
    return _via_row_major(q, k, v, spec, text_position, scale, backend)

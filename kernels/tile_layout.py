"""Shared geometry of sliding-tile attention: argument checks, per-axis key ranges, and
the padded tile-major token order that the Triton and FlexAttention paths work in.

Semantics (the one definition every path implements). On each axis of the (T, H, W)
grid a token's tile index is ``position // tile`` and there are ``n = ceil(size / tile)``
tiles. A query in tile ``a`` may attend a key in tile ``x`` iff on every axis where
``window < n``::

    |clamp(a, window // 2, n - 1 - window // 2) - x| <= window // 2

An axis whose window covers all its tiles (``window >= n``) is unrestricted. Text tokens
(placed first in the sequence) attend to everything and are attended by everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Triple = tuple[int, int, int]


def _as_triple(value, name: str) -> Triple:
    if isinstance(value, int):
        raise ValueError(f"{name} must give one value per axis (T, H, W), got the int {value}; "
                         f"for a 2D image pass (1, h, w)")
    values = tuple(value)
    if len(values) == 2:  # a 2D image: one frame
        values = (1, *values)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be 3 ints (T, H, W) or 2 ints (H, W), got {value!r}")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class TileSpec:
    """A checked sliding-tile layout. ``windows`` holds one (t, h, w) window per head, or a
    single window shared by all heads."""

    grid: Triple
    tile: Triple
    windows: tuple[Triple, ...]
    text_tokens: int

    @property
    def num_tiles(self) -> Triple:
        return tuple(math.ceil(s / t) for s, t in zip(self.grid, self.tile))  # type: ignore[return-value]

    @property
    def video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def tile_tokens(self) -> int:
        return self.tile[0] * self.tile[1] * self.tile[2]

    def effective_window(self, window: Triple) -> Triple:
        """The window with every axis it covers entirely replaced by that axis' tile count,
        so that two windows that allow the same keys compare equal."""
        return tuple(min(w, n) for w, n in zip(window, self.num_tiles))  # type: ignore[return-value]

    def is_dense(self) -> bool:
        """True when every window covers every tile: attention is plain dense attention."""
        return all(w >= n for win in self.windows for w, n in zip(win, self.num_tiles))

    def head_windows(self, heads: int) -> list[Triple]:
        return list(self.windows) * heads if len(self.windows) == 1 else list(self.windows)

    def density(self, heads: int = 1) -> float:
        """Fraction of (query, key) pairs computed, averaged over heads, text included."""
        text, video = self.text_tokens, self.video_tokens
        per_head = []
        for win in self.head_windows(heads):
            video_pairs = 1
            for size, tile, n, w in zip(self.grid, self.tile, self.num_tiles, win):
                video_pairs *= sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in axis_groups(size, tile, n, w))
            per_head.append(video_pairs + 2 * text * video + text * text)
        return sum(per_head) / len(per_head) / (text + video) ** 2


def make_spec(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid, tile, window, text_tokens: int) -> TileSpec:
    """Check the public arguments against each other and the tensors; raise ``ValueError``
    naming the problem and the fix."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (batch, heads, seq, head_dim); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"sliding-tile attention is self-attention: q and k must have the same shape and v the same "
                         f"(batch, heads, seq); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    grid_t, tile_t = _as_triple(grid, "grid"), _as_triple(tile, "tile")
    if any(s < 1 for s in grid_t):
        raise ValueError(f"grid sizes must be >= 1, got {grid_t}")
    if any(t < 1 for t in tile_t):
        raise ValueError(f"tile sizes must be >= 1 token per axis, got {tile_t}")
    heads = q.shape[1]
    if isinstance(window, (list, tuple)) and window and not isinstance(window[0], int):
        windows = tuple(_as_triple(w, "window") for w in window)
        if len(windows) != heads:
            raise ValueError(f"per-head windows: got {len(windows)} windows for {heads} heads; "
                             f"pass one (t, h, w) window per head or one window for all")
    else:
        windows = (_as_triple(window, "window"),)
    num_tiles = [math.ceil(s / t) for s, t in zip(grid_t, tile_t)]
    for win in windows:
        # an even window has no centre tile, unless it covers its whole axis (then it means "all",
        # e.g. a window equal to the tile count, as a full-attention case is naturally written)
        if any(w < 1 or (w % 2 == 0 and w < n) for w, n in zip(win, num_tiles)):
            raise ValueError(f"window sizes are counted in tiles and must be odd and >= 1 (a centred window) or "
                             f"cover the whole axis ({tuple(num_tiles)} tiles here), got {win}")
    if not isinstance(text_tokens, int) or text_tokens < 0:
        raise ValueError(f"text_tokens must be an int >= 0, got {text_tokens!r}")
    video = grid_t[0] * grid_t[1] * grid_t[2]
    if q.shape[2] != text_tokens + video:
        raise ValueError(f"mismatched layout: seq = {q.shape[2]} but text_tokens + T*H*W = {text_tokens} + "
                         f"{grid_t[0]}*{grid_t[1]}*{grid_t[2]} = {text_tokens + video}; pass the grid of the "
                         f"video tokens and the number of text tokens placed before them")
    if len(set(windows)) == 1:
        windows = windows[:1]
    return TileSpec(grid_t, tile_t, windows, text_tokens)


def key_tile_range(query_tile: int, num_tiles: int, window: int) -> tuple[int, int]:
    """Inclusive range of key tiles a query tile sees on one axis (centre clamped inside)."""
    if window >= num_tiles:
        return 0, num_tiles - 1
    radius = window // 2
    centre = min(max(query_tile, radius), num_tiles - 1 - radius)
    return centre - radius, centre + radius


def axis_groups(size: int, tile: int, num_tiles: int, window: int) -> list[tuple[int, int, int, int]]:
    """Split one axis into groups of query tiles that share one key range. Returns token
    ranges (q_start, q_stop, k_start, k_stop). Clamping the centre makes every edge tile
    share its neighbour's window, so an axis has ``n - window + 1`` groups (1 if full)."""
    if window >= num_tiles:
        return [(0, size, 0, size)]
    radius = window // 2
    groups = []
    for centre in range(radius, num_tiles - radius):
        first = 0 if centre == radius else centre
        last = num_tiles - 1 if centre == num_tiles - 1 - radius else centre
        groups.append((first * tile, min((last + 1) * tile, size),
                       (centre - radius) * tile, min((centre + radius + 1) * tile, size)))
    return groups


# ---- padded tile-major order (Triton and FlexAttention paths) ----

def padded_tile_tokens(tile_tokens: int, block: int) -> int:
    """Tokens per tile after padding to whole blocks, so no block straddles two tiles."""
    return math.ceil(tile_tokens / block) * block


def to_tile_order(x: torch.Tensor, spec: TileSpec, padded_tile: int) -> torch.Tensor:
    """(B, heads, T*H*W, D) row-major video tokens -> (B, heads, n_tiles * padded_tile, D)
    in tile-major order. Grid edges and tile tails are zero-padded; callers mask those keys."""
    batch, heads, _, dim = x.shape
    (T, H, W), (a, b, c), (nt, nh, nw) = spec.grid, spec.tile, spec.num_tiles
    x = x.reshape(batch * heads, T, H, W, dim)
    x = F.pad(x, (0, 0, 0, nw * c - W, 0, nh * b - H, 0, nt * a - T))
    x = x.view(batch * heads, nt, a, nh, b, nw, c, dim).permute(0, 1, 3, 5, 2, 4, 6, 7)
    x = x.reshape(batch * heads, nt * nh * nw, a * b * c, dim)
    x = F.pad(x, (0, 0, 0, padded_tile - a * b * c))
    return x.reshape(batch, heads, nt * nh * nw * padded_tile, dim)


def from_tile_order(x: torch.Tensor, spec: TileSpec, padded_tile: int) -> torch.Tensor:
    """Inverse of :func:`to_tile_order`: drops padded tokens, returns row-major order."""
    batch, heads, _, dim = x.shape
    (T, H, W), (a, b, c), (nt, nh, nw) = spec.grid, spec.tile, spec.num_tiles
    x = x.reshape(batch * heads, nt * nh * nw, padded_tile, dim)[:, :, : a * b * c]
    x = x.reshape(batch * heads, nt, nh, nw, a, b, c, dim).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(batch * heads, nt * a, nh * b, nw * c, dim)[:, :T, :H, :W]
    return x.reshape(batch, heads, T * H * W, dim)


def tile_order_valid(spec: TileSpec, padded_tile: int, device) -> torch.Tensor:
    """Bool vector over the padded tile-major order: True where a real token sits."""
    ones = torch.ones(1, 1, spec.video_tokens, 1, device=device)
    return to_tile_order(ones, spec, padded_tile).reshape(-1) > 0.5


def windows_tensor(spec: TileSpec, heads: int, device) -> torch.Tensor:
    """(heads, 3) int32 windows, each axis clipped to its tile count (>= n means full)."""
    rows = [spec.effective_window(w) for w in spec.head_windows(heads)]
    return torch.tensor(rows, dtype=torch.int32, device=device)

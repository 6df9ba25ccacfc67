"""Sliding-tile attention through FlexAttention's block mask.

Tokens are put in the same padded tile-major order as the Triton path (text first,
padded to whole blocks), so with tiles of a multiple of 128 tokens every 128x128 block is
all-allowed or all-masked and FlexAttention skips the masked ones. The mask function is
the semantics itself, evaluated on tile coordinates; padded keys are masked out.

On CPU, eager ``flex_attention`` runs an unfused reference (fine for tests); the fused
kernel needs ``torch.compile`` (``compiled=True``), which costs a compile per shape.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from .tile_layout import TileSpec, from_tile_order, padded_tile_tokens, tile_order_valid, to_tile_order, windows_tensor

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None

FLEX_BLOCK = 128


def flex_unavailable_reason() -> str | None:
    if flex_attention is None:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
    return None


MAX_TABLE = 1 << 24  # entries of the (heads, tiles, tiles) lookup table before falling back to arithmetic


def sliding_tile_mask_mod(spec: TileSpec, heads: int, text_padded: int, padded_tile: int, device):
    """mask_mod(b, h, q_idx, kv_idx) over the padded tile-major sequence.

    Why a lookup table: FlexAttention evaluates mask_mod on every element of every partial
    block, and with 64-token tiles in 128-token blocks most visited blocks are partial (76% at
    the CogVideoX-2b shape, window (5, 3, 3)). The arithmetic form costs six integer div/mod
    chains per element, far more than the block's matmuls -- the likely cause of the 0.06x
    measured on an H100 (compile was outside the timing and nothing recompiled). Three small
    gathers per element instead: token -> tile, (head, query tile, key tile) -> allowed."""
    valid = torch.cat([torch.arange(text_padded, device=device) < spec.text_tokens,
                       tile_order_valid(spec, padded_tile, device)])
    n_tiles = math.prod(spec.num_tiles)
    per_head = len(spec.windows) > 1
    if (heads if per_head else 1) * n_tiles ** 2 <= MAX_TABLE:
        tile_of = ((torch.arange(valid.numel(), device=device) - text_padded).clamp(min=0) // padded_tile)
        allowed = _tile_table(spec, heads if per_head else 1, device)

        def table_mask_mod(b, h, q_idx, kv_idx):
            text = (q_idx < text_padded) | (kv_idx < text_padded)
            head = h if per_head else 0
            return valid[kv_idx] & (text | allowed[head, tile_of[q_idx], tile_of[kv_idx]])

        return table_mask_mod
    windows = windows_tensor(spec, heads, device).long()
    n_t, n_h, n_w = spec.num_tiles
    counts = torch.tensor(spec.num_tiles, device=device)

    def tile_coords(idx):
        tile = (idx - text_padded).clamp(min=0) // padded_tile
        return tile // (n_h * n_w), (tile // n_w) % n_h, tile % n_w

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (q_idx < text_padded) | (kv_idx < text_padded)
        window_ok = torch.ones_like(allowed)
        for axis, (q_axis, k_axis) in enumerate(zip(tile_coords(q_idx), tile_coords(kv_idx))):
            win, n = windows[h, axis], counts[axis]
            radius = win // 2
            centre = torch.minimum(torch.maximum(q_axis, radius), n - 1 - radius)
            window_ok = window_ok & ((win >= n) | ((centre - k_axis).abs() <= radius))
        return valid[kv_idx] & (allowed | window_ok)

    return mask_mod


def _tile_table(spec: TileSpec, heads: int, device) -> torch.Tensor:
    """(heads, n_tiles, n_tiles) bool: may query tile a attend key tile x (the written semantics)."""
    from .tile_layout import key_tile_range

    tables = []
    for window in spec.head_windows(heads)[:heads]:
        axes = []
        for n, w in zip(spec.num_tiles, window):
            m = torch.zeros(n, n, dtype=torch.bool)
            for a in range(n):
                lo, hi = key_tile_range(a, n, w)
                m[a, lo:hi + 1] = True
            axes.append(m)
        mt, mh, mw = axes
        tables.append((mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None]
                       & mw[None, None, :, None, None, :]).reshape(math.prod(spec.num_tiles), -1))
    return torch.stack(tables).to(device)


@functools.lru_cache(maxsize=32)
def _cached_block_mask(spec: TileSpec, heads: int, per_head: bool, text_padded: int, padded_tile: int,
                       device: str, compile_mask: bool):
    mask_mod = sliding_tile_mask_mod(spec, heads, text_padded, padded_tile, device)
    seq = text_padded + math.prod(spec.num_tiles) * padded_tile
    return create_block_mask(mask_mod, None, heads if per_head else None, seq, seq, device=device,
                             BLOCK_SIZE=FLEX_BLOCK, _compile=compile_mask)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def sliding_tile_attention_flex(q, k, v, spec: TileSpec, scale=None, compiled: bool | None = None) -> torch.Tensor:
    """``compiled`` defaults to True on CUDA (the fused kernel) and False on CPU."""
    reason = flex_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    batch, heads, seq, dim = q.shape
    text = spec.text_tokens
    compiled = q.device.type == "cuda" if compiled is None else compiled
    # Pad tiles to 64 rows (not 128): cheaper for 64-token tiles, and blocks spanning two
    # tiles are just partial blocks that FlexAttention masks element-wise.
    padded_tile = padded_tile_tokens(spec.tile_tokens, 64 if spec.tile_tokens % FLEX_BLOCK else FLEX_BLOCK)
    text_padded = math.ceil(text / FLEX_BLOCK) * FLEX_BLOCK
    block_mask = _cached_block_mask(spec, heads, len(spec.windows) > 1, text_padded, padded_tile,
                                    str(q.device), q.device.type == "cuda")

    def to_flex_order(x):
        text_part = torch.nn.functional.pad(x[:, :, :text], (0, 0, 0, text_padded - text))
        return torch.cat([text_part, to_tile_order(x[:, :, text:], spec, padded_tile)], dim=2)

    attend = _compiled_flex() if compiled else flex_attention
    with warnings.catch_warnings():
        # eager flex_attention warns that it is unfused; that is the documented CPU test path
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = attend(to_flex_order(q), to_flex_order(k), to_flex_order(v), block_mask=block_mask, scale=scale)
    video_out = from_tile_order(out[:, :, text_padded:], spec, padded_tile)
    return torch.cat([out[:, :, :text], video_out], dim=2) if text else video_out

"""Triton forward kernel for sliding-tile attention on tokens already in tile order
(:mod:`tile_order`), exposed as the custom op ``diffaccel::sliding_tile_attn_ordered``.

Unlike :mod:`sliding_tile_triton` it needs no reordered, padded copies: it reads q, k, v where
the model left them (any strides with a unit head_dim stride, text first or last), so a model
that keeps its tokens in tile order pays for the kernel alone. Tiles are ragged (edge tiles
are shorter), so the kernel reads two small tables: where each tile starts, and the query
blocks (tile, first row) -- a block never straddles two tiles; rows and keys past a tile's end
are masked. Each program owns BLOCK_M queries of one tile for one (batch, head); it walks the
text keys in place, then the key tiles of its clamped window, with the usual online softmax.
Text queries attend to everything: SDPA computes them (order does not matter for them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sliding_tile_triton import _interpreting, default_config, triton, triton_unavailable_reason
from .tile_layout import TileSpec, windows_tensor
from .tile_order import join_text, query_blocks, split_text, tile_starts

if triton is not None:
    import triton.language as tl

    from .sliding_tile_triton import _window_range

    @triton.jit
    def _attend_keys(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_ok, d_mask, scale_log2, IEEE: tl.constexpr):
        load_mask = key_ok[:, None] & d_mask[None, :]
        k = tl.load(k_ptrs, mask=load_mask, other=0.0)
        v = tl.load(v_ptrs, mask=load_mask, other=0.0)
        if IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(key_ok[None, :], s * scale_log2, -1.0e30)  # finite: an all-masked block makes no NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _sliding_tile_ordered_fwd(
        Q, K, V, TileStart, QBlocks, Windows, Out,
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
        heads, video_offset, text_offset, text_len, tiles_t, tiles_h, tiles_w, scale_log2,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)
        h = pid_bh % heads
        q_tile = tl.load(QBlocks + 2 * pid_m)
        q_start = tl.load(QBlocks + 2 * pid_m + 1)
        q_stop = tl.load(TileStart + q_tile + 1)
        it = q_tile // (tiles_h * tiles_w)
        ih = (q_tile // tiles_w) % tiles_h
        iw = q_tile % tiles_w
        first_t, count_t = _window_range(it, tiles_t, tl.load(Windows + h * 3 + 0))
        first_h, count_h = _window_range(ih, tiles_h, tl.load(Windows + h * 3 + 1))
        first_w, count_w = _window_range(iw, tiles_w, tl.load(Windows + h * 3 + 2))

        rows = q_start + tl.arange(0, BLOCK_M)
        row_ok = rows < q_stop
        key_rows = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, D_PAD)
        d_mask = cols < HEAD_DIM
        q_ptrs = Q + b * sq_b + h * sq_h + (video_offset + rows.to(tl.int64))[:, None] * sq_s + cols[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        k_base = K + b * sk_b + h * sk_h + cols[None, :]
        v_base = V + b * sv_b + h * sv_h + cols[None, :]

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

        for start in range(0, text_len, BLOCK_N):  # text keys, read in place: seen by every query
            keys = start + key_rows
            at = (text_offset + keys.to(tl.int64))[:, None]
            acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base + at * sk_s, v_base + at * sv_s, keys < text_len,
                                         d_mask, scale_log2, IEEE)
        for j in range(0, count_t * count_h * count_w):  # the window's key tiles, each contiguous
            dw = j % count_w
            dh = (j // count_w) % count_h
            dt = j // (count_w * count_h)
            key_tile = ((first_t + dt) * tiles_h + first_h + dh) * tiles_w + first_w + dw
            k_start = tl.load(TileStart + key_tile)
            k_stop = tl.load(TileStart + key_tile + 1)
            for start in range(k_start, k_stop, BLOCK_N):
                keys = start + key_rows
                at = (video_offset + keys.to(tl.int64))[:, None]
                acc, m_i, l_i = _attend_keys(acc, m_i, l_i, q, k_base + at * sk_s, v_base + at * sv_s,
                                             keys < k_stop, d_mask, scale_log2, IEEE)
        out = acc / l_i[:, None]
        o_ptrs = Out + b * so_b + h * so_h + rows.to(tl.int64)[:, None] * so_s + cols[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


def ordered_triton_unavailable_reason(device: torch.device, head_dim: int, value_dim: int) -> str | None:
    return triton_unavailable_reason(device, head_dim, value_dim)


def _out_like(q: torch.Tensor, video: int, dtype) -> torch.Tensor:
    # (B, video, heads, D) memory seen as (B, heads, video, D): what SDPA returns, so the
    # processor's transpose(1, 2).reshape after attention is free.
    batch, heads, _, dim = q.shape
    return q.new_empty(batch, video, heads, dim, dtype=dtype).transpose(1, 2)


@torch.library.custom_op("diffaccel::sliding_tile_attn_ordered", mutates_args=())
def sliding_tile_attn_ordered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile_start: torch.Tensor,
                              blocks: torch.Tensor, windows: torch.Tensor, video_offset: int, video: int,
                              text_offset: int, text_len: int, tiles_t: int, tiles_h: int, tiles_w: int, scale: float,
                              block_m: int, block_n: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """Video-query rows (B, heads, video, D) of sliding-tile attention on tile-ordered q, k, v
    (B, heads, seq, D), the video tokens at ``video_offset``, the text at ``text_offset``.
    tile_start (n_tiles + 1,) int32; blocks (n_blocks, 2) int32 (tile, first row); windows (heads, 3)."""
    batch, heads, _, dim = q.shape
    interpreted_bf16 = q.dtype == torch.bfloat16 and _interpreting()  # see sliding_tile_triton
    out = _out_like(q, video, torch.float32 if interpreted_bf16 else q.dtype)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _sliding_tile_ordered_fwd[(blocks.shape[0], batch * heads)](
        q, k, v, tile_start, blocks, windows, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, video_offset, text_offset, text_len, tiles_t, tiles_h, tiles_w, scale * math.log2(math.e),
        HEAD_DIM=dim, D_PAD=max(16, 1 << (dim - 1).bit_length()), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32 or interpreted_bf16, num_warps=num_warps, num_stages=num_stages,
    )
    return out.to(q.dtype)


@sliding_tile_attn_ordered.register_fake
def _(q, k, v, tile_start, blocks, windows, video_offset, video, text_offset, text_len, tiles_t, tiles_h, tiles_w,
      scale, block_m, block_n, num_warps, num_stages):
    return _out_like(q, video, q.dtype)


def ordered_inputs(q, spec: TileSpec, text_position: str, config: dict) -> tuple:
    """Everything the custom op takes besides q, k, v, the scale and the launch config."""
    device = str(q.device)
    tile = tuple(min(t, s) for t, s in zip(spec.tile, spec.grid))
    text, video = spec.text_tokens, spec.video_tokens
    video_offset, text_offset = (text, 0) if text_position == "first" else (0, video)
    return (tile_starts(spec.grid, tile, device), query_blocks(spec.grid, tile, config["block_m"], device),
            windows_tensor(spec, q.shape[1], q.device), video_offset, video, text_offset, text, *spec.num_tiles)


def sliding_tile_attention_ordered_triton(q, k, v, spec: TileSpec, text_position: str = "first", scale=None,
                                          config: dict | None = None) -> torch.Tensor:
    """The kernel on the video queries, SDPA on the text queries, joined in model order."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    config = config or default_config(spec.tile_tokens, q.shape[-1])
    video_out = sliding_tile_attn_ordered(q, k, v, *ordered_inputs(q, spec, text_position, config), scale,
                                          config["block_m"], config["block_n"], config["num_warps"],
                                          config["num_stages"])
    text_q, _ = split_text(q, spec.text_tokens, text_position)
    if not spec.text_tokens:
        return video_out
    return join_text(F.scaled_dot_product_attention(text_q, k, v, scale=scale), video_out, text_position)

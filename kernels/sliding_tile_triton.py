"""Triton forward kernel for sliding-tile attention (inference), exposed as the custom op
``diffaccel::sliding_tile_attn`` (with a fake implementation, so ``torch.compile`` traces
through it without graph breaks).

Layout. Video tokens are reordered into tile-major order with every tile padded to whole
``BLOCK`` rows (:func:`tile_layout.to_tile_order`), so a block of queries or keys never
straddles two tiles and every key block of a window is fully inside it: no per-element
window mask is needed, only a per-key validity bias that removes padding. Keys are
``[text padded to BLOCK | video tiles]``. Each program owns BLOCK queries of one tile and
one (batch, head); it walks the text key blocks, then the key tiles of its clamped
window (window per head, read from a small table), with the usual online softmax. Text
queries attend to everything and are computed densely by SDPA outside the kernel.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .tile_layout import TileSpec, from_tile_order, padded_tile_tokens, tile_order_valid, to_tile_order, windows_tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional (not on macOS / Windows)
    triton = None

MAX_HEAD_DIM = 256
_NEG_BIG = -1.0e30  # finite "minus infinity": a block of padding never produces NaN


def triton_unavailable_reason(device: torch.device, head_dim: int, value_dim: int) -> str | None:
    """None when the Triton kernel can run these inputs, else why not (for error messages)."""
    if triton is None:
        return "triton is not installed"
    if value_dim != head_dim:
        return f"the Triton kernel needs v's head_dim ({value_dim}) equal to q's ({head_dim})"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernel"
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not interpret:
        return f"the Triton kernel needs a CUDA tensor (got {device.type}); set TRITON_INTERPRET=1 to run it on CPU (slow)"
    return None


if triton is not None:

    @triton.jit
    def _window_range(tile_idx, num_tiles, window):
        """First key tile and tile count of the clamped window on one axis."""
        radius = window // 2
        centre = tl.minimum(tl.maximum(tile_idx, radius), num_tiles - 1 - radius)
        full = window >= num_tiles
        first = tl.where(full, 0, centre - radius)
        count = tl.where(full, num_tiles, window)
        return first, count

    @triton.jit
    def _attend_block(acc, m_i, l_i, q, k_ptrs, v_ptrs, bias_ptrs, d_mask, scale_log2, IEEE: tl.constexpr):
        k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        bias = tl.load(bias_ptrs)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2 + bias[None, :]
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
    def _sliding_tile_fwd(
        Q, K, V, Bias, Windows, Out,
        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
        heads, text_padded, tiles_t, tiles_h, tiles_w, padded_tile, scale_log2,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        q_start = pid_m * BLOCK
        q_tile = q_start // padded_tile
        it = q_tile // (tiles_h * tiles_w)
        ih = (q_tile // tiles_w) % tiles_h
        iw = q_tile % tiles_w
        first_t, count_t = _window_range(it, tiles_t, tl.load(Windows + h * 3 + 0))
        first_h, count_h = _window_range(ih, tiles_h, tl.load(Windows + h * 3 + 1))
        first_w, count_w = _window_range(iw, tiles_w, tl.load(Windows + h * 3 + 2))

        rows = tl.arange(0, BLOCK)
        cols = tl.arange(0, D_PAD)
        d_mask = cols < HEAD_DIM
        q_ptrs = Q + b * sq_b + h * sq_h + (q_start + rows)[:, None] * sq_s + cols[None, :]
        q = tl.load(q_ptrs, mask=d_mask[None, :], other=0.0)
        k_base = K + b * sk_b + h * sk_h + cols[None, :]
        v_base = V + b * sv_b + h * sv_h + cols[None, :]

        m_i = tl.full([BLOCK], _NEG_BIG, dtype=tl.float32)
        l_i = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)

        for start in range(0, text_padded, BLOCK):  # text keys: seen by every query
            keys = start + rows
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + keys[:, None] * sk_s, v_base + keys[:, None] * sv_s,
                                          Bias + keys, d_mask, scale_log2, IEEE)
        blocks_per_tile = padded_tile // BLOCK
        window_blocks = count_t * count_h * count_w * blocks_per_tile
        for j in range(0, window_blocks):
            block_in_tile = j % blocks_per_tile
            tile_in_window = j // blocks_per_tile
            dw = tile_in_window % count_w
            dh = (tile_in_window // count_w) % count_h
            dt = tile_in_window // (count_w * count_h)
            key_tile = ((first_t + dt) * tiles_h + first_h + dh) * tiles_w + first_w + dw
            keys = text_padded + key_tile * padded_tile + block_in_tile * BLOCK + rows
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + keys[:, None] * sk_s, v_base + keys[:, None] * sv_s,
                                          Bias + keys, d_mask, scale_log2, IEEE)
        out = acc / l_i[:, None]
        o_ptrs = Out + b * so_b + h * so_h + (q_start + rows)[:, None] * so_s + cols[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_mask[None, :])


def block_size_for(tile_tokens: int) -> int:
    """Rows per program: 64 for real tiles (so 6x8x8 = 384 or 4x8x8 = 256 pad nothing),
    smaller for tiny tiles so padding does not dominate; tl.dot needs >= 16."""
    return 64 if tile_tokens >= 64 else max(16, 1 << (tile_tokens - 1).bit_length())


@torch.library.custom_op("diffaccel::sliding_tile_attn", mutates_args=())
def sliding_tile_attn(q_tiles: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, key_bias: torch.Tensor,
                      windows: torch.Tensor, text_padded: int, tiles_t: int, tiles_h: int, tiles_w: int,
                      padded_tile: int, block: int, scale: float) -> torch.Tensor:
    """Video-query rows of sliding-tile attention in padded tile-major order.
    q_tiles (B, h, n_tiles*padded_tile, D); k_all/v_all (B, h, text_padded + n_tiles*padded_tile, D);
    key_bias (text_padded + n_tiles*padded_tile,) fp32, 0 for real keys, -1e30 for padding;
    windows (h, 3) int32."""
    batch, heads, q_len, dim = q_tiles.shape
    out = torch.empty_like(q_tiles)
    grid = (q_len // block, batch * heads)
    _sliding_tile_fwd[grid](
        q_tiles, k_all, v_all, key_bias, windows, out,
        *q_tiles.stride()[:3], *k_all.stride()[:3], *v_all.stride()[:3], *out.stride()[:3],
        heads, text_padded, tiles_t, tiles_h, tiles_w, padded_tile, scale * math.log2(math.e),
        HEAD_DIM=dim, D_PAD=max(16, 1 << (dim - 1).bit_length()), BLOCK=block,
        IEEE=q_tiles.dtype == torch.float32,
        num_warps=4 if dim <= 64 else 8, num_stages=2,
    )
    return out


@sliding_tile_attn.register_fake
def _(q_tiles, k_all, v_all, key_bias, windows, text_padded, tiles_t, tiles_h, tiles_w, padded_tile, block, scale):
    return torch.empty_like(q_tiles)


def sliding_tile_attention_triton(q, k, v, spec: TileSpec, scale=None) -> torch.Tensor:
    """Reorder, run the kernel on the video queries, SDPA for text queries, restore order."""
    batch, heads, _, dim = q.shape
    text = spec.text_tokens
    scale = dim ** -0.5 if scale is None else scale
    block = block_size_for(spec.tile_tokens)
    padded_tile = padded_tile_tokens(spec.tile_tokens, block)
    text_padded = math.ceil(text / block) * block
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()

    def keys_in_kernel_order(x):
        text_part = F.pad(x[:, :, :text], (0, 0, 0, text_padded - text))
        return torch.cat([text_part, to_tile_order(x[:, :, text:], spec, padded_tile)], dim=2)

    text_valid = torch.arange(text_padded, device=q.device) < text
    valid = torch.cat([text_valid, tile_order_valid(spec, padded_tile, q.device)])
    key_bias = torch.where(valid, 0.0, _NEG_BIG).to(torch.float32)
    out_tiles = sliding_tile_attn(
        to_tile_order(q[:, :, text:], spec, padded_tile), keys_in_kernel_order(k), keys_in_kernel_order(v),
        key_bias, windows_tensor(spec, heads, q.device), text_padded, *spec.num_tiles, padded_tile, block, float(scale))
    video_out = from_tile_order(out_tiles, spec, padded_tile)
    if not text:
        return video_out
    text_out = F.scaled_dot_product_attention(q[:, :, :text], k, v, scale=scale)
    return torch.cat([text_out, video_out], dim=2)

"""Triton forward kernel for sliding-tile attention (inference), exposed as the custom op
``diffaccel::sliding_tile_attn`` (with a fake implementation, so ``torch.compile`` traces
through it without graph breaks).

Layout. Video tokens are reordered into tile-major order with every tile padded to whole
blocks (:func:`tile_layout.to_tile_order`), so a block of queries or keys never straddles
two tiles and every key block of a window is fully inside it: no per-element window
mask is needed, only a per-key validity bias that removes padding. Keys are
``[text padded to BLOCK_N | video tiles]``. Each program owns BLOCK_M queries of one tile and
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device, head_dim: int, value_dim: int) -> str | None:
    """None when the Triton kernel can run these inputs, else why not (for error messages)."""
    if triton is None:
        return 'triton is not installed (pip install "diffaccel[gpu]" on Linux x86_64)'
    if value_dim != head_dim:
        return f"the Triton kernel needs v's head_dim ({value_dim}) equal to q's ({head_dim})"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM} is not supported by the Triton kernel"
    if device.type != "cuda" and not _interpreting():
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
        # IEEE: exact fp32 dots (no TF32), for fp32 inputs and for bf16 under the interpreter
        k = tl.load(k_ptrs, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        bias = tl.load(bias_ptrs)
        if IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
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
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // heads).to(tl.int64)  # int64: batch/head offsets of big videos pass 2^31
        h = pid_bh % heads
        q_start = pid_m * BLOCK_M
        q_tile = q_start // padded_tile
        it = q_tile // (tiles_h * tiles_w)
        ih = (q_tile // tiles_w) % tiles_h
        iw = q_tile % tiles_w
        first_t, count_t = _window_range(it, tiles_t, tl.load(Windows + h * 3 + 0))
        first_h, count_h = _window_range(ih, tiles_h, tl.load(Windows + h * 3 + 1))
        first_w, count_w = _window_range(iw, tiles_w, tl.load(Windows + h * 3 + 2))

        rows = tl.arange(0, BLOCK_M)
        key_rows = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, D_PAD)
        d_mask = cols < HEAD_DIM
        q_ptrs = Q + b * sq_b + h * sq_h + (q_start + rows)[:, None] * sq_s + cols[None, :]
        q = tl.load(q_ptrs, mask=d_mask[None, :], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        k_base = K + b * sk_b + h * sk_h + cols[None, :]
        v_base = V + b * sv_b + h * sv_h + cols[None, :]

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a block of padding never makes NaN
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

        for start in range(0, text_padded, BLOCK_N):  # text keys: seen by every query
            keys = start + key_rows
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + keys[:, None] * sk_s, v_base + keys[:, None] * sv_s,
                                          Bias + keys, d_mask, scale_log2, IEEE)
        blocks_per_tile = padded_tile // BLOCK_N
        window_blocks = count_t * count_h * count_w * blocks_per_tile
        for j in range(0, window_blocks):
            block_in_tile = j % blocks_per_tile
            tile_in_window = j // blocks_per_tile
            dw = tile_in_window % count_w
            dh = (tile_in_window // count_w) % count_h
            dt = tile_in_window // (count_w * count_h)
            key_tile = ((first_t + dt) * tiles_h + first_h + dh) * tiles_w + first_w + dw
            keys = text_padded + key_tile * padded_tile + block_in_tile * BLOCK_N + key_rows
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base + keys[:, None] * sk_s, v_base + keys[:, None] * sv_s,
                                          Bias + keys, d_mask, scale_log2, IEEE)
        out = acc / l_i[:, None]
        o_ptrs = Out + b * so_b + h * so_h + (q_start + rows)[:, None] * so_s + cols[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_mask[None, :])


def default_config(tile_tokens: int, head_dim: int) -> dict:
    """Launch configuration. Query blocks never straddle tiles, so both block sizes must
    divide the padded tile: 128-row query blocks when the tile allows it without extra
    padding (6x8x8 = 384), else 64 (4x4x4 = 64, 4x8x8 = 256), smaller for tiny tiles so padding
    does not dominate (tl.dot needs >= 16)."""
    if tile_tokens < 64:
        block = max(16, 1 << (tile_tokens - 1).bit_length())
        return dict(block_m=block, block_n=block, num_warps=4, num_stages=2)
    block_m = 128 if padded_tile_tokens(tile_tokens, 64) % 128 == 0 else 64
    return dict(block_m=block_m, block_n=64, num_warps=8 if block_m == 128 or head_dim > 64 else 4, num_stages=2)


@torch.library.custom_op("diffaccel::sliding_tile_attn", mutates_args=())
def sliding_tile_attn(q_tiles: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, key_bias: torch.Tensor,
                      windows: torch.Tensor, text_padded: int, tiles_t: int, tiles_h: int, tiles_w: int,
                      padded_tile: int, scale: float, block_m: int, block_n: int, num_warps: int,
                      num_stages: int) -> torch.Tensor:
    """Video-query rows of sliding-tile attention in padded tile-major order.
    q_tiles (B, h, n_tiles*padded_tile, D); k_all/v_all (B, h, text_padded + n_tiles*padded_tile, D);
    key_bias (text_padded + n_tiles*padded_tile,) fp32, 0 for real keys, -1e30 for padding;
    windows (h, 3) int32. padded_tile must be a multiple of block_m and block_n, text_padded of block_n."""
    batch, heads, q_len, dim = q_tiles.shape
    # Triton's CPU interpreter (3.9) mishandles bf16: tl.dot returns garbage and fp32 -> bf16
    # truncates instead of rounding. There, compute in fp32 and round with torch.
    interpreted_bf16 = q_tiles.dtype == torch.bfloat16 and _interpreting()
    out = torch.empty_like(q_tiles, dtype=torch.float32 if interpreted_bf16 else q_tiles.dtype)
    grid = (q_len // block_m, batch * heads)
    _sliding_tile_fwd[grid](
        q_tiles, k_all, v_all, key_bias, windows, out,
        *q_tiles.stride()[:3], *k_all.stride()[:3], *v_all.stride()[:3], *out.stride()[:3],
        heads, text_padded, tiles_t, tiles_h, tiles_w, padded_tile, scale * math.log2(math.e),
        HEAD_DIM=dim, D_PAD=max(16, 1 << (dim - 1).bit_length()), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q_tiles.dtype == torch.float32 or interpreted_bf16, num_warps=num_warps, num_stages=num_stages,
    )
    return out.to(q_tiles.dtype)


@sliding_tile_attn.register_fake
def _(q_tiles, k_all, v_all, key_bias, windows, text_padded, tiles_t, tiles_h, tiles_w, padded_tile, scale,
      block_m, block_n, num_warps, num_stages):
    return torch.empty_like(q_tiles)


def prepare_triton_inputs(q, k, v, spec: TileSpec, config: dict):
    """Reordered, padded kernel inputs (everything the custom op takes but the config)."""
    heads = q.shape[1]
    text = spec.text_tokens
    padded_tile = padded_tile_tokens(spec.tile_tokens, max(config["block_m"], config["block_n"]))
    text_padded = math.ceil(text / config["block_n"]) * config["block_n"]

    def keys_in_kernel_order(x):
        text_part = F.pad(x[:, :, :text], (0, 0, 0, text_padded - text))
        return torch.cat([text_part, to_tile_order(x[:, :, text:], spec, padded_tile)], dim=2)

    valid = torch.cat([torch.arange(text_padded, device=q.device) < text, tile_order_valid(spec, padded_tile, q.device)])
    key_bias = torch.where(valid, 0.0, _NEG_BIG).to(torch.float32)
    # the kernel assumes unit stride along head_dim: every tensor here is a fresh contiguous copy
    return (to_tile_order(q[:, :, text:], spec, padded_tile), keys_in_kernel_order(k), keys_in_kernel_order(v),
            key_bias, windows_tensor(spec, heads, q.device), text_padded, *spec.num_tiles, padded_tile)


def sliding_tile_attention_triton(q, k, v, spec: TileSpec, scale=None, config: dict | None = None) -> torch.Tensor:
    """Reorder, run the kernel on the video queries, SDPA for text queries, restore order."""
    text = spec.text_tokens
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    config = config or default_config(spec.tile_tokens, q.shape[-1])
    inputs = prepare_triton_inputs(q, k, v, spec, config)
    out_tiles = sliding_tile_attn(*inputs, scale, config["block_m"], config["block_n"], config["num_warps"],
                                  config["num_stages"])
    video_out = from_tile_order(out_tiles, spec, inputs[-1])
    if not text:
        return video_out
    text_out = F.scaled_dot_product_attention(q[:, :, :text], k, v, scale=scale)
    return torch.cat([text_out, video_out], dim=2)

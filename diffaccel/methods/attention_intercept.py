"""Shared machinery of the sparse-attention methods (sliding tile, mediators): replace the
attention *math* of chosen self-attention modules, keep everything else of their processor.

Every diffusers attention processor (CogVideoX, SD3 joint, Flux, Wan, Hunyuan, plain
AttnProcessor2_0 ...) does its own projections, norms, RoPE and text concatenation, then calls
``torch.nn.functional.scaled_dot_product_attention`` on (batch, heads, seq, dim). Copying those
processors would break whenever diffusers changes them, so a forward hook on the attention
module intercepts SDPA for the duration of that module's forward only
(:func:`diffaccel.compat.intercept_sdpa`): the sparse kernel runs when the call is the module's
self-attention over the known token layout (q, k, v of one shape, sequence = text + T*H*W, no
real mask) and plain SDPA otherwise. Not thread-safe across concurrent pipeline calls in one
process (the interception is process-wide while a hooked forward runs).
"""

from __future__ import annotations

import torch

from diffaccel.compat import intercept_sdpa, real_sdpa
from diffaccel.distributed import ulysses_order
from diffaccel.hooks import Installed, hook_forward


def mask_is_trivial(attn_mask) -> bool:
    """None, an all-True boolean mask or an all-zero additive mask: attention is unmasked."""
    if attn_mask is None:
        return True
    if attn_mask.dtype == torch.bool:
        return bool(attn_mask.all())
    return bool((attn_mask == 0).all())


class SparseAttentionHook:
    """Hook on one self-attention module. Subclasses decide per call (``plan``) whether the
    sparse path runs, and implement it (``attend`` on text-first q, k, v)."""

    def __init__(self, installed: Installed, info):
        self.installed, self.info = installed, info
        hook_forward(installed, info.module, self.forward, f"diffaccel_{installed.config.name}")

    def plan(self, layout) -> object | None:
        """Per-call setting for the sparse path (e.g. a window), or None to compute densely."""
        raise NotImplementedError

    def sparse_phase(self, layout) -> float | None:
        """Where the call is in the trajectory (0 = first step) when the sparse path may run: past
        the method's full-attention phase and on a grid of at least ``min_tokens``; else None."""
        config = self.installed.config
        where = step_fraction(self.installed.session.ctx)
        if where is None or where < config.full_attention_fraction or layout.num_visual < config.min_tokens:
            return None
        return where

    def attend(self, q, k, v, layout, setting, scale) -> torch.Tensor:
        raise NotImplementedError

    def takes_model_order(self) -> bool:
        """True when ``attend`` takes q, k, v in the model's order (text last stays last)."""
        return False

    def forward(self, original, *args, **kwargs):
        session = self.installed.session
        ctx = session.ctx
        if not ctx.active or ctx.grid is None:
            return original(*args, **kwargs)
        layout = session.adapter.token_layout(self.info, ctx.grid)
        setting = self.plan(layout)
        if setting is None:
            self.installed.count("dense_calls")
            return original(*args, **kwargs)
        with intercept_sdpa(lambda *a, **kw: self._sdpa(layout, setting, *a, **kw)):
            return original(*args, **kwargs)

    def _sdpa(self, layout, setting, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              **kwargs):
        extra = {name: value for name, value in kwargs.items() if not (name == "enable_gqa" and value is False)}
        matches = (query.dim() == 4 and query.shape == key.shape and value.shape[:3] == query.shape[:3]
                   and query.shape[2] == layout.seq_len and not is_causal and dropout_p == 0.0 and not extra
                   and mask_is_trivial(attn_mask))
        if not matches:  # not this module's full self-attention (or masked): leave it dense
            self.installed.count("dense_fallback_calls")
            return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **kwargs)
        self.installed.count("sparse_calls")
        order = ulysses_order(self.installed.session, query.shape[2], layout.text_tokens, layout.text_position != "last")
        if order is not None:  # diffusers' Ulysses stacked the ranks' [text, visual] shards: attend in global order
            order = order.to(query.device)
            out = self._attend_ordered(layout, setting, scale, *(x[:, :, order] for x in (query, key, value)))
            return torch.empty_like(out).index_copy_(2, order, out)
        return self._attend_ordered(layout, setting, scale, query, key, value)

    def _attend_ordered(self, layout, setting, scale, query, key, value):
        text, visual = layout.text_tokens, layout.num_visual
        if text and layout.text_position == "last" and not self.takes_model_order():  # kernels take text first
            first = lambda x: torch.cat([x[:, :, visual:], x[:, :, :visual]], dim=2)  # noqa: E731
            out = self.attend(first(query), first(key), first(value), layout, setting, scale)
            return torch.cat([out[:, :, text:], out[:, :, :text]], dim=2)
        return self.attend(query, key, value, layout, setting, scale)


def step_fraction(ctx) -> float | None:
    """Position of the current step in the call, 0 = first step; None when unknown."""
    if ctx.num_steps:
        return ctx.step / ctx.num_steps
    return None if ctx.t_norm is None else 1.0 - ctx.t_norm

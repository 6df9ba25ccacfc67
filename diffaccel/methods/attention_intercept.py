"""Shared machinery of the sparse-attention methods (sliding tile, mediators): replace the
attention *math* of chosen self-attention modules, keep everything else of their processor.

Every diffusers attention processor (CogVideoX, SD3 joint, Flux, Wan, Hunyuan, plain
AttnProcessor2_0 ...) does its own projections, norms, RoPE and text concatenation, then calls
torch's ``scaled_dot_product_attention`` or diffusers' ``dispatch_attention_fn`` (the backend the
user picked with ``set_attention_backend``). Copying those processors would break whenever
diffusers changes them, so each module gets a routed processor
(:func:`diffaccel.compat.route_attention`): the processor's own code, with its attention call
going to :meth:`SparseAttentionHook.route`. Nothing process-wide changes, so pipelines in other
threads are unaffected. The sparse kernel runs when the call is the module's self-attention over
the known token layout (q, k, v of one shape, sequence = text + T*H*W, no real mask); every other
call, and every call of the dense phase, runs on the user's backend unchanged. A module whose
attention cannot be routed (xformers processors, the classic AttnProcessor, context
parallelism) is refused at ``accelerate``, never silently left dense; stats count the calls per
backend (``attention_backend``).
"""

from __future__ import annotations

import torch

from diffaccel import compat
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
    """Routes one self-attention module's attention. Subclasses decide per call (``plan``)
    whether the sparse path runs, and implement it (``attend`` on text-first q, k, v)."""

    def __init__(self, installed: Installed, info):
        self.installed, self.info = installed, info
        try:
            self.processor, remove = compat.route_attention(info.module, self.route)
        except ValueError as error:
            raise ValueError(
                f"{type(installed.config).__name__} cannot act on {info.name}: {error}. Give the module a processor "
                f"that calls SDPA or diffusers' attention dispatch (e.g. pipe.disable_xformers_memory_efficient_attention()"
                f", denoiser.set_attn_processor(AttnProcessor2_0()), or the model's default processor with "
                f"set_attention_backend(...) for the backend), or leave this method out."
            ) from None
        installed.on_remove(remove)
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

    def attend(self, q, k, v, layout, setting, call: compat.AttentionCall) -> torch.Tensor:
        raise NotImplementedError

    def takes_model_order(self) -> bool:
        """True when ``attend`` takes q, k, v in the model's order (text last stays last)."""
        return False

    def forward(self, original, *args, **kwargs):
        # The routing lives in the processor: a processor swapped in after accelerate (e.g.
        # enable_xformers_memory_efficient_attention) would silently bypass the method.
        if self.info.module.processor is not self.processor and self.installed.session.ctx.active:
            raise RuntimeError(
                f"the attention processor of {self.info.name} was replaced after diffaccel.accelerate (it is now "
                f"{type(self.info.module.processor).__name__}), so {type(self.installed.config).__name__} no longer "
                f"reaches it; call diffaccel.accelerate(pipe, ...) again after changing attention processors.")
        return original(*args, **kwargs)

    def route(self, call: compat.AttentionCall) -> torch.Tensor | None:
        """The module's attention call: the sparse output (batch, heads, seq, dim), or None to let
        the user's backend compute it."""
        session = self.installed.session
        ctx = session.ctx
        if not ctx.active:
            return None
        count_backend(self.installed, call.backend)
        if ctx.grid is None:
            return None
        if call.parallel:
            raise RuntimeError(f"{self.info.name} runs under diffusers' context parallelism, enabled after "
                               f"diffaccel.accelerate; {type(self.installed.config).__name__} cannot act on a sharded "
                               f"sequence. Accelerate without it, or disable context parallelism.")
        layout = session.adapter.token_layout(self.info, ctx.grid)
        setting = self.plan(layout)
        if setting is None:
            self.installed.count("dense_calls")
            return None
        return self._sparse(layout, setting, call)

    def _sparse(self, layout, setting, call: compat.AttentionCall) -> torch.Tensor | None:
        query, key, value = call.query, call.key, call.value
        matches = (query.dim() == 4 and query.shape == key.shape and value.shape[:3] == query.shape[:3]
                   and query.shape[2] == layout.seq_len and not call.is_causal and call.dropout_p == 0.0
                   and not call.extra and mask_is_trivial(call.attn_mask))
        if not matches:  # not this module's full self-attention (or masked): leave it dense
            self.installed.count("dense_fallback_calls")
            return None
        self.installed.count("sparse_calls")
        order = ulysses_order(self.installed.session, query.shape[2], layout.text_tokens, layout.text_position != "last")
        if order is not None:  # diffusers' Ulysses stacked the ranks' [text, visual] shards: attend in global order
            order = order.to(query.device)
            out = self._attend_ordered(layout, setting, call, *(x[:, :, order] for x in (query, key, value)))
            return torch.empty_like(out).index_copy_(2, order, out)
        return self._attend_ordered(layout, setting, call, query, key, value)

    def _attend_ordered(self, layout, setting, call, query, key, value):
        text, visual = layout.text_tokens, layout.num_visual
        if text and layout.text_position == "last" and not self.takes_model_order():  # kernels take text first
            first = lambda x: torch.cat([x[:, :, visual:], x[:, :, :visual]], dim=2)  # noqa: E731
            out = self.attend(first(query), first(key), first(value), layout, setting, call)
            return torch.cat([out[:, :, text:], out[:, :, :text]], dim=2)
        return self.attend(query, key, value, layout, setting, call)


def count_backend(installed: Installed, backend: str) -> None:
    """Count one attention call computed by ``backend`` in ``installed``'s stats
    (``attention_backend``: {backend name: calls}), so stats say what ran the attention."""
    backends = installed.counters.setdefault("attention_backend", {})
    backends[backend] = backends.get(backend, 0) + 1


def count_module_backend(installed: Installed, module) -> None:
    """:func:`count_backend` for a call of attention ``module`` as a whole (reuse methods)."""
    count_backend(installed, compat.attention_backend_of(module))


def step_fraction(ctx) -> float | None:
    """Position of the current step in the call, 0 = first step; None when unknown."""
    if ctx.num_steps:
        return ctx.step / ctx.num_steps
    return None if ctx.t_norm is None else 1.0 - ctx.t_norm

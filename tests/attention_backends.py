"""Which attention backends of diffusers' dispatch run here, and a fake one for tests.

``cpu_dispatch_backends()`` enumerates the registry (it grows with diffusers releases) and keeps
the backends that compute a tiny attention on CPU; the CUDA-only ones are listed for the GPU
suite in ``eval/gpu_backends.py``.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

from diffaccel import compat

FAKE = "diffaccel_test_fake"


@functools.cache
def cpu_dispatch_backends() -> tuple[str, ...]:
    from diffusers.models import attention_dispatch as ad

    q = torch.randn(1, 8, 2, 4)
    ok = []
    for backend in ad._AttentionBackendRegistry.list_backends():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ad._check_attention_backend_requirements(backend)
                ad.dispatch_attention_fn(q, q, q, backend=backend)
        except Exception:  # a missing package, CUDA-only kernel or hub download: not a CPU backend
            continue
        ok.append(backend.value)
    return tuple(ok)


@contextlib.contextmanager
def fake_backend():
    """Register backend FAKE (exact SDPA that records (query length, key length) per call);
    yields the record list."""
    calls = []

    def fake(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((query.shape[1], key.shape[1]))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                             scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    remove = compat.register_attention_backend(FAKE, fake)
    try:
        yield calls
    finally:
        remove()


def select(denoiser, backend: str) -> None:
    """``denoiser.set_attention_backend(backend)``, which also makes it diffusers' global default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        denoiser.set_attention_backend(backend)


def restore_default(denoiser) -> None:
    select(denoiser, "native")
    denoiser.reset_attention_backend()


LSE = "diffaccel_test_cpu_lse"


@contextlib.contextmanager
def cpu_lse_backend():
    """Register backend LSE: torch's CPU flash-attention kernel, which also returns the log-sum-exp
    that diffusers' ring attention merges the ranks' partial results with (its native backend
    returns none, so ring context parallelism cannot run on a CPU otherwise)."""
    from diffusers.models import attention_dispatch as ad

    def attend(query, key, value, scale):  # (B, S, H, D) -> out (B, S, H, D), lse (B, S, H)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.0, False, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2)

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        out, lse = attend(query, key, value, scale)
        return (out, lse) if return_lse else out

    def backward_op(*args, **kwargs):
        raise NotImplementedError("inference only")

    def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _parallel_config=None):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise ValueError("the test LSE backend computes plain attention only")
        if _parallel_config is None:
            out, lse = attend(query, key, value, scale)
            return (out, lse) if return_lse else out
        return ad._templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, False, return_lse,
                                                        forward_op=forward_op, backward_op=backward_op,
                                                        _parallel_config=_parallel_config)

    remove = compat.register_attention_backend(LSE, backend, supports_context_parallel=True)
    try:
        yield LSE
    finally:
        remove()

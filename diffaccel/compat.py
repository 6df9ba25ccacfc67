"""Every touch of a private or undocumented part of diffusers or torch, in one place.

The rest of diffaccel calls only the functions below; when a diffusers or torch release moves
one of these internals, this file is the one to change. Each row names the internal used and the
versions it was checked on (the CI runs the suite on the newest and on the oldest diffusers that
``pyproject.toml`` allows).

=============================  =====================================================  ==========================
function                       private surface it relies on                           checked on
=============================  =====================================================  ==========================
:func:`hook_forward`           ``diffusers.hooks.HookRegistry`` (``register_hook``,    diffusers 0.35.2, 0.42.1
                               ``remove_hook``, ``hooks``), ``ModelHook.new_forward``
                               with ``fn_ref.original_forward``, the registry kept in
                               ``module._diffusers_hook``
:func:`invalidate_hook_caches` ``HookRegistry.invalidate_child_registries_cache``    diffusers 0.42.1 (0.35.2
                               (the cached child-registry list that                   caches nothing: no-op)
                               ``cache_context`` walks)
:func:`cache_context`          ``CacheMixin.cache_context`` where the model has it,   diffusers 0.35.2, 0.42.1
                               else ``diffusers.hooks.hooks._set_cache_context``
                               (0.42) or ``HookRegistry._set_context`` (0.35)
:func:`num_timesteps`          ``pipe._num_timesteps``, set by ``__call__`` before    diffusers 0.35.2, 0.42.1
                               the denoising loop
:func:`intercept_sdpa`         diffusers' attention processors and native attention   diffusers 0.35.2, 0.42.1;
                               dispatch look ``torch.nn.functional.                   torch 2.13
                               scaled_dot_product_attention`` up at call time, so
                               rebinding the module attribute reaches them
:func:`register_cpu_sdpa_      ``torch.ops.aten._scaled_dot_product_flash_attention_  torch 2.13
flop_formula`                  for_cpu`` (counted as 0 FLOPs by ``FlopCounterMode``),
                               ``torch.utils.flop_counter.register_flop_formula`` and
                               ``sdpa_flop_count``
:func:`dtype_kwargs`           ``diffusers.utils.deprecation_utils._resolve_dtype``    diffusers 0.35.2 (absent:
                               (present once ``torch_dtype`` was renamed ``dtype``)   torch_dtype), 0.42.1
=============================  =====================================================  ==========================

diffusers 0.35.2 is the oldest release that imports with transformers 5 (0.35.1 and older
import ``FLAX_WEIGHTS_NAME``, which transformers 5 removed); ``tests/test_compat.py`` runs on it
in CI.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

# ---- diffusers' hook registry ----------------------------------------------------------------


def hook_forward(module: torch.nn.Module, new_forward: Callable, name: str) -> Callable[[], None]:
    """Route ``module``'s forward through ``new_forward(original_forward, *args, **kwargs)``.

    Uses diffusers' HookRegistry (the mechanism behind its own cache hooks), so the hook composes
    with diffusers' hooks and CPU offload. Returns the function that removes it again and leaves
    the module exactly as found.
    """
    from diffusers.hooks import HookRegistry, ModelHook

    class _Hook(ModelHook):
        def new_forward(self, mod, *args, **kwargs):
            return new_forward(self.fn_ref.original_forward, *args, **kwargs)

    had_forward, had_registry = "forward" in vars(module), hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    _register_below_context_parallel(registry, _Hook(), name)

    def remove() -> None:
        registry.remove_hook(name, recurse=False)
        if not registry.hooks and not had_registry:
            # HookRegistry leaves an instance ``forward`` (the class method, bound) and an empty
            # registry behind; drop both, or class-swapping patchers such as tomesd stop working.
            if not had_forward:
                vars(module).pop("forward", None)
            del module._diffusers_hook

    return remove


# diffusers' context-parallel hooks (hooks/context_parallel.py) shard a module's inputs / gather its outputs.
_CONTEXT_PARALLEL_HOOKS = ("cp_input---", "cp_output---")


def _register_below_context_parallel(registry, hook, name: str) -> None:
    """Register ``hook`` beneath any context-parallel split/gather hook of the module, so it sees
    the module's inputs and outputs in the layout the module's own code does (sharded under
    context parallelism), whether ``enable_parallelism`` ran before or after diffaccel. A hook
    outside the split would mix the full input with the sharded output (cache-dit's #1094)."""
    order = list(registry._hook_order)
    first = next((i for i, n in enumerate(order) if n.startswith(_CONTEXT_PARALLEL_HOOKS)), None)
    if first is None:
        registry.register_hook(hook, name)
        return
    lifted = [(n, registry.hooks[n]) for n in order[first:]]
    for n, _ in reversed(lifted):
        registry.remove_hook(n, recurse=False)
    registry.register_hook(hook, name)
    for n, h in lifted:  # same hooks, same relative order, now above ours
        registry.register_hook(h, n)


def invalidate_hook_caches(root: torch.nn.Module) -> None:
    """Tell diffusers that hook registries under ``root`` were added or removed.

    Newer diffusers caches the list of child registries that ``cache_context`` walks; a registry
    deleted from a block would stay in that list (and keep the block alive). Older releases keep
    no such cache.
    """
    registry = getattr(root, "_diffusers_hook", None)
    invalidate = getattr(registry, "invalidate_child_registries_cache", None)
    if invalidate is not None:
        invalidate()


@contextlib.contextmanager
def cache_context(module: torch.nn.Module, name: str) -> Iterator[None]:
    """Open diffusers' per-CFG-half cache context ``name`` ("cond"/"uncond") on ``module``, as
    pipelines such as Wan do, for models that have no ``cache_context`` of their own (PixArt)."""
    opener = getattr(module, "cache_context", None)
    if opener is not None:
        with opener(name):
            yield
        return
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import hooks as diffusers_hooks

    if hasattr(diffusers_hooks, "_set_cache_context"):
        def set_context(value):
            diffusers_hooks._set_cache_context(module, None if value is None else diffusers_hooks.CacheContext(value))
    else:
        set_context = HookRegistry.check_if_exists_or_initialize(module)._set_context
    set_context(name)
    try:
        yield
    finally:
        set_context(None)


# ---- pipelines -------------------------------------------------------------------------------


def num_timesteps(pipe) -> int | None:
    """Denoising-loop length the running pipeline call announced (None outside ``__call__``)."""
    value = getattr(pipe, "_num_timesteps", None)
    return int(value) if value else None


def dtype_kwargs(dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword for ``dtype``: newer diffusers renamed ``torch_dtype`` to
    ``dtype`` (the old name warns)."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


# ---- scaled dot-product attention ------------------------------------------------------------

real_sdpa = F.scaled_dot_product_attention  # the unpatched function, for code that must bypass interception
_handler = threading.local()


def _dispatching_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    handler = getattr(_handler, "fn", None)
    if handler is None:
        return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kwargs)
    _handler.fn = None  # the handler may call SDPA itself: no recursion
    try:
        return handler(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, **kwargs)
    finally:
        _handler.fn = handler


@contextlib.contextmanager
def intercept_sdpa(handler: Callable) -> Iterator[None]:
    """While active (in this thread), ``F.scaled_dot_product_attention`` calls go to
    ``handler(q, k, v, **sdpa_kwargs)``.

    The module attribute is rebound for the duration only, so code outside the scope (and other
    threads, which see no handler) get plain SDPA. Not safe against another library rebinding the
    same attribute concurrently.
    """
    replaced = F.scaled_dot_product_attention
    installed_here = replaced is not _dispatching_sdpa
    if installed_here:
        F.scaled_dot_product_attention = _dispatching_sdpa
    previous = getattr(_handler, "fn", None)
    _handler.fn = handler
    try:
        yield
    finally:
        _handler.fn = previous
        if installed_here:
            F.scaled_dot_product_attention = replaced


# ---- FLOP counting ---------------------------------------------------------------------------


@functools.cache
def register_cpu_sdpa_flop_formula() -> None:
    """Make ``FlopCounterMode`` count the CPU flash-attention kernel, which it counts as 0 FLOPs."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        # query/key/value are (batch, heads, seq, head_dim), like the CUDA SDPA kernels.
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    try:
        register_flop_formula(op)(formula)
    except (RuntimeError, ValueError):  # already registered by torch itself
        pass

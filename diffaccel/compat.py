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


def not_picklable_message() -> str:
    return ("diffaccel: an accelerated pipeline or its denoiser cannot be pickled or torch.save'd (diffaccel's "
            "hooks on it belong to the pipeline's session). Call diffaccel.disable(pipe) first and accelerate again "
            "after loading, or save the weights only (save_pretrained / state_dict).")


def not_copyable_message() -> str:
    return ("diffaccel: an accelerated denoiser cannot be copied on its own (its hooks belong to the pipeline's "
            "session). Copy the whole pipeline (copy.deepcopy(pipe) gives an independent accelerated copy), or call "
            "diffaccel.disable(pipe) first.")


@functools.cache
def _hook_class() -> type:
    from diffusers.hooks import ModelHook

    class DiffaccelHook(ModelHook):
        """Routes the module's forward through ``fn(original_forward, *args, **kwargs)``."""

        def __init__(self, fn: Callable):
            super().__init__()
            self.fn = fn

        def new_forward(self, module, *args, **kwargs):
            return self.fn(self.fn_ref.original_forward, *args, **kwargs)

        # A pickled or copied hook would call into the original session: refuse with a clear line.
        def __reduce_ex__(self, protocol):
            raise TypeError(not_picklable_message())

        def __deepcopy__(self, memo):
            raise TypeError(not_copyable_message())

    return DiffaccelHook


def hook_forward(module: torch.nn.Module, new_forward: Callable, name: str) -> Callable[[], None]:
    """Route ``module``'s forward through ``new_forward(original_forward, *args, **kwargs)``.

    Uses diffusers' HookRegistry (the mechanism behind its own cache hooks), so the hook composes
    with diffusers' hooks and CPU offload. Returns the function that removes it again and leaves
    the module exactly as found, also when hooks registered after it stay (see :func:`_remove_hook`).
    """
    from diffusers.hooks import HookRegistry

    had_forward, had_registry = "forward" in vars(module), hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = _hook_class()(new_forward)
    try:
        registry.register_hook(hook, name)
    except BaseException:
        if not registry.hooks and not had_registry:
            vars(module).pop("_diffusers_hook", None)
        raise

    def remove() -> None:
        if registry.hooks.get(name) is not hook:
            return  # removed already (by diffusers' remove_hook with recurse, for instance)
        _remove_hook(registry, name)
        if not registry.hooks and not had_registry:
            # HookRegistry leaves an instance ``forward`` (the class method, bound) and an empty
            # registry behind; drop both, or class-swapping patchers such as tomesd stop working.
            if not had_forward:
                vars(module).pop("forward", None)
            vars(module).pop("_diffusers_hook", None)

    return remove


def _remove_hook(registry, name: str) -> None:
    """``registry.remove_hook(name, recurse=False)``, correct also when hooks follow it.

    diffusers relinks the next hook by replacing its ``forward``; for a hook with ``new_forward``
    (the next one calls ``fn_ref.original_forward``) that bypasses the next hook and keeps the
    removed one running. Point the next hook's ``original_forward`` past the removed one instead.
    """
    order = registry._hook_order
    index = order.index(name)
    if index == len(order) - 1:
        registry.remove_hook(name, recurse=False)
        return
    fn_ref, following = registry._fn_refs[index], registry._fn_refs[index + 1]
    below = fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward
    if following.original_forward is not None:
        kept_forward = following.forward
        registry.remove_hook(name, recurse=False)
        following.forward, following.original_forward = kept_forward, below
    else:
        registry.remove_hook(name, recurse=False)


# diffusers' caching techniques (``enable_cache`` / ``apply_*_cache``), by hook name and by module.
_CACHE_HOOK_PREFIXES = ("faster_cache", "fbc_", "first_block_cache", "mag_cache", "pyramid_attention_broadcast",
                        "sea_cache", "taylorseer", "text_kv_cache")
_CACHE_HOOK_MODULES = ("faster_cache", "first_block_cache", "mag_cache", "pyramid_attention_broadcast", "sea_cache",
                       "taylorseer_cache", "text_kv_cache")


def foreign_cache_hooks(root: torch.nn.Module) -> list[str]:
    """Names of diffusers' cache hooks (FirstBlockCache, PAB, FasterCache, MagCache, TaylorSeer,
    SeaCache, TextKVCache) registered on ``root`` or its submodules, plus the model's enabled cache
    config (``CacheMixin._cache_config``)."""
    found = []
    config = getattr(root, "_cache_config", None)
    if config is not None:
        found.append(f"{type(config).__name__} (enable_cache)")
    for module in root.modules():
        registry = vars(module).get("_diffusers_hook")
        for name, hook in (getattr(registry, "hooks", None) or {}).items():
            origin = type(hook).__module__.rsplit(".", 1)[-1]
            if (name.startswith(_CACHE_HOOK_PREFIXES) or origin in _CACHE_HOOK_MODULES) and name not in found:
                found.append(name)
    return found


def check_no_foreign_cache(root: torch.nn.Module, when: str) -> None:
    """Refuse to stack diffaccel on diffusers' own caching: both would decide what to skip, and
    neither knows the other's decisions (stats would count reuses that never ran)."""
    if when == "call":  # per pipeline call: the O(1) check (enable_cache sets _cache_config)
        config = getattr(root, "_cache_config", None)
        if config is None:
            return
        found = foreign_cache_hooks(root)
    else:
        found = foreign_cache_hooks(root)
        if not found:
            return
    kind = type(root).__name__
    if when == "call":
        fix = (f"Call pipe's {kind}.disable_cache() to keep diffaccel, or diffaccel.disable(pipe) to keep diffusers' "
               "cache.")
    else:
        fix = f"Call {kind}.disable_cache() first (diffaccel.AdaptiveCache / PAB / FasterCache replace them)."
    raise ValueError(f"diffaccel does not stack with diffusers' cache hooks, and this {kind} has some: "
                     f"{', '.join(found)}. {fix}")


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

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
:func:`route_attention`        a processor's ``__call__`` reaches attention through   diffusers 0.35.2, 0.42.1;
                               a module global: ``F`` (``torch.nn.functional``) or    torch 2.13
                               ``dispatch_attention_fn`` (``diffusers.models.
                               attention_dispatch``, tensors (batch, seq, heads,
                               dim), ``backend=`` / ``parallel_config=``); the
                               module attribute ``processor`` holds it; backend
                               names from ``_AttentionBackendRegistry``
:func:`register_attention_    ``AttentionBackendName`` (an Enum: a member is added),  diffusers 0.42.1
backend`                       ``_AttentionBackendRegistry.register`` / ``_backends``
                               / ``_constraints`` / ``_supported_arg_names`` /
                               ``_supports_context_parallel``
:func:`route_attention` under  ``attention_dispatch._templated_context_parallel_      diffusers 0.42.1
Ulysses                        attention`` (the all-to-alls every CP backend calls,
                               with a ``forward_op(ctx, q, k, v, ...)``), the CP
                               config's ``ring_degree`` / ``ulysses_degree``
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
import inspect
import operator
import types
from dataclasses import dataclass, field
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
        _register_below_context_parallel(registry, hook, name)
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


# ---- attention routing: processors and diffusers' attention dispatch -------------------------
#
# A method that changes the attention *math* of one module (sliding tile, mediators) must not
# copy diffusers' processors (projections, norms, RoPE, text concatenation differ per model and
# per release) and must not rebind ``torch.nn.functional.scaled_dot_product_attention`` process-
# wide (another pipeline in another thread would see it). So the module gets its own processor:
# the same object's ``__call__`` code, run with a private globals dict in which the names it
# reaches attention through (``F`` / ``scaled_dot_product_attention`` / ``dispatch_attention_fn``)
# lead to a handler. Nothing global changes; the dense call still goes to whatever the user
# selected (torch SDPA as the user may have patched it, or the dispatch backend the processor
# names), looked up at call time.

_TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, to name the backend in stats


def _dispatch_module():
    try:
        from diffusers.models import attention_dispatch
    except ImportError:  # a diffusers without attention dispatch: processors call SDPA
        return None
    return attention_dispatch


@dataclass
class AttentionCall:
    """One attention call of a routed processor, with q, k, v as (batch, heads, seq, head_dim).

    ``extra`` holds further keyword arguments that change the math (``enable_gqa=True``,
    dispatch ``attention_kwargs``); it is empty in the plain case. ``backend`` names the user's
    attention: ``"sdpa"`` (torch's), ``"sdpa=<module.function>"`` (a function the user put in its
    place) or the diffusers dispatch backend (``"native"``, ``"flash"``, ``"sage"`` ...).
    ``parallel`` is True when diffusers' context parallelism shards this call's sequence.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: Any
    dropout_p: float
    is_causal: bool
    scale: float | None
    backend: str
    attend_fn: Callable[..., torch.Tensor]
    extra: dict = field(default_factory=dict)
    parallel: bool = False

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Unmasked attention of (batch, heads, seq, dim) tensors on the user's backend (for the
        dense parts of a sparse method)."""
        # Kernels (CPU flash, flash-attn, sage) need the head dim contiguous; pooled or sliced
        # tensors may not have it.
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return self.attend_fn(q, k, v, scale)


def _sdpa_name(fn) -> str:
    if fn is _TORCH_SDPA:
        return "sdpa"
    return f"sdpa={getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _routed_sdpa(handler: Callable[[AttentionCall], torch.Tensor | None]) -> Callable:
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     **kwargs):
        sdpa = F.scaled_dot_product_attention  # at call time: the user may have installed another one
        extra = {k: v for k, v in kwargs.items() if not (k == "enable_gqa" and v is False)}
        call = AttentionCall(query, key, value, attn_mask, dropout_p, is_causal, scale, _sdpa_name(sdpa),
                             lambda q, k, v, s: sdpa(q, k, v, scale=s), extra)
        out = handler(call)
        if out is None:
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)
        return out

    return scaled_dot_product_attention


@functools.cache
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def dispatch_backend_name(backend) -> str:
    """The name of a dispatch ``backend`` argument; None means the registry's active backend."""
    if backend is None:
        backend = _dispatch_module()._AttentionBackendRegistry.get_active_backend()[0]
    return str(getattr(backend, "value", backend))


def _routed_dispatch(handler: Callable[[AttentionCall], torch.Tensor | None]) -> Callable:
    def dispatch_attention_fn(*args, **kwargs):
        real = _dispatch_module().dispatch_attention_fn  # at call time, like the processor would
        bound = _signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        backend = a.get("backend")
        known = {"query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "backend", "parallel_config"}
        extra = {k: v for k, v in a.items() if k not in known and v not in (None, False, {})}

        def attend(q, k, v, s):  # (B, H, S, D) in and out; the dispatch layout is (B, S, H, D)
            return real(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=s,
                        backend=backend).transpose(1, 2)

        parallel = a.get("parallel_config")
        if parallel is not None and _ulysses_only(parallel) and not extra and _backend_supports_cp(backend):
            return _ulysses(handler, real, a, backend, parallel)
        call = AttentionCall(a["query"].transpose(1, 2), a["key"].transpose(1, 2), a["value"].transpose(1, 2),
                             a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale"),
                             dispatch_backend_name(backend), attend, extra, parallel is not None)
        out = handler(call)
        return real(*args, **kwargs) if out is None else out.transpose(1, 2)

    return dispatch_attention_fn


def _ulysses_only(parallel_config) -> bool:
    cp = getattr(parallel_config, "context_parallel_config", None)
    return cp is not None and (cp.ring_degree or 1) == 1 and (cp.ulysses_degree or 1) > 1


def _backend_supports_cp(backend) -> bool:
    dispatch = _dispatch_module()
    registry = dispatch._AttentionBackendRegistry
    member = registry.get_active_backend()[0] if backend is None else dispatch.AttentionBackendName(backend)
    return registry._is_context_parallel_available(member)


def _ulysses(handler, real, a: dict, backend, parallel_config) -> torch.Tensor:
    """One attention call under diffusers' Ulysses, with the handler between the all-to-alls.

    Ulysses trades the sequence shard for a head shard before attention, so after diffusers' own
    all-to-all (``_templated_context_parallel_attention``, what every CP-capable backend calls)
    each rank holds the whole sequence for its heads: there a sparse method is exact. The handler
    sees that call (``parallel`` False); a dense call runs on the user's backend without the
    parallel config, as the backend's own forward op would."""
    dispatch = _dispatch_module()

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise ValueError("diffaccel's routed attention returns no log-sum-exp (ring attention needs it)")

        def attend(q, k, v, s):  # (B, H, S, D) in and out
            return real(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=s, backend=backend).transpose(1, 2)

        call = AttentionCall(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, dropout_p,
                             is_causal, scale, dispatch_backend_name(backend), attend)
        out = handler(call)
        if out is None:
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        backend=backend)
        return out.transpose(1, 2)

    def backward_op(*args, **kwargs):
        raise RuntimeError("diffaccel's sparse attention is for inference; it has no backward under context parallelism")

    return dispatch._templated_context_parallel_attention(
        a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False),
        a.get("scale"), False, False, forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel_config)


class _Functional(types.ModuleType):
    """``torch.nn.functional`` with another ``scaled_dot_product_attention``."""

    def __init__(self, sdpa: Callable):
        super().__init__(F.__name__)
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name):
        return getattr(F, name)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions share the globals
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


@functools.lru_cache(maxsize=256)
def _attention_globals(fn) -> dict[str, str]:
    """Global names through which ``fn`` reaches attention: name -> "functional" | "sdpa" | "dispatch"."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    names, scope = _code_names(code), fn.__globals__
    dispatch = _dispatch_module()
    dispatch_fn = getattr(dispatch, "dispatch_attention_fn", None)
    found = {}
    for name in names & scope.keys():
        value = scope[name]
        if value is F and "scaled_dot_product_attention" in names:
            found[name] = "functional"
        elif value is F.scaled_dot_product_attention or value is _TORCH_SDPA:
            found[name] = "sdpa"
        elif dispatch_fn is not None and value is dispatch_fn:
            found[name] = "dispatch"
    return found


def attention_route_problem(processor) -> str | None:
    """Why ``processor``'s attention cannot be routed (None when it can)."""
    if processor is None:
        return "it has no attention processor"
    if isinstance(processor, RoutedProcessor):
        return "its processor is already routed by another diffaccel method"
    if isinstance(processor, torch.nn.Module):
        return (f"its processor {type(processor).__name__} is a torch module with weights of its own (IP-Adapter, "
                f"LoRA-style processors), which diffaccel does not wrap")
    if not _attention_globals(getattr(type(processor), "__call__", None)):
        return (f"its processor {type(processor).__name__} reaches attention neither through torch's "
                f"scaled_dot_product_attention nor through diffusers' dispatch_attention_fn (xformers processors, "
                f"the classic AttnProcessor and custom kernels compute it themselves)")
    return None  # context parallelism: each method's own ``context_parallel`` support decides


class RoutedProcessor:
    """A module's attention processor with its attention call routed to a handler.

    Runs the original processor's own ``__call__`` code (bound to the original object, whose
    attributes, e.g. ``_attention_backend`` set by ``set_attention_backend``, it reads and writes),
    so diffusers' projections, norms and RoPE are untouched. Pickles and deep-copies as the
    original processor: a saved or copied model carries no diffaccel code.
    """

    def __init__(self, original, handler: Callable[[AttentionCall], torch.Tensor | None]):
        call = type(original).__call__
        scope = dict(call.__globals__)
        for name, kind in _attention_globals(call).items():
            if kind == "functional":
                scope[name] = _Functional(_routed_sdpa(handler))
            elif kind == "sdpa":
                scope[name] = _routed_sdpa(handler)
            else:
                scope[name] = _routed_dispatch(handler)
        routed = types.FunctionType(call.__code__, scope, call.__name__, call.__defaults__, call.__closure__)
        routed.__kwdefaults__, routed.__qualname__ = call.__kwdefaults__, call.__qualname__
        # Attention.forward reads ``processor.__call__``'s signature to filter keyword arguments.
        vars(self).update(original=original, __call__=types.MethodType(routed, original))

    def __call__(self, *args, **kwargs):
        return vars(self)["__call__"](*args, **kwargs)

    def __getattr__(self, name):
        if name == "original":
            raise AttributeError(name)
        return getattr(vars(self)["original"], name)

    def __setattr__(self, name, value):
        setattr(vars(self)["original"], name, value)

    def __reduce_ex__(self, protocol):
        # Rebuilt as the original: itemgetter(0)((original,)), which unpickles without diffaccel.
        return operator.itemgetter(0), ((vars(self)["original"],),)

    def __repr__(self) -> str:
        return f"RoutedProcessor({vars(self)['original']!r})"


def route_attention(module: torch.nn.Module, handler: Callable[[AttentionCall], torch.Tensor | None]):
    """Give ``module`` a :class:`RoutedProcessor` whose attention calls go to ``handler(call)``.

    ``handler`` returns the output as (batch, heads, seq, dim), or None to run the call as the
    processor would (on the user's backend). Returns ``(processor, remove)``; ``remove`` puts the
    original processor back unless the user replaced the routed one meanwhile. Raises ValueError
    naming the reason when the module's attention cannot be routed (see
    :func:`attention_route_problem`).
    """
    original = getattr(module, "processor", None)
    problem = attention_route_problem(original)
    if problem:
        raise ValueError(problem)
    routed = RoutedProcessor(original, handler)
    module.processor = routed

    def remove() -> None:
        if vars(module).get("processor") is routed:
            module.processor = original

    return routed, remove


def attention_backend_of(module: torch.nn.Module) -> str:
    """What computes ``module``'s attention, for stats: the dispatch backend name where its
    processor uses diffusers' dispatch (``"native"``, ``"flash"``), ``"sdpa"`` (or
    ``"sdpa=<function>"``) where it calls torch's SDPA, else the processor's class name
    (``"XFormersAttnProcessor"``)."""
    processor = getattr(module, "processor", None)
    processor = vars(processor)["original"] if isinstance(processor, RoutedProcessor) else processor
    kinds = set(_attention_globals(getattr(type(processor), "__call__", None)).values())
    if "dispatch" in kinds:
        return dispatch_backend_name(getattr(processor, "_attention_backend", None))
    if kinds:
        return _sdpa_name(F.scaled_dot_product_attention)
    return type(processor).__name__


def register_attention_backend(name: str, fn: Callable, constraints: list[Callable] | None = None,
                               supports_context_parallel: bool = False) -> Callable[[], None]:
    """Add an attention backend ``name`` to diffusers' dispatch (for tests and quantization
    studies): afterwards ``model.set_attention_backend(name)`` selects ``fn``, which is called with
    the dispatch keyword arguments its signature names (query, key, value as (batch, seq, heads,
    dim), attn_mask, dropout_p, is_causal, scale, ..., ``_parallel_config`` under context
    parallelism when ``supports_context_parallel``). Returns the function that removes it."""
    dispatch = _dispatch_module()
    if dispatch is None:
        raise RuntimeError("this diffusers has no attention dispatch (diffusers.models.attention_dispatch)")
    enum, registry = dispatch.AttentionBackendName, dispatch._AttentionBackendRegistry
    if name in enum._value2member_map_:
        raise ValueError(f"attention backend {name!r} exists already")
    member = str.__new__(enum, name)
    member._name_, member._value_ = name.upper(), name
    enum._member_map_[member._name_] = member
    enum._value2member_map_[name] = member
    extra = {"supports_context_parallel": True} if supports_context_parallel else {}  # absent before 0.36
    registry.register(member, constraints, **extra)(fn)

    def remove() -> None:
        for table in (registry._backends, registry._constraints, registry._supported_arg_names):
            table.pop(member, None)
        getattr(registry, "_supports_context_parallel", set()).discard(name)
        enum._member_map_.pop(member._name_, None)
        enum._value2member_map_.pop(name, None)
        if registry._active_backend is member:
            registry._active_backend = enum.NATIVE

    return remove

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

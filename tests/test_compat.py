"""diffaccel.compat: each private diffusers / torch touch does what the rest of diffaccel relies on.

CI runs this file on the newest diffusers and on the oldest one pyproject.toml allows.
"""
import copy
import pickle
import threading

import torch
import torch.nn.functional as F

import diffaccel
import tiny_pipes as tp
from diffaccel import compat


def _registries(module: torch.nn.Module) -> dict[str, object]:
    return {name: m._diffusers_hook for name, m in module.named_modules() if hasattr(m, "_diffusers_hook")}


def test_hook_forward_routes_and_removes_without_a_trace():
    block = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    plain = block(x)
    seen = []
    remove = compat.hook_forward(block, lambda original, *a, **k: seen.append(1) or 2 * original(*a, **k), "test")
    assert torch.equal(block(x), 2 * plain) and seen == [1]
    remove()
    assert torch.equal(block(x), plain)
    assert "forward" not in vars(block) and not hasattr(block, "_diffusers_hook")


def test_hook_forward_keeps_a_registry_it_did_not_create():
    block = torch.nn.Linear(4, 4)
    first = compat.hook_forward(block, lambda original, *a, **k: original(*a, **k), "first")
    second = compat.hook_forward(block, lambda original, *a, **k: -original(*a, **k), "second")
    x = torch.randn(1, 4)
    second()
    assert hasattr(block, "_diffusers_hook") and torch.equal(block(x), torch.nn.functional.linear(x, block.weight, block.bias))
    first()
    assert not hasattr(block, "_diffusers_hook")


def _child_cache_is_current(model: torch.nn.Module) -> bool:
    """Newer diffusers caches the child registries its cache contexts walk; the cache must list
    exactly the live ones (or be empty, to be rebuilt)."""
    root = getattr(model, "_diffusers_hook", None)
    cached = getattr(root, "_child_registries_cache", None)
    live = [r for name, r in _registries(model).items() if name]
    return cached is None or {id(r) for r in cached} == {id(r) for r in live}


def test_hook_changes_reach_the_registry_cache_of_cache_contexts():
    """Wan opens diffusers' cache contexts on its transformer; diffaccel's block hooks come and go
    underneath, and must neither be missed nor linger in diffusers' cached registry list."""
    pipe = tp.build("wan")
    base = tp.run("wan", pipe, steps=3)  # the cache contexts create the transformer's registry
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.5, warmup=1)])
    assert len(_registries(pipe.transformer)) > 1 and _child_cache_is_current(pipe.transformer)
    tp.run("wan", pipe, steps=3)
    diffaccel.disable(pipe)
    assert set(_registries(pipe.transformer)) <= {""} and _child_cache_is_current(pipe.transformer)
    assert torch.equal(tp.run("wan", pipe, steps=3), base)


def test_num_timesteps_is_the_loop_length_inside_a_call():
    pipe = tp.build("sd")  # PixArt announces no loop length; the session then counts the scheduler's
    seen = []
    pipe.unet.register_forward_pre_hook(lambda *a: seen.append(compat.num_timesteps(pipe)))
    tp.run("sd", pipe, steps=3)
    assert seen == [3, 3, 3]
    assert compat.num_timesteps(tp.build("pixart")) is None


def _plus_one(calls):
    def handler(call):
        calls.append(call.backend)
        return call.attend(call.query, call.key, call.value, call.scale) + 1
    return handler


def test_route_attention_reaches_sdpa_processors_only_in_that_module_and_removes_exactly():
    pipe = tp.build("pixart")
    base = tp.run("pixart", pipe, steps=2)
    modules = [m for m in pipe.transformer.modules() if hasattr(m, "processor")]
    first, original = modules[0], modules[0].processor
    calls, seen_elsewhere = [], []
    routed, remove = compat.route_attention(first, _plus_one(calls))
    assert first.processor is routed
    other = threading.Thread(target=lambda: seen_elsewhere.append(F.scaled_dot_product_attention(*[torch.ones(1, 1, 2, 2)] * 3)))
    out = tp.run("pixart", pipe, steps=2)
    other.start()
    other.join()
    assert calls and set(calls) == {"sdpa"} and not torch.equal(out, base)
    assert F.scaled_dot_product_attention is compat._TORCH_SDPA  # nothing global was touched
    assert torch.equal(seen_elsewhere[0], torch.ones(1, 1, 2, 2))
    assert pickle.loads(pickle.dumps(routed)).__class__ is type(original)  # saves as the plain processor
    assert type(copy.deepcopy(first).processor) is type(original)
    remove()
    assert first.processor is original and torch.equal(tp.run("pixart", pipe, steps=2), base)


def test_route_attention_reaches_the_dispatch_and_names_its_backend():
    pipe = tp.build("wan")
    base = tp.run("wan", pipe, steps=2)
    module = next(m for m in pipe.transformer.modules() if hasattr(m, "processor"))
    calls = []
    routed, remove = compat.route_attention(module, _plus_one(calls))
    assert not torch.equal(tp.run("wan", pipe, steps=2), base) and set(calls) == {"native"}
    pipe.transformer.set_attention_backend("_native_math")  # reaches the original through the wrapper
    calls.clear()
    tp.run("wan", pipe, steps=2)
    assert set(calls) == {"_native_math"} and module.processor is routed
    assert compat.attention_backend_of(module) == "_native_math"
    pipe.transformer.set_attention_backend("native")  # diffusers also made _native_math the global default
    pipe.transformer.reset_attention_backend()
    remove()
    assert torch.equal(tp.run("wan", pipe, steps=2), base)


def test_attention_that_cannot_be_routed_is_named():
    from diffusers.models.attention_processor import AttnProcessor, XFormersAttnProcessor

    for processor in (AttnProcessor(), XFormersAttnProcessor()):
        assert "neither through torch's scaled_dot_product_attention" in compat.attention_route_problem(processor)


def test_cpu_sdpa_is_counted_in_flops():
    from diffaccel.flops import count_flops

    q = torch.randn(1, 2, 64, 8)
    total, _ = count_flops(F.scaled_dot_product_attention, q, q, q)
    assert total == 4 * 64 * 64 * 8 * 2


def test_cache_context_opens_and_closes_on_models_without_one():
    from diffusers.hooks import HookRegistry

    pipe = tp.build("pixart")  # PixArt's transformer has no cache_context method
    with compat.cache_context(pipe.transformer, "cond"):
        assert hasattr(pipe.transformer, "_diffusers_hook")
    assert isinstance(pipe.transformer._diffusers_hook, HookRegistry)


def test_dtype_kwargs_load_without_warnings(tmp_path, recwarn):
    import diffusers

    model = diffusers.UNet2DModel(block_out_channels=(8, 8), norm_num_groups=8, sample_size=8,
                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    model.save_pretrained(tmp_path)
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path, **compat.dtype_kwargs(torch.float16))
    assert loaded.dtype == torch.float16
    assert not [w for w in recwarn if "dtype" in str(w.message)]
    assert compat.dtype_kwargs(None) == {}

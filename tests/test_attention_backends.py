"""Attention-level methods act whichever attention the user selected, and never globally.

* every backend diffusers' dispatch offers on CPU (enumerated, not hard-coded) plus a fake
  backend registered here: the sparse methods and the attention-reuse methods act, the dense
  part runs on the selected backend, stats name it, disable restores the output exactly;
* torch-SDPA processors: a user's own SDPA function (the way Sage is often installed) runs the
  dense part; ToMe's merged attention runs under SDPA's kernels and the classic processor;
* two pipelines with different sparse methods in two threads equal sequential runs;
* attention diffaccel cannot route is refused at ``accelerate`` (nothing left behind), and a
  processor swapped in after ``accelerate`` is an error at the next call, not a silent no-op.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

import diffaccel
import tiny_pipes as tp
from attention_backends import FAKE, cpu_dispatch_backends, fake_backend, restore_default, select
from diffaccel.compat import RoutedProcessor
from diffaccel.state import session_of

STA = diffaccel.SlidingTileAttention(tile=(1, 2, 2), window=(1, 1, 1), min_tokens=0, full_attention_fraction=0.25)
MEDIATOR = diffaccel.MediatorAttention(min_tokens=0, full_attention_fraction=0.25)
SIZE = {"wan": dict(height=64, width=64), "pixart": {}, "cogvideox": dict(height=64, width=64)}
METHODS = {"sliding_tile": STA, "mediator": MEDIATOR, "pab": diffaccel.PAB(spatial_interval=2, cross_interval=2),
           "faster_cache": diffaccel.FasterCache(attention_interval=2, cfg_interval=100)}
_native = {}  # method -> output under the native backend (filled by the first parametrisation)


def _run(name, pipe, steps=4):
    out = pipe(**(tp.call_kwargs(name, steps=steps) | SIZE.get(name, {})))
    return getattr(out, "frames", getattr(out, "images", None)) if not isinstance(out, tuple) else out[0]


def test_cpu_backends_are_enumerated_and_the_rest_are_gpu_cases():
    """A backend diffusers adds must land in the CPU tests or in the GPU suite's case list."""
    import importlib.util
    from pathlib import Path

    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    path = Path(__file__).parents[1] / "eval" / "gpu_backends.py"
    spec = importlib.util.spec_from_file_location("gpu_backends", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    cpu = set(cpu_dispatch_backends())
    assert {"native", "_native_math"} <= cpu
    for backend in (b.value for b in _AttentionBackendRegistry.list_backends()):
        assert backend in cpu or backend in gpu.CUDA_BACKENDS or any(tag in backend for tag in gpu.NOT_RUN), backend
    assert {"flash", "sage", "xformers"} <= {b for b, _ in gpu.cases()}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backend", ["native", *[b for b in cpu_dispatch_backends() if b != "native"], FAKE])
def test_method_acts_under_every_cpu_dispatch_backend(backend, method):
    config = METHODS[method]
    with fake_backend() as fake_calls:
        pipe = tp.build("wan")  # Wan's processors call diffusers' dispatch_attention_fn
        select(pipe.transformer, backend)
        try:
            base = _run("wan", pipe)
            plain_calls = len(fake_calls)
            fake_calls.clear()
            diffaccel.accelerate(pipe, methods=[config])
            out = _run("wan", pipe)
            accelerated_calls = list(fake_calls)
            # stats() counts FLOPs with FlopCounterMode, under which torch's eager flex attention fails
            # on CPU and stays broken for the process (torch 2.13): read the method's own counters.
            stats = session_of(pipe).last_stats["methods"][config.name]
            diffaccel.disable(pipe)
            assert torch.equal(_run("wan", pipe), base)
        finally:
            restore_default(pipe.transformer)
    assert set(stats["attention_backend"]) == {backend}, stats
    assert not torch.equal(out, base)
    if method in ("sliding_tile", "mediator"):
        assert stats["sparse_calls"] > 0 and stats["dense_calls"] > 0 and "dense_fallback_calls" not in stats
    else:
        assert stats["reused"] > 0
    if backend == FAKE:  # the dense part (full-attention steps, cross attention) ran on the user's backend
        assert accelerated_calls
        if method != "mediator":  # reused or sparse calls never reach the backend
            assert len(accelerated_calls) < plain_calls
        else:  # its inner attentions are over the mediators: fewer keys than tokens
            assert any(kv < q for q, kv in accelerated_calls)
    # The method does the same whatever computes the dense part.
    expected = _native.setdefault(method, out)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_selecting_a_backend_after_accelerate_is_followed():
    pipe = tp.build("wan")
    diffaccel.accelerate(pipe, methods=[STA])
    try:
        select(pipe.transformer, "_native_math")
        _run("wan", pipe)
        assert set(diffaccel.stats(pipe)["methods"]["sliding_tile"]["attention_backend"]) == {"_native_math"}
    finally:
        restore_default(pipe.transformer)
        diffaccel.disable(pipe)


def test_users_own_sdpa_runs_the_dense_part_of_sdpa_processors(monkeypatch):
    """PixArt's processors call torch SDPA; a user who replaced it (as Sage's README suggests) keeps it."""
    pipe = tp.build("pixart")
    diffaccel.accelerate(pipe, methods=[STA])
    seen = []
    torch_sdpa = F.scaled_dot_product_attention

    def users_sdpa(*args, **kwargs):
        seen.append(args[0].shape)
        return torch_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", users_sdpa)
    _run("pixart", pipe)
    stats = diffaccel.stats(pipe)["methods"]["sliding_tile"]
    assert stats["sparse_calls"] > 0 and seen
    assert set(stats["attention_backend"]) == {f"sdpa={__name__}.{users_sdpa.__qualname__}"}
    diffaccel.disable(pipe)


@pytest.mark.parametrize("processor", ["sdpa-math", "sdpa-flash", "classic"])
def test_tome_merges_under_each_attention(processor):
    from diffusers.models.attention_processor import AttnProcessor
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = tp.build("sd")
    if processor == "classic":
        pipe.unet.set_attn_processor(AttnProcessor())
    kernel = {"sdpa-math": SDPBackend.MATH, "sdpa-flash": SDPBackend.FLASH_ATTENTION}.get(processor)
    lengths = []
    attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn1"))
    attn.to_q.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))  # inside the processor
    with sdpa_kernel(kernel or SDPBackend.MATH):
        base = _run("sd", pipe)
        full = max(lengths)
        diffaccel.accelerate(pipe, methods=[diffaccel.ToMe(ratio=0.5, gate=False, max_downsample=None)])
        lengths.clear()
        out = _run("sd", pipe)
    stats = diffaccel.stats(pipe)["methods"]["tome"]
    diffaccel.disable(pipe)
    assert stats["merged_blocks"] > 0 and min(lengths) < full  # the processor ran on merged tokens
    assert set(stats["attention_backend"]) == {"AttnProcessor" if processor == "classic" else "sdpa"}
    assert not torch.equal(out, base)


def test_two_pipelines_in_two_threads_equal_sequential_runs():
    """Different sparse methods on two pipelines, run concurrently: nothing leaks between them."""
    jobs = [("pixart", STA), ("cogvideox", MEDIATOR), ("wan", STA)]
    pipes = []
    for name, config in jobs:
        pipe = tp.build(name)
        diffaccel.accelerate(pipe, methods=[config])
        pipes.append(pipe)
    sequential = [_run(name, pipe) for (name, _), pipe in zip(jobs, pipes)]
    barrier, results = threading.Barrier(len(jobs)), {}

    def work(i):
        barrier.wait()
        results[i] = [_run(jobs[i][0], pipes[i]) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(sequential):
        assert all(torch.equal(out, expected) for out in results[i]), jobs[i][0]
    for pipe in pipes:
        diffaccel.disable(pipe)


def _processors(denoiser):
    return [m.processor for m in denoiser.modules() if hasattr(m, "processor")]


# (context parallelism is each method's own call: ring refuses, Ulysses runs; tests/test_context_parallel.py)
@pytest.mark.parametrize("kind", ["xformers", "classic"])
@pytest.mark.parametrize("config", [STA, MEDIATOR], ids=["sliding_tile", "mediator"])
def test_attention_that_cannot_be_routed_is_refused_at_accelerate(kind, config):
    from diffusers.models.attention_processor import AttnProcessor, XFormersAttnProcessor

    pipe = tp.build("pixart")
    denoiser = pipe.transformer
    if kind == "xformers":  # what enable_xformers_memory_efficient_attention installs (no xformers needed)
        denoiser.set_attn_processor(XFormersAttnProcessor())
        message = "XFormersAttnProcessor"
    else:
        denoiser.set_attn_processor(AttnProcessor())
        message = "neither through torch's scaled_dot_product_attention"
    before = _processors(denoiser)
    with pytest.raises(ValueError, match=f"{type(config).__name__} cannot act on .*{message}"):
        diffaccel.accelerate(pipe, methods=[config])
    assert _processors(denoiser) == before and session_of(pipe) is None


def test_processor_replaced_after_accelerate_is_an_error_not_a_silent_no_op():
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = tp.build("pixart")
    diffaccel.accelerate(pipe, methods=[STA])
    assert all(isinstance(p, RoutedProcessor) for p in _processors(pipe.transformer)[::2])  # attn1 of each block
    pipe.transformer.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="replaced after diffaccel.accelerate"):
        _run("pixart", pipe)
    diffaccel.disable(pipe)
    assert not any(isinstance(p, RoutedProcessor) for p in _processors(pipe.transformer))

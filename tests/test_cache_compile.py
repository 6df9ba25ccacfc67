"""Caching under torch.compile: decisions stay eager, compiled blocks are not recompiled per step."""
import torch
from torch._dynamo.utils import counters

import diffaccel
import tiny_pipes as tp


def test_adaptive_cache_with_compiled_blocks_matches_eager_without_step_recompiles():
    torch._dynamo.reset()
    counters.clear()
    pipe = tp.build("wan")
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.5, warmup=1, max_consecutive=2)])
    eager = tp.run("wan", pipe, steps=5)
    eager_stats = diffaccel.stats(pipe)["methods"]["adaptive_cache"]
    pipe.transformer.compile_repeated_blocks(fullgraph=False)
    compiled = tp.run("wan", pipe, steps=5)  # compiles every variant (run / reuse) once
    graphs = counters["stats"]["unique_graphs"]
    again = tp.run("wan", pipe, steps=7)  # more steps, same shapes: nothing new to compile
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    assert eager_stats["reused"] > 0
    assert diffaccel.stats(pipe)["methods"]["adaptive_cache"]["reused"] > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(again).all()


def test_step_cache_with_compiled_blocks_matches_eager_without_step_recompiles():
    torch._dynamo.reset()
    counters.clear()
    pipe = tp.build("wan")
    # The rule (no mask), so the 5- and 7-step calls both skip: planned steps come from time only.
    diffaccel.accelerate(pipe, methods=[diffaccel.StepCache(threshold=0.5, retention=0.2, final_steps=1, forecast_order=1)])
    eager = tp.run("wan", pipe, steps=5)
    pipe.transformer.compile_repeated_blocks(fullgraph=False)
    compiled = tp.run("wan", pipe, steps=5)  # compiles every variant (run / skip) once
    graphs = counters["stats"]["unique_graphs"]
    again = tp.run("wan", pipe, steps=7)  # more steps, same shapes: nothing new to compile
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    assert diffaccel.stats(pipe)["methods"]["step_cache"]["reused"] > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(again).all()


def test_text_cache_with_compiled_blocks_matches_eager_without_step_recompiles():
    torch._dynamo.reset()
    counters.clear()
    pipe = tp.build("wan")
    diffaccel.accelerate(pipe, methods=[diffaccel.TextCache()])
    eager = tp.run("wan", pipe, steps=4)
    pipe.transformer.compile_repeated_blocks(fullgraph=False)
    compiled = tp.run("wan", pipe, steps=4)  # the lookup stays eager (a graph break per text projection)
    graphs = counters["stats"]["unique_graphs"]
    again = tp.run("wan", pipe, steps=6)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    assert diffaccel.stats(pipe)["methods"]["text_cache"]["reused"] > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(again).all()

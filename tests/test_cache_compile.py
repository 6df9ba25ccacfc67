"""Caching under torch.compile: decisions stay eager, compiled blocks are not recompiled per step."""
import pytest
import torch
from torch._dynamo.utils import counters

import diffaccel
import tiny_pipes as tp

CASES = {
    "adaptive_cache": lambda: diffaccel.AdaptiveCache(threshold=0.5, warmup=1, max_consecutive=2),
    # The rule (no mask), so the 5- and 7-step calls both skip: planned steps come from time only.
    "step_cache": lambda: diffaccel.StepCache(threshold=0.5, retention=0.2, final_steps=1, forecast_order=1),
    # The lookup stays eager: a graph break around each text projection, no recompile.
    "text_cache": lambda: diffaccel.TextCache(),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_blocks_match_eager_without_step_recompiles(name):
    torch._dynamo.reset()
    counters.clear()
    pipe = tp.build("wan")
    diffaccel.accelerate(pipe, methods=[CASES[name]()])
    eager = tp.run("wan", pipe, steps=5)
    assert diffaccel.stats(pipe)["methods"][name]["reused"] > 0
    pipe.transformer.compile_repeated_blocks(fullgraph=False)
    compiled = tp.run("wan", pipe, steps=5)  # compiles every variant (run / reuse) once
    graphs = counters["stats"]["unique_graphs"]
    again = tp.run("wan", pipe, steps=7)  # more steps, same shapes: nothing new to compile
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    assert diffaccel.stats(pipe)["methods"][name]["reused"] > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(again).all()

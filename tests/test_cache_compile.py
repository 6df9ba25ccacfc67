"""Caching under torch.compile: decisions stay eager, and the compiled blocks are one graph for every
block and every step (no recompile per step, none per block)."""
import pytest
import torch
from torch._dynamo.utils import counters

import diffaccel
import diffusers
import tiny_pipes as tp

CASES = {
    "adaptive_cache": lambda: diffaccel.AdaptiveCache(threshold=0.5, warmup=1, max_consecutive=2),
    # The rule (no mask), so the 5- and 7-step calls both skip: planned steps come from time only.
    "step_cache": lambda: diffaccel.StepCache(threshold=0.5, retention=0.2, final_steps=1, forecast_order=1),
    # Inside compiled blocks nothing is hooked; the text projection outside them is still reused.
    "text_cache": lambda: diffaccel.TextCache(),
}


def _wan(layers: int):
    pipe = tp.build("wan")
    torch.manual_seed(0)
    config = {**pipe.transformer.config, "num_layers": layers}
    pipe.transformer = diffusers.WanTransformer3DModel.from_config(config).eval()
    return pipe


@pytest.mark.parametrize("name", CASES)
def test_compiled_blocks_match_eager_with_one_graph_for_all_blocks_and_steps(name):
    graphs = []
    for layers in (2, 3):
        torch._dynamo.reset()
        counters.clear()
        pipe = _wan(layers)
        diffaccel.accelerate(pipe, methods=[CASES[name]()])
        eager = tp.run("wan", pipe, steps=5)
        assert diffaccel.stats(pipe)["methods"][name]["reused"] > 0
        pipe.transformer.compile_repeated_blocks(fullgraph=False)
        compiled = tp.run("wan", pipe, steps=5)  # compiles every variant (run / reuse) once
        graphs.append(counters["stats"]["unique_graphs"])
        again = tp.run("wan", pipe, steps=7)  # more steps, same shapes: nothing new to compile
        assert graphs[-1] > 0 and counters["stats"]["unique_graphs"] == graphs[-1]
        assert diffaccel.stats(pipe)["methods"][name]["reused"] > 0
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(again).all()
    assert graphs[0] == graphs[1]  # a third block compiles nothing new


@pytest.mark.parametrize("forecast, cfg", [(dict(), False), (dict(forecast_order=1, guard=0.15), False), (dict(), True)],
                         ids=["reuse", "forecast", "with CfgCache"])
def test_deepcache_in_a_compiled_unet_compiles_nothing_new_for_more_steps(forecast, cfg):
    """The whole U-Net compiled with DeepCache's hooks inside: the forecast's per-step scalar is no
    guard, so a longer call adds no graph, and the output is the eager one. With CfgCache the U-Net
    sees batches of one and two CFG halves: one graph each, still none new for a longer call."""
    torch._dynamo.reset()
    counters.clear()
    pipe = tp.build("sd")
    extra = [diffaccel.CfgCache(interval=3)] if cfg else []
    diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=3, **forecast), *extra])
    eager = tp.run("sd", pipe, steps=8)
    pipe.unet.compile(backend="eager")
    compiled = tp.run("sd", pipe, steps=8)
    graphs = counters["stats"]["unique_graphs"]
    tp.run("sd", pipe, steps=12)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    assert diffaccel.stats(pipe)["methods"]["deepcache"]["reused"] > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["balanced", "fast"])
def test_presets_planned_from_a_profile_compile_nothing_new_for_other_calls(preset):
    """DeepCache(min_psnr=...) on the bundled U-Net: the verified run at the profile's 20 steps (balanced: a
    listed schedule with a damped forecast; fast: composed with CfgCache), the rule at 15; the compiled
    U-Net matches eager and a call of the other kind adds no graph."""
    torch._dynamo.reset()
    counters.clear()
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    diffaccel.accelerate(pipe, preset=preset)

    def run(steps):
        out = pipe("a red circle in the center on a black background", num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
        return out, diffaccel.stats(pipe)["methods"]["deepcache_psnr_schedule"]["planned"]

    eager, planned = run(20)
    assert planned
    pipe.unet.compile(backend="eager")
    compiled, _ = run(20)
    graphs = counters["stats"]["unique_graphs"]
    _, planned = run(15)
    assert not planned and graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    diffaccel.disable(pipe)

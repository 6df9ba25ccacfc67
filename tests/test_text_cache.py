"""TextCache: text-only modules computed once per call, outputs bit-identical."""
import pytest
import torch

import diffaccel
import tiny_pipes as tp
from diffaccel.api import session_of
from diffaccel.methods.text_cache import TextCache, _Entry

# Family -> what its adapter names as text-only (text projection, cross-attention keys / values).
WITH_TEXT = ["sd", "sdxl", "pixart", "sd3", "flux", "cogvideox", "latte", "wan", "ltx"]


@pytest.mark.parametrize("name", WITH_TEXT)
def test_outputs_are_bit_identical_and_modules_are_reused(name):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=4)
    diffaccel.accelerate(pipe, methods=[TextCache()])
    assert torch.equal(tp.run(name, pipe, steps=4), base)
    stats = diffaccel.stats(pipe)
    m = stats["methods"]["text_cache"]
    assert m["modules"] > 0 and m["reused"] > 0
    # Every module computes once per distinct input (2 CFG halves at most) and is reused at every later step.
    assert m["computed"] <= 2 * m["modules"]
    assert stats["flops_saved_fraction"] > 0
    assert session_of(pipe).installed[0].entries == {}  # nothing outlives the call
    diffaccel.disable(pipe)
    assert torch.equal(tp.run(name, pipe, steps=4), base)


@pytest.mark.parametrize("name", ["dit", "hunyuan"])
def test_denoisers_without_text_only_modules_are_refused_or_left_alone(name):
    pipe = tp.build(name)
    with pytest.raises(ValueError, match="found nothing to cache.*Leave text_cache out"):
        diffaccel.accelerate(pipe, methods=[TextCache()])
    base = torch.as_tensor(tp.run(name, pipe, steps=3))  # DiT's latents come back as numpy
    diffaccel.accelerate(pipe, methods=[TextCache(required=False)])
    assert torch.equal(torch.as_tensor(tp.run(name, pipe, steps=3)), base)
    assert diffaccel.stats(pipe)["methods"]["text_cache"]["modules"] == 0


@pytest.mark.parametrize("name, other", [("pixart", diffaccel.StepCache(mask=(True, False, True, False, True))),
                                         ("wan", diffaccel.StepCache(mask=(True, True, False, True, True))),
                                         ("sd", diffaccel.DeepCache(interval=2)),
                                         ("sd", diffaccel.ToMe(ratio=0.5))])
def test_composed_with_a_cache_it_changes_nothing_but_the_work(name, other):
    alone = tp.build(name)
    diffaccel.accelerate(alone, methods=[other])
    expected = tp.run(name, alone, steps=5)
    flops_alone = diffaccel.stats(alone)["flops_saved_fraction"]
    both = tp.build(name)
    diffaccel.accelerate(both, methods=[TextCache(), other])
    assert torch.equal(tp.run(name, both, steps=5), expected)
    assert diffaccel.stats(both)["flops_saved_fraction"] > flops_alone


def test_nothing_crosses_calls_prompts_or_batch_items():
    pipe = tp.build("pixart")
    plain = [tp.run("pixart", pipe, seed=s, batch=b) for s, b in ((0, 1), (1, 2), (2, 1))]
    diffaccel.accelerate(pipe, methods=[TextCache()])
    for (s, b), expected in zip(((0, 1), (1, 2), (2, 1)), plain):  # new prompt embeddings and batch sizes each call
        assert torch.equal(tp.run("pixart", pipe, seed=s, batch=b), expected)


def test_inference_mode_and_grad_mode_stay_exact():
    pipe = tp.build("pixart")
    base = tp.run("pixart", pipe, steps=4)
    diffaccel.accelerate(pipe, methods=[TextCache()])
    with torch.inference_mode():  # no version counters: entries compare a kept copy
        assert torch.equal(tp.run("pixart", pipe, steps=4), base)
    assert diffaccel.stats(pipe)["methods"]["text_cache"]["reused"] > 0
    with torch.enable_grad():  # the pipeline turns grad off itself; a denoiser call with grad caches nothing
        session = session_of(pipe)
        installed = session.installed[0]
        session.ctx.running = True
        try:
            lin = torch.nn.Linear(4, 4)
            x = torch.randn(2, 4)
            assert installed._lookup("x", lin, x) is not installed._lookup("x", lin, x)
        finally:
            session.ctx.running = False
        assert installed.entries == {}


def test_an_entry_is_stale_once_its_input_or_output_changes_in_place():
    with torch.no_grad():
        lin = torch.nn.Linear(4, 3)
        x = torch.randn(2, 5, 4)
        entry = _Entry([x], lin(x))
        assert entry.matches([x]) and entry.matches([x.view(2, 5, 4)]) and entry.result() is entry.output
        assert not entry.matches([x.clone()])  # same values, another tensor: not judged without reading
        assert not entry.matches([x[:1]])
        assert _Entry([x], lin(x), others=((None,), (("scale", 1.0),))).matches([x], ((None,), (("scale", 1.0),)))
        assert not _Entry([x], lin(x), others=((None,), (("scale", 1.0),))).matches([x], ((None,), (("scale", 2.0),)))
        x.add_(1)
        assert not entry.matches([x])
        y = torch.randn(2, 4)
        entry = _Entry([y], lin(y))
        entry.output.mul_(2)
        assert entry.result() is None
    with torch.inference_mode():
        z = torch.randn(2, 4)
        entry = _Entry([z], lin(z))
        out = entry.result()
        assert entry.matches([z]) and out is not entry.output and torch.equal(out, entry.output)
        z.add_(1)
        assert not entry.matches([z])


def test_entries_per_module_are_capped_and_the_bad_settings_refused():
    with pytest.raises(ValueError, match="max_entries"):
        TextCache(max_entries=0).validate()
    with pytest.raises(ValueError, match="True or False"):
        TextCache(required="yes").validate()
    pipe = tp.build("pixart")
    diffaccel.accelerate(pipe, methods=[TextCache(max_entries=2)])
    session = session_of(pipe)
    installed = session.installed[0]
    session.ctx.running = True
    try:
        lin = torch.nn.Linear(4, 4)
        with torch.no_grad():
            inputs = [torch.randn(1, 4) for _ in range(3)]
            for x in inputs:
                installed._lookup("p", lin, x)
        assert [e.inputs[0] is x for e, x in zip(installed.entries["p"], inputs[1:])] == [True, True]
    finally:
        session.ctx.running = False


# The tiny sd's 16x16 latent holds 256 visual tokens for 8 text ones: under the presets' ratio, off.
@pytest.mark.parametrize("name, preset, caches", [("pixart", "balanced", True), ("sd", "fast", False),
                                                  ("wan", "quality", True)])
def test_presets_include_it_and_keep_their_outputs(name, preset, caches):
    pipe = tp.build(name)
    family = session_of(diffaccel.accelerate(pipe, preset=preset)).adapter.family
    rest = [m for m in diffaccel.presets.preset_methods(preset, family) if m.name != "text_cache"]
    assert len(rest) == len(diffaccel.presets.preset_methods(preset, family)) - 1
    with_cache = tp.run(name, pipe, steps=6)
    stats = diffaccel.stats(pipe)["methods"]["text_cache"]
    assert (stats.get("reused", 0) > 0) == caches and (stats["hooked"] > 0) == caches
    diffaccel.accelerate(pipe, methods=rest)  # the same preset without TextCache (ToMe included on sd)
    assert torch.equal(tp.run(name, pipe, steps=6), with_cache)


def test_min_text_ratio_caches_only_calls_with_long_text():
    pipe = tp.build("pixart")
    base = tp.run("pixart", pipe, steps=3)
    for ratio, caches in ((0.01, True), (1000.0, False)):  # tiny pixart: TXT text tokens, a few visual ones
        diffaccel.accelerate(pipe, methods=[TextCache(min_text_ratio=ratio)])
        assert torch.equal(tp.run("pixart", pipe, steps=3), base)
        stats = diffaccel.stats(pipe)["methods"]["text_cache"]
        assert (stats.get("reused", 0) > 0) == caches and (stats.get("computed", 0) > 0) == caches
    with pytest.raises(ValueError, match="min_text_ratio"):
        TextCache(min_text_ratio=-1).validate()

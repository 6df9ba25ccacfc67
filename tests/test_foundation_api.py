"""accelerate / disable / stats contracts, call state, and bad input, on every family."""
import json

import numpy as np
import pytest
import torch

import diffaccel
import tiny_pipes as T
from diffaccel.api import session_of

ALL = list(T.BUILDERS)


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("preset", list(diffaccel.PRESETS))
def test_disable_is_bit_identical_and_accelerate_replaces(name, preset):
    pipe = T.build(name)
    base = T.run(name, pipe, batch=1, steps=4)
    diffaccel.accelerate(pipe, preset=preset)
    once = T.run(name, pipe, steps=4)
    assert _same(once, T.run(name, pipe, steps=4)), "same seed twice must give the same output"
    diffaccel.accelerate(pipe, preset=preset)  # replaces, never stacks
    assert _same(once, T.run(name, pipe, steps=4))
    assert len(pipe.__class__.__mro__) == len(type(T.build(name)).__mro__) + 1
    diffaccel.disable(pipe)
    assert type(pipe).__name__ == type(T.build(name)).__name__ and session_of(pipe) is None
    assert _same(base, T.run(name, pipe, steps=4)), "disable() must restore bit-identical outputs"


def test_accelerated_pipeline_keeps_its_class_name_when_saved(tmp_path):
    pipe = diffaccel.accelerate(T.build("pixart"))
    assert isinstance(pipe, type(T.build("pixart")))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "PixArtAlphaPipeline"


def _trace(name, scheduler=None, steps=4, guidance=4.0):
    pipe = T.build(name)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    T.observe(pipe)
    T.run(name, pipe, steps=steps, guidance=guidance)
    return pipe, session_of(pipe).ctx.trace


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_call_state_one_call_per_step(scheduler):
    import diffusers

    pipe, trace = _trace("sd", getattr(diffusers, scheduler), steps=5)
    assert [s for s, _, _ in trace] == [0, 1, 2, 3, 4]
    assert all(b == 0 for _, b, _ in trace)
    times = [t for _, _, t in trace]
    assert all(0.0 <= t <= 1.0 for t in times) and times == sorted(times, reverse=True)
    assert diffaccel.stats(pipe)["denoiser_calls"] == 5


def test_call_state_repeated_timesteps_heun():
    """Heun calls the denoiser twice per sigma: each loop iteration is its own step."""
    import diffusers

    pipe, trace = _trace("sd", diffusers.HeunDiscreteScheduler, steps=3)
    assert [s for s, _, _ in trace] == list(range(len(pipe.scheduler.timesteps)))
    assert len(trace) == 2 * 3 - 1


def test_call_state_flow_matching_and_separate_cfg():
    pipe, trace = _trace("wan", steps=3)
    assert [(s, b) for s, b, _ in trace] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert trace[0][2] == pytest.approx(1.0, abs=1e-3) and trace[0][2] == trace[1][2]
    _, no_cfg = _trace("wan", steps=3, guidance=1.0)
    assert [(s, b) for s, b, _ in no_cfg] == [(0, 0), (1, 0), (2, 0)]


def test_flux_time_is_sigma():
    _, trace = _trace("flux", steps=3)
    assert trace[0][2] == pytest.approx(1.0, abs=1e-3) and 0 < trace[-1][2] < 1


def test_state_reset_between_calls_and_steps_change():
    pipe, _ = _trace("sd", steps=4)
    T.run("sd", pipe, steps=2)
    assert [s for s, _, _ in session_of(pipe).ctx.trace] == [0, 1]
    assert diffaccel.stats(pipe)["steps"] == 2


def test_direct_denoiser_call_outside_pipeline_is_passthrough():
    pipe = T.observe(T.build("pixart"))
    x = torch.randn(1, 4, 16, 16)
    kw = dict(encoder_hidden_states=torch.randn(1, 8, 16), timestep=torch.tensor([5]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        a = pipe.transformer(x, **kw).sample
    diffaccel.disable(pipe)
    with torch.no_grad():
        assert torch.equal(a, pipe.transformer(x, **kw).sample)
    assert session_of(pipe) is None


def test_stats_is_plain_dict():
    pipe = diffaccel.accelerate(T.build("sd"), methods=[diffaccel.Instrument()])
    assert diffaccel.stats(pipe)["denoiser_calls"] == 0
    T.run("sd", pipe, steps=3)
    s = diffaccel.stats(pipe)
    json.dumps(s)
    assert s["denoiser_calls"] == 3 and s["steps"] == 3 and s["family"] == "unet"
    assert s["flops_saved_fraction"] == 0.0
    assert s["methods"]["instrument"]["records"] > 0


def test_instrument_records_per_step_block_changes():
    pipe = T.build("pixart")
    with diffaccel.instrument.record(pipe, targets=("blocks", "attention", "output")) as rec:
        T.run("pixart", pipe, steps=4)
    assert session_of(pipe) is None
    blocks = [r for r in rec.rows if r["kind"] == "block"]
    assert {r["step"] for r in blocks} == {0, 1, 2, 3}
    later = [r for r in blocks if r["step"] > 0]
    assert later and all(r["rel_l1"] > 0 and -1 <= r["cosine"] <= 1 and "residual_rel_l1" in r for r in later)
    assert all("rel_l1" not in r for r in blocks if r["step"] == 0)
    assert {r["kind"] for r in rec.rows} >= {"block", "spatial", "cross", "output"}


def test_stats_counts_flops_saved_from_skipped_modules():
    """flops_saved_fraction: a method reporting a skipped block is charged that block's FLOPs."""
    from diffaccel.flops import count_flops

    pipe = T.observe(T.build("pixart"))
    T.run("pixart", pipe, steps=2)
    session = session_of(pipe)
    costs = session.module_costs()
    assert costs[""] > 0 and costs["transformer_blocks.0"] > 0
    frac = diffaccel.flops.flops_saved_fraction(session, {"x": {"skipped_modules": {"transformer_blocks.0": 2}}})
    assert frac == pytest.approx(2 * costs["transformer_blocks.0"] / (2 * costs[""]))
    q = torch.randn(1, 2, 64, 8)
    total, _ = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert total == 4 * 64 * 64 * 8 * 2, "CPU SDPA must be counted (torch counts it as 0 by default)"


# ---- bad input -------------------------------------------------------------------------

def test_non_pipeline_object():
    with pytest.raises(TypeError, match="expects a diffusers pipeline.*got an object of type Linear"):
        diffaccel.accelerate(torch.nn.Linear(2, 2))


def test_unsupported_pipeline_names_what_it_found():
    import diffusers

    pipe = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(block_out_channels=(8, 8), norm_num_groups=8,
                                                              down_block_types=("DownBlock2D",) * 2,
                                                              up_block_types=("UpBlock2D",) * 2, sample_size=8),
                                  scheduler=diffusers.DDPMScheduler())
    with pytest.raises(TypeError, match=r"does not support DDPMPipeline with a UNet2DModel denoiser.*unet: StableDiffusionPipeline"):
        diffaccel.accelerate(pipe)


def test_unknown_preset_and_method():
    pipe = T.build("sd")
    with pytest.raises(ValueError, match=r"Unknown preset 'turbo'. Choose one of: quality, balanced, fast"):
        diffaccel.accelerate(pipe, preset="turbo")
    with pytest.raises(ValueError, match=r"Unknown method 'warpdrive'. Known methods: .*instrument"):
        diffaccel.accelerate(pipe, methods=["warpdrive"])
    with pytest.raises(TypeError, match="method configs such as diffaccel.DeepCache"):
        diffaccel.accelerate(pipe, methods=[42])
    with pytest.raises(ValueError, match="either methods=, preset="):
        diffaccel.accelerate(pipe, methods=[], preset="fast")
    with pytest.raises(ValueError, match="not accelerated"):
        diffaccel.stats(pipe)
    assert session_of(pipe) is None

import pytest
import torch

import diffaccel
import tiny_pipes as tp
from cache_harness import denoise, inputs, pipe_for_harness
from diffaccel.methods.faster_cache import _low_pass

OFF = dict(attention_interval=1, cfg_interval=1)


@pytest.mark.parametrize("name", ["pixart", "wan"])
def test_all_off_reproduces_original_exactly(name):
    pipe = tp.build(name)
    base = tp.run(name, pipe, steps=5)
    diffaccel.accelerate(pipe, methods=[diffaccel.FasterCache(**OFF)])
    assert torch.equal(tp.run(name, pipe, steps=5), base)


def test_low_pass_equals_the_centred_fftshift_disc():
    # Reference: the paper's formulation, shifting the spectrum and masking a centred disc.
    x = torch.randn(2, 3, 5, 12, 10)
    h, w = x.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= (min(h, w) // 5) ** 2
    reference = torch.fft.ifft2(torch.fft.ifftshift(spectrum * disc, dim=(-2, -1))).real
    torch.testing.assert_close(_low_pass(x, None), reference, rtol=1e-5, atol=1e-5)


def test_low_pass_of_packed_tokens_uses_the_grid():
    from diffaccel.pipelines import TokenGrid

    image = torch.randn(1, 4, 10, 15)
    packed = image.permute(0, 2, 3, 1).reshape(1, 150, 4)  # (B, H*W, C) as Flux passes it
    low = _low_pass(packed, TokenGrid(1, 10, 15))
    torch.testing.assert_close(low, _low_pass(image, None).permute(0, 2, 3, 1).reshape(1, 150, 4), rtol=1e-5, atol=1e-5)


def test_cfg_cache_rebuilds_uncond_from_stored_frequency_difference_without_compounding():
    pipe = pipe_for_harness()
    x, c, u = inputs(1)
    fc = diffaccel.FasterCache(attention_interval=1, cfg_interval=3, cfg_range=(0.0, 1.0), alpha_low=1.3,
                               alpha_high=0.7, low_freq_range=(0.0, 1.0), high_freq_range=(0.0, 1.0))
    diffaccel.accelerate(pipe, methods=[fc])
    record = []
    denoise(pipe, x, c, u, separate=False, steps=9, record=record)
    last_full, full = -10, []
    for step, t in enumerate(pipe.scheduler.timesteps.tolist()):
        if not (0.0 < t / 1000 < 1.0) or step - last_full >= 3:
            last_full = step
            full.append(step)
    reused = 9 - len(full)
    assert reused >= 4
    assert diffaccel.stats(pipe)["methods"]["faster_cache"] == {"cfg_computed": len(full), "cfg_reused": reused, "skipped_modules": {"": reused / 2}}
    for step, (uo, co) in enumerate(record):
        if step in full:  # full step: store the difference
            delta = uo - co
            low = _low_pass(delta, None)
        else:  # every skipped step uses the same weights, not powers of them
            torch.testing.assert_close(uo - co, 1.3 * low + 0.7 * (delta - low), rtol=1e-4, atol=1e-5)


def test_separate_cfg_pipeline_skips_unconditional_calls():
    pipe = tp.build("wan")
    runs = []
    pipe.transformer.blocks[0].register_forward_pre_hook(lambda *a: runs.append(1))
    base = tp.run("wan", pipe, steps=10)
    runs.clear()
    diffaccel.accelerate(pipe, methods=[diffaccel.FasterCache(attention_interval=1, cfg_interval=5)])
    out = tp.run("wan", pipe, steps=10)
    block_runs = len(runs)  # before stats(), whose FLOP count runs one more forward
    m = diffaccel.stats(pipe)["methods"]["faster_cache"]
    assert m["cfg_reused"] > 0 and block_runs == 20 - m["cfg_reused"]
    assert (out - base).abs().max() < 0.2 * base.abs().max()


def test_attention_is_reused_when_the_unconditional_branch_runs_too():
    # diffusers' FasterCache only reuses attention in calls where the uncond half was dropped.
    pipe = tp.build("cogvideox")
    diffaccel.accelerate(pipe, methods=[diffaccel.FasterCache(attention_interval=2, cfg_interval=1)])
    tp.run("cogvideox", pipe, steps=10)
    s = diffaccel.stats(pipe)
    assert s["methods"]["faster_cache"]["reused"] > 0 and s["flops_saved_fraction"] > 0.1


def test_separate_cfg_calls_match_batched_cfg_with_attention_and_cfg_cache():
    pipe = pipe_for_harness()
    x, c, u = inputs(2)
    plain = denoise(pipe, x, c, u, separate=False)
    diffaccel.accelerate(pipe, methods=[diffaccel.FasterCache(attention_interval=2, cfg_interval=3, cfg_range=(0.0, 0.9))])
    batched = denoise(pipe, x, c, u, separate=False)
    separate = denoise(pipe, x, c, u, separate=True)
    assert (batched - plain).abs().max() > 1e-3
    torch.testing.assert_close(batched, separate, rtol=1e-3, atol=1e-4)
    alone = denoise(pipe, x[:1], c[:1], u[:1], separate=False)
    torch.testing.assert_close(batched[:1], alone, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_interval=0), "attention_interval"),
        (dict(cfg_interval=0), "cfg_interval"),
        (dict(extrapolation=1.5), "extrapolation"),
        (dict(cfg_range=(0.5, 0.5)), "cfg_range"),
        (dict(alpha_low=-1.0), "alpha_low"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffaccel.accelerate(tp.build("pixart"), methods=[diffaccel.FasterCache(**kwargs)])


def test_wrong_family_is_refused():
    with pytest.raises(ValueError, match="FasterCache cannot accelerate pipelines of the unet family"):
        diffaccel.accelerate(tp.build("sd"), methods=[diffaccel.FasterCache()])

"""AdaptiveCache(noise_floor=...): the per-step change that quantization noise alone adds is
subtracted before it accumulates (eval/quantized_noise_floor.py measures it)."""
import pytest
import torch

import diffaccel
import tiny_pipes as tp


def _reused(pipe, name, **config):
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(warmup=2, max_consecutive=3, **config)])
    out = tp.run(name, pipe, steps=8)
    reused = diffaccel.stats(pipe)["methods"]["adaptive_cache"].get("reused", 0)
    diffaccel.disable(pipe)
    return out, reused


def test_floor_makes_reuse_at_least_as_frequent_and_zero_changes_nothing():
    pipe = tp.build("wan")
    plain, plain_reused = _reused(pipe, "wan", threshold=0.05)
    same, same_reused = _reused(pipe, "wan", threshold=0.05, noise_floor=0.0)
    assert torch.equal(plain, same) and plain_reused == same_reused
    counts = [_reused(pipe, "wan", threshold=0.05, noise_floor=f)[1] for f in (0.01, 0.1, 1e9)]
    assert [plain_reused, *counts] == sorted([plain_reused, *counts])
    # a floor above every change: only warm-up and max_consecutive force computes (steps 2-4, 6-7 reuse)
    branches = 2  # Wan calls the denoiser once per CFG half
    assert counts[-1] == 5 * branches and plain_reused < counts[-1]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_floor_is_named(bad):
    with pytest.raises(ValueError, match="noise_floor"):
        diffaccel.accelerate(tp.build("pixart"), methods=[diffaccel.AdaptiveCache(noise_floor=bad)])

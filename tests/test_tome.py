"""ToMe: parity with tomesd, the merge itself against a dense reference, the token-count gate,
reproducible randomness, K/V-only mode, PixArt, composition with DeepCache, bad input."""
from __future__ import annotations

import diffusers as D
import pytest
import torch

import diffaccel
from diffaccel.methods import tome as tome_module
from diffaccel.methods.deepcache import DeepCache
from diffaccel.methods.tome import ToMe, TokenMerge, split_tokens
from tiny_pipes import build, run
from unet_cases import call, deep_sd, item_inputs

tomesd = pytest.importorskip("tomesd")


def ours(pipe, *methods):
    return diffaccel.accelerate(pipe, methods=list(methods))


def tome_stats(pipe):
    return diffaccel.stats(pipe)["methods"]["tome"]


# ---- the merge itself ---------------------------------------------------------------------
def dense_reference(metric, x, h, w, r):
    """ToMe's definition, token by token: top-left destinations, mean merge, copy back."""
    B, N, C = x.shape
    dst = [i * w + j for i in range(0, h - h % 2, 2) for j in range(0, w - w % 2, 2)]
    src = [t for t in range(N) if t not in dst]
    out = torch.empty_like(x)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    for b in range(B):
        sim = unit[b, src] @ unit[b, dst].T
        best, match = sim.max(-1)
        merged = best.argsort(descending=True)[:r].tolist()
        groups = {d: [d] for d in dst}
        for k in merged:
            groups[dst[match[k]]].append(src[k])
        for members in groups.values():
            out[b, members] = x[b, members].mean(0)
        for k in set(range(len(src))) - set(merged):
            out[b, src[k]] = x[b, src[k]]
    return out


@pytest.mark.parametrize("h,w,r", [(8, 8, 32), (7, 6, 20), (4, 4, 0)])
def test_merge_then_unmerge_matches_dense_reference(h, w, r):
    g = torch.Generator().manual_seed(h * w + r)
    metric, x = torch.randn(2, h * w, 5, generator=g), torch.randn(2, h * w, 3, generator=g)
    plan = TokenMerge(metric, *split_tokens(h, w, 2, 2, None), r)
    merged = plan.merge(x)
    assert merged.shape == (2, h * w - min(r, h * w - (h // 2) * (w // 2)), 3)
    torch.testing.assert_close(plan.unmerge(merged), dense_reference(metric, x, h, w, r))


def test_random_destinations_one_per_cell():
    offsets = torch.randint(4, (3, 4), generator=torch.Generator().manual_seed(0))
    dst, src = split_tokens(6, 8, 2, 2, offsets)
    cells = {(int(t) // 8 // 2, int(t) % 8 // 2) for t in dst}
    assert len(dst) == 12 and len(cells) == 12 and len(src) == 36
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(48))


# ---- parity with tomesd -----------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    dict(ratio=0.5),
    dict(ratio=0.7, merge_crossattn=True, merge_mlp=True),
    dict(ratio=0.3, max_downsample=2),
])
def test_matches_tomesd(settings):
    ref_pipe = deep_sd()
    tomesd.apply_patch(ref_pipe, use_rand=False, **settings)
    reference = call(ref_pipe, [item_inputs(0)], steps=3)
    pipe = ours(deep_sd(), ToMe(use_rand=False, **settings))
    out = call(pipe, [item_inputs(0)], steps=3)
    assert (out - reference).abs().max().item() <= 1e-4
    assert tome_stats(pipe)["merged_blocks"] > 0 and diffaccel.stats(pipe)["flops_saved_fraction"] > 0
    assert (out - call(deep_sd(), [item_inputs(0)], steps=3)).abs().max().item() > 1e-3


def test_composes_with_deepcache_like_both_references():
    from DeepCache import DeepCacheSDHelper

    ref_pipe = deep_sd()
    tomesd.apply_patch(ref_pipe, ratio=0.5, use_rand=False)
    helper = DeepCacheSDHelper(pipe=ref_pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    reference = call(ref_pipe, [item_inputs(1)], steps=5)
    pipe = ours(deep_sd(), DeepCache(interval=2), ToMe(ratio=0.5, use_rand=False))
    out = call(pipe, [item_inputs(1)], steps=5)
    assert (out - reference).abs().max().item() <= 1e-4
    methods = diffaccel.stats(pipe)["methods"]
    assert methods["deepcache"]["reused"] == 2 and methods["tome"]["merged_blocks"] > 0


# ---- state contracts --------------------------------------------------------------------
def test_random_choice_reproducible_and_batch_independent():
    pipe = ours(deep_sd(), ToMe(ratio=0.5))
    a, b = item_inputs(2), item_inputs(3)
    first = call(pipe, [a], steps=4)
    assert torch.equal(call(pipe, [a], steps=4), first)
    assert not torch.equal(first, call(ours(deep_sd(), ToMe(ratio=0.5, use_rand=False)), [a], steps=4))
    both = call(pipe, [a, b], steps=4)
    torch.testing.assert_close(both[:1], first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1:], call(pipe, [b], steps=4), rtol=1e-4, atol=1e-4)
    call(pipe, [a], steps=6)  # another step count needs no re-apply
    assert tome_stats(pipe)["merged_blocks"] == 6 * 5  # 5 full-resolution blocks per step


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.75])
def test_default_tome_matches_tomesd_at_every_ratio(ratio):
    # The default config (gate off) merges exactly where tomesd does, whatever the machine.
    ref_pipe = deep_sd()
    tomesd.apply_patch(ref_pipe, ratio=ratio, use_rand=False)
    reference = call(ref_pipe, [item_inputs(8)], steps=3)
    out = call(ours(deep_sd(), ToMe(ratio=ratio, use_rand=False)), [item_inputs(8)], steps=3)
    assert (out - reference).abs().max().item() <= 1e-4


def test_gate_is_a_token_count_rule_not_a_timing():
    baseline = call(deep_sd(), [item_inputs(4)], steps=3)
    pipe = ours(deep_sd(), ToMe(ratio=0.5, gate=True))  # 256 tokens < 4096 (the CPU default): plain
    out = call(pipe, [item_inputs(4)], steps=3)
    s = tome_stats(pipe)
    assert s["gated_blocks"] == 15 and "merged_blocks" not in s and torch.equal(out, baseline)
    (decision,) = s["gate"].values()
    assert decision == {"merge": False, "tokens": 256, "min_tokens": tome_module.GATE_MIN_TOKENS["cpu"], "device": "cpu",
                        "rule": "256 tokens < 4096 (default for cpu)"}
    # An explicit threshold (the user's own calibration) merges; the result is ToMe's without a gate.
    pipe = ours(deep_sd(), ToMe(ratio=0.5, gate=True, gate_min_tokens=256))
    out = call(pipe, [item_inputs(4)], steps=3)
    assert tome_stats(pipe)["merged_blocks"] == 15 and "gated_blocks" not in tome_stats(pipe)
    assert torch.equal(out, call(ours(deep_sd(), ToMe(ratio=0.5)), [item_inputs(4)], steps=3))
    (decision,) = tome_stats(pipe)["gate"].values()
    assert decision["merge"] and decision["rule"] == "256 tokens >= 256 (gate_min_tokens)"
    with pytest.raises(ValueError, match="gate_min_tokens must be a positive integer"):
        ours(deep_sd(), ToMe(gate=True, gate_min_tokens=0))


def test_output_does_not_depend_on_the_clock(monkeypatch):
    import itertools
    import time

    expected = {gate: call(ours(deep_sd(), ToMe(ratio=0.5, gate=gate, gate_min_tokens=256)), [item_inputs(9)], steps=3)
                for gate in (False, True)}
    nonsense = itertools.cycle([1e9, -5.0, 0.0, 3.0e-7, 42.0])
    for name in ("perf_counter", "monotonic", "time", "process_time"):
        monkeypatch.setattr(time, name, lambda: next(nonsense))
    for gate in (False, True):
        out = call(ours(deep_sd(), ToMe(ratio=0.5, gate=gate, gate_min_tokens=256)), [item_inputs(9)], steps=3)
        assert torch.equal(out, expected[gate])


def test_kv_mode_keeps_queries_and_merges_keys():
    pipe = ours(deep_sd(), ToMe(ratio=0.5, mode="kv"))
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = {}
    hooks = [attn.to_q.register_forward_hook(lambda m, i, o: seen.setdefault("q", i[0].shape) and None),
             attn.to_k.register_forward_hook(lambda m, i, o: seen.setdefault("k", i[0].shape) and None)]
    out = call(pipe, [item_inputs(5)], steps=3)
    for h in hooks:
        h.remove()
    assert seen["q"][1] == 256 and seen["k"][1] == 256 - 128
    assert torch.isfinite(out).all() and tome_stats(pipe)["flops_saved"] > 0
    assert not torch.equal(out, call(deep_sd(), [item_inputs(5)], steps=3))


def test_pixart_blocks():
    baseline = run("pixart", build("pixart"), steps=3)
    pipe = ours(build("pixart"), ToMe(ratio=0.5))
    out = run("pixart", pipe, steps=3)
    assert tome_stats(pipe)["merged_blocks"] == 2 * 3 and torch.isfinite(out).all()
    assert not torch.equal(out, baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_smoke(dtype):
    pipe = ours(deep_sd(dtype=dtype), ToMe(ratio=0.5, merge_mlp=True))
    out = call(pipe, [item_inputs(6, dtype)], steps=3)
    assert out.dtype == dtype and torch.isfinite(out.float()).all() and tome_stats(pipe)["merged_blocks"] == 15


def test_direct_unet_call_passes_through():
    pipe = ours(deep_sd(), ToMe(ratio=0.5))
    x, emb = torch.randn(1, 4, 16, 16), torch.randn(1, 8, 16)
    assert torch.equal(pipe.unet(x, 700, emb).sample, deep_sd().unet(x, 700, emb).sample)


def test_bad_input_messages():
    pipe = build("sd")
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 0.75\].*got 1.2"):
        diffaccel.accelerate(pipe, methods=[ToMe(ratio=1.2)])
    with pytest.raises(ValueError, match="mode must be one of"):
        diffaccel.accelerate(pipe, methods=[ToMe(mode="q")])
    with pytest.raises(ValueError, match="mode='kv' merges only"):
        diffaccel.accelerate(pipe, methods=[ToMe(mode="kv", merge_mlp=True)])
    torch.manual_seed(0)
    plain_unet = D.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, mid_block_type=None, cross_attention_dim=16, norm_num_groups=8)
    pipe.register_modules(unet=plain_unet)
    with pytest.raises(ValueError, match="ToMe needs transformer blocks.*has none"):
        diffaccel.accelerate(pipe, methods=[ToMe()])
    with pytest.raises(ValueError, match="cannot accelerate pipelines of the video_dit family"):
        diffaccel.accelerate(build("wan"), methods=[ToMe()])


@pytest.mark.parametrize("settings", [dict(), dict(mode="kv"), dict(merge_crossattn=True, merge_mlp=True)])
def test_flops_saved_matches_flop_counter(settings):
    from diffaccel.flops import count_flops

    baseline, _ = count_flops(call, deep_sd(), [item_inputs(7)], steps=1)
    pipe = ours(deep_sd(), ToMe(ratio=0.5, **settings))
    merged, _ = count_flops(call, pipe, [item_inputs(7)], steps=1)
    assert tome_stats(pipe)["flops_saved"] == baseline - merged > 0


def test_largest_grid_blocks_when_max_downsample_is_none():
    # SDXL's tiny pipe has its only transformer blocks one level down: level 1 selects none.
    with pytest.raises(ValueError, match="selects no transformer block.*at least 2"):
        ours(build("sdxl"), ToMe(ratio=0.5))
    pipe = ours(build("sdxl"), ToMe(ratio=0.5, max_downsample=None))
    run("sdxl", pipe, steps=2)
    from diffaccel.pipelines import detect
    levels = [d for _, _, d in detect(pipe).transformer_blocks()]
    assert min(levels) == 2 and tome_stats(pipe)["merged_blocks"] == 2 * levels.count(2)


@pytest.mark.parametrize("preset", ["quality", "balanced", "fast"])
def test_unet_presets_apply(preset):
    for name in ("sd", "sdxl"):
        pipe = diffaccel.accelerate(build(name), preset=preset)
        run(name, pipe, steps=16)  # at 4 steps quality and balanced compute every step (their max_span)
        assert diffaccel.stats(pipe)["methods"]["deepcache"]["reused"] >= 1


def test_disable_leaves_modules_as_they_were():
    # diffusers' HookRegistry leaves an instance forward behind on removal, which silently
    # disabled tomesd (it swaps the class) after diffaccel.disable; hook_forward cleans up.
    pipe = build("sd")
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    diffaccel.accelerate(pipe, methods=[DeepCache(interval=2), ToMe(ratio=0.5)])
    assert "forward" in vars(block)
    diffaccel.disable(pipe)
    for module in pipe.unet.modules():
        assert "forward" not in vars(module) and not hasattr(module, "_diffusers_hook")

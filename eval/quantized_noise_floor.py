"""Caching under quantized attention / FP8: the noise floor of AdaptiveCache's decision signal.

AdaptiveCache reuses blocks while the accumulated relative change of the first block's residual,
``d = mean|r - r_prev| / mean|r_prev|``, stays under a threshold. Quantization adds noise to
``r`` that does not shrink when the image stops changing, so ``d`` gets a floor and the presets'
thresholds are crossed sooner (users report caches switched off under FP8). This script, on the
bundled DiTs (CPU, emulated quantization):

1. runs each model unquantized and quantized on *training* captions with every step computed and
   records ``d`` per step and CFG half; the noise floor is the median excess of the quantized
   ``d`` over the unquantized one at the same seed, step and half (steps >= 2, AdaptiveCache's
   warm-up);
2. on *held-out* captions, runs each preset unquantized, quantized, and quantized with
   ``AdaptiveCache(noise_floor=<floor>)``: reused steps per call and PSNR against the
   unaccelerated output of the same quantization (the preset's promise) and of the fp32 model.

Quantization modes, emulated in fp32 (fake quantization: the values a quantized kernel sees):

* ``int8-attn``: SageAttention-style attention: K smoothed (mean over tokens subtracted, exact
  for softmax), Q and K int8 per block of 64 tokens, V fp8 e4m3 per channel. Installed the way
  Sage's README does it, as ``torch.nn.functional.scaled_dot_product_attention`` of this process
  (both models' attention reaches it: PixArt's processors call SDPA, Wan's native dispatch too).
* ``fp8``: every Linear of the denoiser with fp8 e4m3 weights (per output channel) and fp8 e4m3
  activations (dynamic, per token), as torchao's float8 dynamic-activation/weight quantization.

    python eval/quantized_noise_floor.py --seeds 0-15 --out eval/results/quantized_noise_floor.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import diffaccel
from diffaccel.bundled.loader import default_call_kwargs
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.pipelines import detect
from diffaccel.presets import preset_methods

MODELS = ("tiny-dit", "tiny-video")
QUANT = ("none", "int8-attn", "fp8")
PRESETS = ("quality", "balanced", "fast")
WARMUP = 2  # AdaptiveCache's warm-up steps: their d never decides


# ---- emulated quantization ---------------------------------------------------------------------
def fake_fp8(x: torch.Tensor, dim: int) -> torch.Tensor:
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / 448.0  # e4m3 max
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


def fake_int8_blocks(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Symmetric int8 with one scale per block of ``block`` tokens (dim -2) and head."""
    b, h, n, d = x.shape
    pad = (-n) % block
    xp = F.pad(x, (0, 0, 0, pad)).reshape(b, h, (n + pad) // block, block, d)
    scale = xp.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12) / 127.0
    q = (xp / scale).round().clamp(-127, 127) * scale
    return q.reshape(b, h, n + pad, d)[:, :, :n]


def sage_like(real_sdpa):
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     **kwargs):
        key = key - key.mean(dim=-2, keepdim=True)  # Sage's smoothing: softmax is shift-invariant per row
        return real_sdpa(fake_int8_blocks(query), fake_int8_blocks(key), fake_fp8(value, dim=-2),
                         attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    return scaled_dot_product_attention


@contextmanager
def quantized(pipe, mode: str):
    """Run ``pipe`` under quantization ``mode`` inside the block; restores it exactly after."""
    undo = []
    if mode == "int8-attn":
        real = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = sage_like(real)
        undo.append(lambda: setattr(F, "scaled_dot_product_attention", real))
    elif mode == "fp8":
        for module in detect(pipe).denoiser.modules():
            if isinstance(module, torch.nn.Linear):
                original = module.weight.data
                module.weight.data = fake_fp8(original, dim=1)
                handle = module.register_forward_pre_hook(lambda m, args: (fake_fp8(args[0], dim=-1), *args[1:]))
                undo.append(lambda m=module, w=original, h=handle: (setattr(m.weight, "data", w), h.remove()))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


# ---- the decision signal -----------------------------------------------------------------------
def record_signal(pipe, prompt: str, seed: int, call_kwargs: dict) -> dict:
    """{(call in step, CFG half): [d per step]} for one call, every step computed."""
    name, block = detect(pipe).blocks()[0]
    residuals = []

    def hook(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        out = out[0] if isinstance(out, tuple) else out
        residuals.append((out - hidden).detach().float())

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **call_kwargs)
    finally:
        handle.remove()
    steps = call_kwargs["num_inference_steps"]
    per_step = len(residuals) // steps
    streams: dict = {}
    for i, r in enumerate(residuals):
        halves = r.chunk(2) if per_step == 1 and r.shape[0] % 2 == 0 else (r,)  # batched CFG: two halves
        for j, half in enumerate(halves):
            streams.setdefault((i % per_step, j), []).append(half)
    return {key: [float((b - a).abs().mean() / a.abs().mean().clamp_min(1e-12)) for a, b in zip(rs, rs[1:])]
            for key, rs in streams.items()}


def noise_floor(pipe, model: str, mode: str, prompts, seeds, call_kwargs) -> dict:
    excess, plain, quant = [], [], []
    for prompt, seed in zip(prompts, seeds):
        ref = record_signal(pipe, prompt, seed, call_kwargs)
        with quantized(pipe, mode):
            got = record_signal(pipe, prompt, seed, call_kwargs)
        for key in ref:
            for step, (a, b) in enumerate(zip(ref[key], got[key]), start=1):
                if step >= WARMUP:
                    excess.append(b - a)
                    plain.append(a)
                    quant.append(b)
    return {"floor": max(0.0, statistics.median(excess)), "median_d_fp32": statistics.median(plain),
            "median_d_quant": statistics.median(quant), "p90_excess": statistics.quantiles(excess, n=10)[-1]}


# ---- presets with and without the floor --------------------------------------------------------
def run(pipe, prompt, seed, call_kwargs, methods=None):
    if methods is not None:
        diffaccel.accelerate(pipe, methods=methods)
    try:
        out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **call_kwargs)
        reused = diffaccel.stats(pipe)["methods"].get("adaptive_cache", {}).get("reused", 0) if methods else 0
    finally:
        if methods is not None:
            diffaccel.disable(pipe)
    out = getattr(out, "frames", getattr(out, "images", None))
    return torch.as_tensor(out).float(), reused


@contextmanager
def nudged(pipe, call: int = 4, size: float = 1e-3):
    """Add noise of relative size ``size`` to the denoiser input of its ``call``-th call: the
    smallest deviation a cache could cause, to see how far the trajectory then drifts."""
    denoiser, seen = detect(pipe).denoiser, [0]

    def hook(module, args, kwargs):
        seen[0] += 1
        if seen[0] != call:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype) * x.std() * size
        if args:
            return (x + noise, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x + noise}

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def sensitivity(model: str, args) -> list[str]:
    """Per quantization: PSNR of its baseline vs fp32, and of a nudged run vs its own baseline."""
    pipe = diffaccel.load_bundled(model)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = default_call_kwargs(model)
    held = builtin_prompts("heldout", model == "tiny-video")
    seeds = list(range(args.seed_lo, args.seed_hi + 1))
    prompts = [held[i % len(held)] for i in range(len(seeds))]
    fp32 = [run(pipe, p, s, call_kwargs)[0] for p, s in zip(prompts, seeds)]
    rows = []
    for mode in QUANT:
        with quantized(pipe, mode):
            base = fp32 if mode == "none" else [run(pipe, p, s, call_kwargs)[0] for p, s in zip(prompts, seeds)]
            outs = []
            for p, s in zip(prompts, seeds):
                with nudged(pipe):
                    outs.append(run(pipe, p, s, call_kwargs)[0])
        vs_fp32 = "-" if mode == "none" else f"{pooled_psnr(zip(base, fp32))[0]:.2f}"
        rows.append(f"| {model} | {mode} | {vs_fp32} | {pooled_psnr(zip(outs, base))[0]:.2f} |")
        print(rows[-1], flush=True)
    return rows


def pooled_psnr(pairs) -> tuple[float, float]:
    mses = [float((a - b).pow(2).mean()) for a, b in pairs]
    pooled = statistics.mean(mses)
    psnr = lambda m: float("inf") if m == 0 else -10.0 * torch.log10(torch.tensor(m)).item()  # noqa: E731
    return psnr(pooled), psnr(max(mses))


def with_floor(methods, floor: float):
    return [dataclasses.replace(m, noise_floor=floor) if m.name == "adaptive_cache" else m for m in methods]


def evaluate(model: str, args) -> tuple[list[str], dict]:
    pipe = diffaccel.load_bundled(model)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = default_call_kwargs(model)
    video = model == "tiny-video"
    family = str(detect(pipe).family)
    train = builtin_prompts("bundled", video)[: args.calibration_prompts]
    held = builtin_prompts("heldout", video)
    seeds = list(range(args.seed_lo, args.seed_hi + 1))
    prompts = [held[i % len(held)] for i in range(len(seeds))]
    floors = {mode: noise_floor(pipe, model, mode, train, range(100, 100 + len(train)), call_kwargs)
              for mode in QUANT if mode != "none"}
    print(model, json.dumps(floors), flush=True)
    fp32 = [run(pipe, p, s, call_kwargs)[0] for p, s in zip(prompts, seeds)]
    rows, raw = [], {"floors": floors, "rows": []}
    for mode in QUANT:
        with quantized(pipe, mode):
            base = fp32 if mode == "none" else [run(pipe, p, s, call_kwargs)[0] for p, s in zip(prompts, seeds)]
            variants = [("-", 0.0)] if mode == "none" else [("0 (off)", 0.0), (f"{floors[mode]['floor']:.4f}", floors[mode]["floor"])]
            for preset in PRESETS:
                for label, floor in variants:
                    outs, reused = zip(*[run(pipe, p, s, call_kwargs, with_floor(preset_methods(preset, family), floor))
                                         for p, s in zip(prompts, seeds)])
                    psnr, worst = pooled_psnr(zip(outs, base))
                    psnr_fp32, _ = pooled_psnr(zip(outs, fp32))
                    row = dict(model=model, quant=mode, preset=preset, noise_floor=floor,
                               reused_per_call=statistics.mean(reused), psnr=psnr, worst=worst, psnr_fp32=psnr_fp32)
                    raw["rows"].append(row)
                    rows.append(f"| {model} | {mode} | {preset} | {label} | {row['reused_per_call']:.2f} | {psnr:.2f} | "
                                f"{worst:.2f} | {psnr_fp32:.2f} |")
                    print(rows[-1], flush=True)
    return rows, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0-15", help="held-out evaluation seeds, LO-HI")
    parser.add_argument("--calibration-prompts", type=int, default=4, help="training captions for the floor")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sensitivity-only", action="store_true",
                        help="only the table of how far a 1e-3 nudge at an early step moves each quantization's output")
    args = parser.parse_args()
    args.seed_lo, args.seed_hi = (int(x) for x in args.seeds.split("-"))
    torch.set_grad_enabled(False)
    lines = ["# AdaptiveCache under emulated quantized attention / FP8: noise floor and presets", "",
             f"Command: `python {' '.join(sys.argv)}` (CPU, fp32 emulation; see the script's docstring for "
             "the quantization modes).", ""]
    table = ["| model | quantization | preset | noise_floor | reused steps / call | PSNR vs same-quant baseline dB |"
             " worst seed dB | PSNR vs fp32 baseline dB |", "|---|---|---|---|---|---|---|---|"]
    if args.sensitivity_only:
        rows = [r for model in args.models.split(",") for r in sensitivity(model, args)]
        text = "\n".join(["| model | quantization | PSNR of its baseline vs fp32 dB | PSNR nudged vs its own baseline dB |",
                          "|---|---|---|---|", *rows]) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    raw_all, floor_lines = {}, []
    for model in args.models.split(","):
        rows, raw = evaluate(model, args)
        table += rows
        raw_all[model] = raw
        for mode, f in raw["floors"].items():
            floor_lines.append(f"| {model} | {mode} | {f['median_d_fp32']:.4f} | {f['median_d_quant']:.4f} | "
                               f"{f['floor']:.4f} | {f['p90_excess']:.4f} |")
    lines += ["## Noise floor of the decision signal (training captions, every step computed)", "",
              "| model | quantization | median d fp32 | median d quantized | floor (median excess) | 90th pct excess |",
              "|---|---|---|---|---|---|", *floor_lines, "",
              f"## Presets on held-out captions, seeds {args.seeds}", "", *table, ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(raw_all, f, indent=1)


if __name__ == "__main__":
    main()

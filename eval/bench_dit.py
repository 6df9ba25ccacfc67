"""Side by side with the peers on DiT architectures with random weights: speed, FLOPs, fidelity.

    python eval/bench.py --suite dit   [--layers 28 --size 256 --steps 10 --repeats 3]
    python eval/bench.py --suite video [--layers 10 --size 96 --frames 9 --steps 10]

The PixArt-alpha / CogVideoX-2b transformers are built from the public configs in
eval/configs (random weights; ``--layers`` may shorten them to fit a CPU budget) and
driven through their real pipeline classes with precomputed random prompt embeddings, latents
out. Every method runs in the same process: one FLOP-counted call (torch FlopCounterMode over
the whole call, CPU SDPA counted), then ``--repeats`` timed calls interleaved with the other
methods; the speed-up is the ratio of medians to the baseline. Fidelity is PSNR / SSIM of the
output latents against the baseline's (same seed), after scaling both by the baseline's range.
On random weights fidelity is indicative only; `python eval/bench.py --suite frontier` uses the trained models.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import diffusers as D

import diffaccel
from diffaccel.flops import flop_counter
from diffaccel.metrics import psnr, ssim

CONFIGS = Path(__file__).resolve().parent / "configs"


def build(suite: str, layers: int | None):
    name = {"dit": "pixart_alpha_512_transformer.json", "video": "cogvideox_2b_transformer.json"}[suite]
    cfg = json.loads((CONFIGS / name).read_text())
    if layers:
        cfg["num_layers"] = layers
    torch.manual_seed(0)
    if suite == "dit":
        tr = D.PixArtTransformer2DModel.from_config(cfg).eval()
        # PixArt's transformer lacks diffusers' CacheMixin (enable_cache); give it the mixin so
        # the peers' caches install on it exactly as on the models that have it.
        from diffusers.models.cache_utils import CacheMixin

        tr.__class__ = type(type(tr).__name__, (type(tr), CacheMixin), {})
        tr._cache_config = None
        pipe = D.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                     scheduler=D.DPMSolverMultistepScheduler())
    else:
        tr = D.CogVideoXTransformer3DModel.from_config(cfg).eval()
        pipe = D.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                   scheduler=D.CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(suite: str, pipe, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    cfg = pipe.transformer.config
    if suite == "dit":
        text, dim = 120, cfg.caption_channels
        emb, neg = torch.randn(1, text, dim, generator=g), torch.randn(1, text, dim, generator=g)
        return dict(prompt_embeds=emb, negative_prompt_embeds=neg, prompt_attention_mask=torch.ones(1, text),
                    negative_prompt_attention_mask=torch.ones(1, text), negative_prompt=None, guidance_scale=4.5,
                    height=args.size, width=args.size, num_inference_steps=args.steps, use_resolution_binning=False,
                    output_type="latent", seed=args.seed)
    text, dim = cfg.max_text_seq_length, cfg.text_embed_dim
    emb, neg = torch.randn(1, text, dim, generator=g), torch.randn(1, text, dim, generator=g)
    return dict(prompt_embeds=emb, negative_prompt_embeds=neg, guidance_scale=6.0, height=args.size, width=args.size,
                num_frames=args.frames, num_inference_steps=args.steps, output_type="latent", seed=args.seed)


class TimestepProbe:
    """diffusers' PAB/FasterCache need the current timestep; PixArt does not expose it."""

    def __init__(self, pipe):
        self.t = 1000
        pipe.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        t = kwargs.get("timestep")
        self.t = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else self.t


def methods(suite: str, pipe, probe, args) -> dict:
    """name -> (enable, disable). Peers with their documented settings; ours by config."""
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig

    tr, now = pipe.transformer, (lambda: probe.t)
    fmt = "BCHW" if suite == "dit" else "BFCHW"

    scope = []

    def peer(make):
        # PixArt's pipeline sets no cache context: hold one ("cond") for the whole batched-CFG call.
        def enable():
            tr.enable_cache(make())
            scope.append(tr.cache_context("cond"))
            scope[-1].__enter__()

        def disable():
            scope.pop().__exit__(None, None, None)
            tr.disable_cache()

        return enable, disable

    def ours(*configs):
        return (lambda: diffaccel.accelerate(pipe, methods=list(configs))), (lambda: diffaccel.disable(pipe))

    out = {
        "baseline": (lambda: None, lambda: None),
        "diffusers PAB (spatial 2)": peer(lambda: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800), current_timestep_callback=now)),
        "diffusers FasterCache": peer(lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681), current_timestep_callback=now,
            attention_weight_callback=lambda _: 0.3, tensor_format=fmt, unconditional_batch_skip_range=5,
            unconditional_batch_timestep_skip_range=(-1, 641))),
        "diffusers FirstBlockCache(0.2)": peer(lambda: FirstBlockCacheConfig(threshold=0.2)),
        "diffusers MagCache(0.06)": peer(lambda: MagCacheConfig(threshold=0.06, num_inference_steps=args.steps,
                                                                mag_ratios=args.mag_ratios)),
    }
    try:
        import cache_dit

        out["cache-dit DBCache (default)"] = (lambda: cache_dit.enable_cache(pipe)), (lambda: cache_dit.disable_cache(pipe))
        out["cache-dit DBCache (rdt 0.3)"] = (
            lambda: cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(residual_diff_threshold=0.3)),
            lambda: cache_dit.disable_cache(pipe))
    except Exception as exc:  # not installed or incompatible: say so in the table
        print(f"cache-dit unavailable: {exc}", file=sys.stderr)
    out.update({
        "ours PAB": ours(diffaccel.PAB()),
        "ours FasterCache": ours(diffaccel.FasterCache()),
        "ours AdaptiveCache(0.1)": ours(diffaccel.AdaptiveCache(threshold=0.1)),
        "ours AdaptiveCache(0.2)": ours(diffaccel.AdaptiveCache(threshold=0.2, max_consecutive=4)),
        "ours AdaptiveCache(0.2)+FasterCache CFG": ours(diffaccel.AdaptiveCache(threshold=0.2, max_consecutive=4),
                                                        diffaccel.FasterCache(attention_interval=1)),
        # Whole-step skipping (no profile for these random weights: the rule on normalised time).
        "ours StepCache": ours(diffaccel.StepCache()),
        "ours StepCache(0.25, 2 in a row)": ours(diffaccel.StepCache(threshold=0.25, max_consecutive=2)),
        "ours TextCache": ours(diffaccel.TextCache()),
        "ours TextCache+StepCache": ours(diffaccel.TextCache(), diffaccel.StepCache()),
        **{f"ours preset {p}": ((lambda p=p: diffaccel.accelerate(pipe, preset=p)), (lambda: diffaccel.disable(pipe)))
           for p in ("balanced", "fast")},
    })
    return out


def calibrate_magcache(pipe, kw, args) -> list[float]:
    """MagCache needs per-step magnitude ratios; diffusers prints them after a calibration call."""
    from diffusers import MagCacheConfig

    tr = pipe.transformer
    tr.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=args.steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), torch.no_grad(), tr.cache_context("cond"):
        call(pipe, kw)
    tr.disable_cache()
    line = [ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("[")][-1]
    return json.loads(line)


def call(pipe, kw):
    """A fresh generator per call: a shared one advances, so repeated calls would start from other noise."""
    kw = dict(kw)
    return pipe(generator=torch.Generator().manual_seed(kw.pop("seed")), **kw)


def run_once(pipe, kw) -> torch.Tensor:
    with torch.no_grad():
        out = call(pipe, kw)
    return (out.frames if hasattr(out, "frames") else out.images).float()


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    lo, hi = ref.min(), ref.max()
    a, b = (out - lo) / (hi - lo), (ref - lo) / (hi - lo)
    a, b = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])  # frames as batch
    return psnr(a, b), ssim(a, b)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=None, help="shorten the transformer (default: the config's)")
    p.add_argument("--size", type=int, default=None, help="pixels (default 128 dit, 64 video)")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--steps", type=int, default=None, help="default 20 dit, 10 video")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated substrings of method names to run")
    p.add_argument("--out", default="eval/results/bench_dit.md", help="the table is appended to this file")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check-repro", action="store_true", help="only check that two baseline calls are bit-identical")


def main(args) -> None:
    """Run one suite; ``args`` from :func:`add_arguments` plus ``suite`` ("dit" or "video")."""
    args.size = args.size or (128 if args.suite == "dit" else 64)
    args.steps = args.steps or (20 if args.suite == "dit" else 10)
    torch.set_num_threads(args.threads)

    pipe = build(args.suite, args.layers)
    probe = TimestepProbe(pipe)
    kw = call_kwargs(args.suite, pipe, args)
    if args.check_repro:
        a, b = run_once(pipe, kw), run_once(pipe, kw)
        print(f"baseline vs baseline: bit-identical={torch.equal(a, b)}, max abs diff {(a - b).abs().max():.3g}")
        return
    args.mag_ratios = calibrate_magcache(pipe, kw, args)
    table = methods(args.suite, pipe, probe, args)
    if args.only:
        keep = args.only.split(",")
        table = {k: v for k, v in table.items() if k == "baseline" or any(s in k for s in keep)}

    results, failed = {}, {}
    for name, (enable, disable) in table.items():  # FLOPs and outputs, one call each
        try:
            enable()
            with flop_counter() as counter:
                out = run_once(pipe, kw)
            disable()
        except Exception as exc:  # a peer that cannot serve this model: report it, keep going
            print(f"{name}: failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        results[name] = {"flops": counter.get_total_flops(), "out": out, "times": []}
        print(f"{name}: {counter.get_total_flops() / 1e9:.1f} GFLOP", file=sys.stderr, flush=True)
    run_once(pipe, kw)  # warm-up outside the counter
    for rep in range(args.repeats):  # interleaved timing
        for name in results:
            enable, disable = table[name]
            enable()
            t0 = time.perf_counter()
            run_once(pipe, kw)
            results[name]["times"].append(time.perf_counter() - t0)
            disable()
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    write_report(args, results, failed)


def write_report(args, results, failed) -> None:
    base = results["baseline"]
    t_base, f_base = statistics.median(base["times"]), base["flops"]
    arch = "PixArt-alpha (pixart_alpha_512_transformer.json)" if args.suite == "dit" else "CogVideoX-2b (cogvideox_2b_transformer.json)"
    shape = f"{args.size}x{args.size}px" + (f", {args.frames} frames" if args.suite == "video" else "")
    lines = [
        f"## {arch}, random weights, {args.layers or 'all'} layers, {shape}, {args.steps} steps, CFG, batch 1",
        "",
        f"`python eval/bench.py --suite {args.suite} {' '.join(sys.argv[1:]).replace(f'--suite {args.suite}', '').strip()}` — CPU, {torch.get_num_threads()} threads, fp32, "
        f"torch {torch.__version__}; median of {args.repeats} interleaved runs; baseline {t_base:.1f} s, {f_base / 1e12:.2f} TFLOP.",
        "",
        "| method | wall speed-up | FLOPs ratio | achieved/ideal | PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        speed = t_base / statistics.median(r["times"])
        ratio = f_base / r["flops"]
        p, s = fidelity(r["out"], base["out"]) if name != "baseline" else (float("inf"), 1.0)
        lines.append(f"| {name} | {speed:.2f}x | {ratio:.2f}x | {speed / ratio:.2f} | {p:.1f} | {s:.3f} |")
    lines += [f"| {name} | failed: {why} | | | | |" for name, why in failed.items()]
    text = "\n".join(lines) + "\n\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["dit", "video"], default="dit")
    add_arguments(parser)
    main(parser.parse_args())

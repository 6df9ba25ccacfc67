"""U-Net speed suite: DeepCache and tomesd against diffaccel's DeepCache and ToMe, one process.

    python eval/bench.py --suite unet [--res 256 512] [--steps 10]

SD1.5 U-Net architecture with random weights (compute does not depend on weight values),
DDIM, CFG (U-Net batch 2), latents out. Every variant runs inside a real pipeline call with its
method installed; a hook around the U-Net times each denoiser call. Variants are measured round
robin (interleaved, the order rotated every round) and each per-call time is the median over
the rounds. A DeepCache variant's call is timed as a 2-step pipeline run (one full step, one
cached step: the cached step's cost does not depend on N); the n-step time of a schedule is then
k * full + (n - k) * cached with k = ceil(n / N) full steps, the mix the schedule runs. This keeps
a 512x512 comparison inside minutes on a 2-core CPU; the composition is exact up to the
scheduler's own (negligible) time.

FLOPs: one counted U-Net forward per resolution (``diffaccel.flops.count_flops``) gives the cost
of every module; a cached step costs the full forward minus the modules it skips; ToMe saves
what the self-attention does not compute on the merged tokens (counted on the attention module
at both token counts), minus the similarity matmul.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

EVAL = Path(__file__).resolve().parent
RESULTS = EVAL / "results" / "bench_unet.md"


def build_pipe(config_dir: Path):
    import diffusers as D

    torch.manual_seed(0)
    unet = D.UNet2DConditionModel.from_config(json.loads((config_dir / "sd15_unet.json").read_text())).eval()
    # Only latents come out, so a 4-level VAE that is never run gives the pipeline its x8 scale.
    vae = D.AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1).eval()
    scheduler = D.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = D.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Variant:
    label: str
    kind: str  # "baseline", "deepcache", "deepcache_cfg", "tome", "combined"
    impl: str  # "reference" or "diffaccel"
    setting: str
    install: Callable  # pipe -> undo()
    ratio: float = 0.0
    full: list[float] = field(default_factory=list)  # seconds per full denoiser call
    cached: list[float] = field(default_factory=list)  # seconds per cached denoiser call
    stats: dict = field(default_factory=dict)

    @property
    def two_steps(self) -> bool:
        return self.kind in ("deepcache", "deepcache_cfg", "combined")


def variants(ratios, combined_interval: int, combined_ratio: float) -> list[Variant]:
    import diffaccel
    import tomesd
    from DeepCache import DeepCacheSDHelper

    def reference_deepcache(pipe):
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=0)  # timing run: step 0 full, step 1 cached
        helper.enable()
        return helper.disable

    def ours(*methods):
        def install(pipe):
            diffaccel.accelerate(pipe, methods=list(methods))
            return lambda: diffaccel.disable(pipe)
        return install

    def reference_tome(ratio):
        def install(pipe):
            tomesd.apply_patch(pipe, ratio=ratio)
            return lambda: tomesd.remove_patch(pipe)
        return install

    out = [Variant("baseline", "baseline", "-", "-", lambda pipe: (lambda: None)),
           Variant("DeepCache lib", "deepcache", "reference", "branch 0", reference_deepcache),
           Variant("diffaccel DeepCache", "deepcache", "diffaccel", "branch 0",
                   ours(diffaccel.DeepCache(interval=2, branch=0))),
           # the fast preset's pairing: the unconditional half runs at the full steps only
           Variant("diffaccel DeepCache + CfgCache", "deepcache_cfg", "diffaccel", "branch 0",
                   ours(diffaccel.DeepCache(interval=2, branch=0), diffaccel.CfgCache(interval=2)))]
    for r in ratios:
        out.append(Variant(f"tomesd r={r}", "tome", "reference", f"ratio {r}", reference_tome(r), ratio=r))
        out.append(Variant(f"diffaccel ToMe r={r}", "tome", "diffaccel", f"ratio {r}",
                           ours(diffaccel.ToMe(ratio=r)), ratio=r))
    out.append(Variant(f"diffaccel DeepCache N={combined_interval} + ToMe r={combined_ratio}", "combined", "diffaccel",
                       f"N={combined_interval}, ratio {combined_ratio}",
                       ours(diffaccel.DeepCache(interval=2, branch=0), diffaccel.ToMe(ratio=combined_ratio)),
                       ratio=combined_ratio))
    return out


def call_inputs(res: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 77, 768, generator=g), negative_prompt_embeds=torch.randn(1, 77, 768, generator=g),
                latents=torch.randn(1, 4, res // 8, res // 8, generator=g), guidance_scale=7.5, height=res, width=res,
                output_type="latent")


def measure(pipe, variant: Variant, res: int, record: bool = True) -> None:
    """One pipeline call with the variant installed; appends its per-call U-Net times."""
    times, start = [], []
    pre = pipe.unet.register_forward_pre_hook(lambda *a: start.append(time.perf_counter()))
    post = pipe.unet.register_forward_hook(lambda *a: times.append(time.perf_counter() - start[-1]))
    undo = variant.install(pipe)
    try:
        with torch.no_grad():
            pipe(**call_inputs(res), num_inference_steps=2 if variant.two_steps else 1)
        if variant.impl == "diffaccel" and not record:  # warm-up only: stats() counts FLOPs once
            import diffaccel
            variant.stats = diffaccel.stats(pipe)["methods"]
    finally:
        undo()
        pre.remove()
        post.remove()
    if record:
        variant.full.append(times[0])
        if variant.two_steps:
            variant.cached.append(times[1])


# ---- FLOPs --------------------------------------------------------------------------
def module_flops(unet, res: int) -> dict[str, int]:
    from diffaccel.flops import count_flops

    x, emb = torch.randn(2, 4, res // 8, res // 8), torch.randn(2, 77, 768)
    return count_flops(unet, x, torch.tensor(500), emb)[1]


def tome_saving_per_block(unet, res: int, ratio: float) -> tuple[float, list[str]]:
    """FLOPs one full-resolution transformer block saves at ``ratio``, and those blocks' paths."""
    from diffaccel.flops import count_flops

    h = w = res // 8
    n, d = h * w, (h // 2) * (w // 2)
    r = min(int(n * ratio), n - d)
    m = n - r
    blocks = [name for name, mod in unet.named_modules()
              if type(mod).__name__ == "BasicTransformerBlock" and name.startswith(("down_blocks.0.", f"up_blocks.{len(unet.up_blocks) - 1}."))]
    attn = unet.get_submodule(blocks[0]).attn1
    c = attn.to_q.in_features
    attention = {tokens: count_flops(attn, torch.zeros(2, tokens, c))[0] for tokens in (n, m)}
    saving = attention[n] - attention[m] - 2.0 * 2 * (n - d) * d * c  # minus the src-dst cosine similarities
    return (saving if r > 0 else 0.0), blocks


def step_flops(variant: Variant, costs: dict[str, int], unet, res: int) -> tuple[float, float]:
    """(full-step, cached-step) FLOPs of a variant."""
    from diffaccel.methods.deepcache import cached_modules

    full = float(costs[""])
    skipped = cached_modules(unet, 0)
    cached = full - sum(costs.get(p, 0) for p in skipped)
    if variant.kind == "deepcache_cfg":  # cached steps run the conditional rows alone
        cached /= 2
    if variant.kind in ("tome", "combined"):
        merges = True
        if variant.impl == "diffaccel":  # the gate may have kept some shapes unmerged
            merges = variant.stats.get("tome", {}).get("merged_blocks", 0) > 0
        saving, blocks = tome_saving_per_block(unet, res, variant.ratio) if merges else (0.0, [])
        full -= saving * len(blocks)
        live = [b for b in blocks if not any(b == p or b.startswith(p + ".") for p in skipped)]
        cached -= saving * len(live)
    return full, cached


# ---- report -------------------------------------------------------------------------
def rows_for(res, steps, intervals, combined_interval, vs: list[Variant], costs, unet) -> list[dict]:
    base = next(v for v in vs if v.kind == "baseline")
    t_base = statistics.median(base.full)
    f_base = float(costs[""])
    out = []

    def row(v: Variant, n_full: int, setting: str):
        t_full = statistics.median(v.full)
        t_cached = statistics.median(v.cached) if v.cached else t_full
        total = n_full * t_full + (steps - n_full) * t_cached
        f_full, f_cached = step_flops(v, costs, unet, res)
        flops = (n_full * f_full + (steps - n_full) * f_cached) / steps
        speedup = steps * t_base / total
        ideal = f_base / flops
        gate = v.stats.get("tome", {}).get("gate")
        out.append(dict(res=res, method=v.label.split(" N=")[0] if v.kind != "combined" else v.label, impl=v.impl,
                        setting=setting, full_ms=t_full * 1e3, cached_ms=(t_cached * 1e3 if v.cached else None),
                        total_s=total, speedup=speedup, gflop=flops / 1e9, ideal=ideal, efficiency=speedup / ideal,
                        runs=len(v.full), gate=gate))

    for v in vs:
        if v.kind == "baseline":
            row(v, steps, "-")
        elif v.kind in ("deepcache", "deepcache_cfg"):
            for n in intervals:
                row(v, len(range(0, steps, n)), f"N={n}, branch 0")
        elif v.kind == "tome":
            row(v, steps, v.setting)
        else:
            row(v, len(range(0, steps, combined_interval)), v.setting)
    return out


def markdown(rows: list[dict], args, started: str, loads: list[str]) -> str:
    lines = [
        "# U-Net speed: DeepCache / tomesd vs diffaccel",
        "",
        f"Command: `python eval/bench.py --suite unet{out_arg(args, RESULTS)} --res {' '.join(map(str, args.res))} --steps {args.steps} "
        f"--rounds {args.rounds} --ratios {' '.join(map(str, args.ratios))}"
        + (f" --ratios-large {' '.join(map(str, args.ratios_large))}" if args.ratios_large else "")
        + f" --intervals {' '.join(map(str, args.intervals))}`  ",
        f"Started {started}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32; load average "
        f"before/after: {loads[0]} / {loads[-1]}.  ",
        "SD1.5 U-Net (random weights), DDIM, CFG 7.5 (U-Net batch 2), latents out. Per-call times are medians "
        "of interleaved rounds inside real pipeline calls; the n-step time is k full + (n-k) cached calls "
        "(see eval/bench_unet.py). Speed-up is against the baseline in the same process. Ideal = baseline FLOPs / "
        "variant FLOPs; efficiency = achieved / ideal. 'ours/ref' compares speed-ups at equal settings. "
        "DeepCache + CfgCache: the cached calls run the conditional half alone (the fast preset's pairing).",
        "",
        "| res | method | setting | full call ms | cached call ms | " + f"{args.steps}-step s | speed-up | ours/ref | "
        "GFLOP/step | ideal | achieved/ideal | runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = None
        if r["impl"] == "diffaccel" and "+" not in r["method"]:
            kind = "DeepCache lib" if "DeepCache" in r["method"] else "tomesd"
            ref = next((x for x in rows if x["res"] == r["res"] and x["impl"] == "reference"
                        and x["method"].startswith(kind) and x["setting"] == r["setting"]), None)
        ratio = f"{r['speedup'] / ref['speedup']:.3f}" if ref else ""
        cached = f"{r['cached_ms']:.0f}" if r["cached_ms"] is not None else ""
        lines.append(f"| {r['res']} | {r['method']} | {r['setting']} | {r['full_ms']:.0f} | {cached} | {r['total_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {ratio} | {r['gflop']:.0f} | {r['ideal']:.2f}x | {r['efficiency']:.2f} | {r['runs']} |")
    gates = {(r["res"], k): v for r in rows if r.get("gate") for k, v in r["gate"].items()}
    if gates:
        lines += ["", "ToMe gate (token-count rule per block shape):", ""]
        for (res, shape), g in sorted(gates.items()):
            lines.append(f"- {res}px, {shape}: {g['rule']} -> {'merge' if g['merge'] else 'skip merging'}")
    return "\n".join(lines) + "\n"


def out_arg(args, default: Path) -> str:
    return "" if Path(args.out).resolve() == default.resolve() else f" --out {args.out}"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run(args) -> str:
    started = time.strftime("%Y-%m-%d %H:%M")
    loads = [load()]
    pipe = build_pipe(Path(args.config_dir))
    rows = []
    for res in args.res:
        ratios = args.ratios if res == min(args.res) else args.ratios_large or args.ratios
        vs = variants(ratios, args.combined_interval, args.combined_ratio)
        measure(pipe, vs[0], res, record=False)  # warm-up: allocator, threads
        for v in vs:
            if v.impl == "diffaccel" and v.kind in ("tome", "combined"):
                measure(pipe, v, res, record=False)  # warm-up of the merged path
        for round_ in range(args.rounds):
            shift = round_ % len(vs)
            for v in vs[shift:] + vs[:shift]:
                measure(pipe, v, res)
                print(f"{res}px round {round_ + 1}: {v.label}: {v.full[-1]:.2f} s"
                      + (f" / cached {v.cached[-1]:.2f} s" if v.two_steps else ""), flush=True)
        costs = module_flops(pipe.unet, res)
        rows += rows_for(res, args.steps, args.intervals, args.combined_interval, vs, costs, pipe.unet)
        loads.append(load())
        text = markdown(rows, args, started, loads)  # written after every resolution: a slow run keeps its results
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-dir", default=str(EVAL / "configs"), help="folder holding sd15_unet.json")
    parser.add_argument("--out", default=None, help="markdown table to write (default: eval/results/bench_unet.md, "
                                                    "with --mode block eval/results/bench_unet_block.md)")
    parser.add_argument("--mode", choices=("pipeline", "block"), default="pipeline",
                        help="block: time one transformer block, plain vs tomesd vs ours (eval/results/bench_unet_block.md)")
    parser.add_argument("--res", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=10, help="n of the n-step totals")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements per variant")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--ratios-large", type=float, nargs="*", default=None,
                        help="ToMe ratios at resolutions above the smallest (default: --ratios)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--combined-interval", type=int, default=3)
    parser.add_argument("--combined-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))


def main(args) -> None:
    torch.set_num_threads(args.threads)
    args.out = args.out or str(BLOCK_RESULTS if args.mode == "block" else RESULTS)
    print(block_level(args) if args.mode == "block" else run(args))


# ---- block level: one full-resolution transformer block, ToMe paths only ---------------
BLOCK_RESULTS = EVAL / "results" / "bench_unet_block.md"
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"


class BlockClock:
    """Wall and process-CPU seconds of one module's forward calls, read from hooks around it."""

    def __init__(self, module: torch.nn.Module):
        self.wall, self.cpu, self._start = [], [], None
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self._start = (time.perf_counter(), time.process_time())

    def _leave(self, *_):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    def close(self):
        for handle in self._handles:
            handle.remove()


def block_level(args) -> str:
    """Time SD1.5's first transformer block: plain vs tomesd vs diffaccel ToMe (gate off).

    Far less noisy than whole pipeline calls on a shared CPU, and it is where every ToMe saving
    and cost sits. The block runs inside a real one-step pipeline call (so both ToMe
    implementations see the call they are built for); hooks around it time its forward.
    """
    import diffaccel
    import tomesd

    pipe = build_pipe(Path(args.config_dir))
    block = pipe.unet.get_submodule(BLOCK)
    lines = ["# SD1.5 full-resolution transformer block: plain vs tomesd vs diffaccel ToMe", "",
             f"Command: `python eval/bench.py --suite unet --mode block{out_arg(args, BLOCK_RESULTS)} "
             f"--res {' '.join(map(str, args.res))} "
             f"--ratios {' '.join(map(str, args.ratios))} --rounds {args.rounds}`  ",
             f"`{BLOCK}` of the SD1.5 U-Net (random weights), batch 2 (CFG), 77 text tokens, CPU fp32, "
             f"{torch.get_num_threads()} threads, load average at start {load()}. The block runs inside a one-step "
             f"pipeline call; hooks around it time its forward. Median of {args.rounds} interleaved calls each; ToMe "
             "merges self-attention only (defaults), diffaccel with gate=False so its merged path is what is timed "
             "(with the gate on, a shape where this is slower than plain runs plain).", "",
             "| res | clock | tokens | ratio | plain ms | tomesd ms | diffaccel ms | tomesd speed-up | diffaccel speed-up | ours/ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in args.res:
        h = w = res // 8

        def plain():
            return lambda: None

        def reference(r):
            tomesd.apply_patch(pipe, ratio=r)
            return lambda: tomesd.remove_patch(pipe)

        def ours(r):
            diffaccel.accelerate(pipe, methods=[diffaccel.ToMe(ratio=r, gate=False)])
            return lambda: diffaccel.disable(pipe)

        variants = {("plain", 0): plain}
        for r in args.ratios:
            variants[("tomesd", r)] = lambda r=r: reference(r)
            variants[("ours", r)] = lambda r=r: ours(r)
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}  # process CPU seconds: far less hurt by other users' load
        with torch.no_grad():
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for key, install in variants.items():
                    undo = install()
                    clock = BlockClock(block)
                    try:
                        pipe(**call_inputs(res), num_inference_steps=1)
                        if key[0] == "ours" and not round_:
                            merged = diffaccel.stats(pipe)["methods"]["tome"].get("merged_blocks", 0)
                            assert merged > 0, "ToMe did not merge"
                    finally:
                        clock.close()
                        undo()
                    if round_:
                        times[key] += clock.wall
                        cpu[key] += clock.cpu
        for clock_name, samples in (("wall", times), ("CPU", cpu)):
            med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
            for r in args.ratios:
                p, t, o = med[("plain", 0)], med[("tomesd", r)], med[("ours", r)]
                lines.append(f"| {res} | {clock_name} | {h * w} | {r} | {p:.0f} | {t:.0f} | {o:.0f} | {p / t:.2f}x | "
                             f"{p / o:.2f}x | {t / o:.2f} |")
        print("\n".join(lines[-2 * len(args.ratios):]), flush=True)
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    return text

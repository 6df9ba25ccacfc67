"""One prepared GPU run of everything diffaccel claims about speed (< 8 minutes of an H100).

    bash eval/gpu_suite.sh                        # on the GPU machine; results in $OUT and eval/results/
    python eval/gpu_suite.py --smoke --out DIR    # CPU, tiny configs, fp32: the same code path (tests run it)

Real architectures from the public configs in eval/configs with random weights (compute does not
depend on weight values), bf16, driven through their real pipeline classes with random prompt
embeddings, latents out. Sections, each with a time guard that skips its remaining rows with a
note instead of overrunning (estimated H100 seconds in brackets; the plan is printed first):

* ``kernels`` [90]: eval/gpu_kernels.py, sliding-tile correctness against the fp64 reference and
  kernel speed (including the tile-ordered kernel alone).
* ``models`` [250]: SD1.5 512 px, SDXL 1024 px, PixArt-alpha 1024 px, FLUX.1-dev 1024 px,
  Wan2.1-1.3B 480p (81 frames), CogVideoX-2b (49 frames 480x720). Per model: the baseline, the
  diffaccel presets and single methods, and the peers at matched settings (diffusers'
  FirstBlockCache, MagCache, TaylorSeerCache, FasterCache, PAB on transformers; the DeepCache
  library and tomesd on U-Nets). Each variant runs one short pipeline call (``steps``) after a
  warm-up call; every denoiser call is timed (CUDA events); calls are classed full (>= 0.7 x the
  baseline's median call) or cached, and the per-call medians are composed to a whole generation
  of ``gen_steps`` steps with the measured fraction of cached calls (as eval/bench_unet.py does).
  achieved/ideal = wall speed-up / FLOP ratio (diffaccel's own FLOP accounting). Peak GPU memory
  per variant vs the baseline.
* ``compile`` [40]: baseline and the "balanced" preset under torch.compile (repeated blocks) on
  PixArt and SD1.5, compile time excluded (warm-up call).
* ``sta`` [60]: sliding-tile attention inside full transformer steps: CogVideoX-2b (13x30x45) and
  a HunyuanVideo-size step (768x1280, 117 frames: grid 30x48x80; 2 dual + 2 single blocks, per
  block), dense under every SDPA backend (the fastest is the reference) vs STA reordering per
  layer vs STA with the tokens kept in tile order (permute once).
* ``profile`` [40]: ``diffaccel profile`` on a saved random-weight SD1.5 pipeline
  (``--device cuda --dtype bf16``), wall time.

Writes eval/results/gpu_<section>.md (or into --out) and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

EVAL = Path(__file__).resolve().parent
CONFIGS = EVAL / "configs"
sys.path.insert(0, str(EVAL))

SECTIONS = ("kernels", "models", "compile", "sta", "profile")
BUDGET_S = {"kernels": 90, "models": 250, "compile": 40, "sta": 60, "profile": 40}  # H100 seconds, total 480


# ---- timing ------------------------------------------------------------------------------------

class Clock:
    """Per-call timer: CUDA events on GPU (read after a sync), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start) -> Callable[[], float]:
        """A function returning the elapsed milliseconds (valid after a synchronize)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: start.elapsed_time(end)
        elapsed = (time.perf_counter() - start) * 1e3
        return lambda: elapsed

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


class CallTimer:
    """Times every forward of ``module`` (hooks outermost, so cache hooks are inside)."""

    def __init__(self, module: torch.nn.Module, clock: Clock):
        self.clock, self.pending, self.readers = clock, [], []
        self.handles = [module.register_forward_pre_hook(lambda *a: self.pending.append(clock.start())),
                        module.register_forward_hook(lambda *a: self.readers.append(clock.stop(self.pending.pop())))]

    def take(self) -> list[float]:
        self.clock.sync()
        out = [read() for read in self.readers]
        self.readers = []
        return out

    def close(self):
        for handle in self.handles:
            handle.remove()


def median_ms(fn, clock: Clock, warmup: int = 1, repeats: int = 3) -> float:
    for _ in range(warmup):
        fn()
    clock.sync()
    times = []
    for _ in range(repeats):
        start = clock.start()
        fn()
        reader = clock.stop(start)
        clock.sync()
        times.append(reader())
    return statistics.median(times)


class Guard:
    """Per-section time guard: rows after the budget are skipped with a note."""

    def __init__(self, section: str, seconds: float):
        self.section, self.seconds, self.start = section, seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, estimate: float = 0.0) -> bool:
        return self.left() > estimate


# ---- report ------------------------------------------------------------------------------------

class Table:
    """A markdown file rewritten after every row (a killed run keeps what it measured)."""

    def __init__(self, path: Path, title: str, notes: list[str], columns: list[str]):
        self.path, self.title, self.notes, self.columns, self.rows = path, title, notes, columns, []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])
        print(f"[{self.path.stem}] " + " | ".join(self.rows[-1]), flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.path.stem}] {text}", flush=True)
        self.write()

    def write(self) -> None:
        lines = [f"# {self.title}", "", *self.notes, "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        self.path.write_text("\n".join(lines) + "\n")


def short_error(exc: BaseException) -> str:
    return ("ERROR " + f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " "))[:180]


# ---- models ------------------------------------------------------------------------------------

@dataclass
class Model:
    name: str
    config: str
    kind: str  # unet / dit / video
    steps: int  # steps of the measured call
    gen_steps: int  # the whole generation the per-call times are composed to
    est_s: float  # H100 seconds for all its variants, construction included
    smoke: dict = field(default_factory=dict)  # config overrides for the CPU smoke mode
    call: dict = field(default_factory=dict)  # pipeline size arguments (real run)
    smoke_call: dict = field(default_factory=dict)


MODELS = [
    Model("SD1.5 512px", "sd15_unet.json", "unet", 10, 50, 20,
          smoke=dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, attention_head_dim=4,
                     cross_attention_dim=32, norm_num_groups=8),
          call=dict(height=512, width=512), smoke_call=dict(height=64, width=64)),
    Model("SDXL 1024px", "sdxl_unet.json", "unet", 8, 50, 35,
          smoke=dict(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 1],
                     layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=16 + 6 * 8),
          call=dict(height=1024, width=1024), smoke_call=dict(height=64, width=64)),
    Model("PixArt-alpha 1024px", "pixart_alpha_1024_transformer.json", "dit", 10, 20, 30,
          smoke=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
                     sample_size=8, use_additional_conditions=False),  # the pipeline sends them at sample_size 128 only
          call=dict(height=1024, width=1024), smoke_call=dict(height=64, width=64)),
    Model("FLUX.1-dev 1024px", "flux_dev_transformer.json", "flux", 6, 28, 70,
          smoke=dict(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                     pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], in_channels=16),
          call=dict(height=1024, width=1024), smoke_call=dict(height=64, width=64)),
    Model("Wan2.1-1.3B 480p 81f", "wan21_t2v_1.3b_transformer.json", "wan", 3, 50, 55,
          smoke=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, ffn_dim=32, text_dim=32, freq_dim=16,
                     in_channels=4, out_channels=4, rope_max_seq_len=32),
          call=dict(height=480, width=832, num_frames=81), smoke_call=dict(height=64, width=64, num_frames=5)),
    Model("CogVideoX-2b 49x480x720", "cogvideox_2b_transformer.json", "cogvideox", 4, 50, 55,
          smoke=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, text_embed_dim=32, time_embed_dim=8,
                     in_channels=4, out_channels=4, sample_width=8, sample_height=8, sample_frames=9,
                     max_text_seq_length=8),
          call=dict(height=480, width=720, num_frames=49), smoke_call=dict(height=64, width=64, num_frames=9)),
]


def load_config(name: str, smoke: dict | None) -> dict:
    cfg = json.loads((CONFIGS / name).read_text())
    return cfg | (smoke or {})


def build_pipeline(model: Model, smoke: bool, device, dtype):
    """The model's real pipeline class around a random-weight denoiser; no VAE or text encoders
    (random prompt embeddings, latents out). Built on the device in ``dtype`` (fast init)."""
    import diffusers as D

    cfg = load_config(model.config, model.smoke if smoke else None)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: half the memory and time
    try:
        with torch.device(device):
            if model.kind == "unet":
                denoiser = D.UNet2DConditionModel.from_config(cfg).eval()
                scheduler = D.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
                common = dict(vae=None, text_encoder=None, tokenizer=None, unet=denoiser, scheduler=scheduler)
                if "xl" in model.config:
                    pipe = D.StableDiffusionXLPipeline(text_encoder_2=None, tokenizer_2=None, **common)
                else:
                    pipe = D.StableDiffusionPipeline(safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False, **common)
            elif model.kind == "dit":
                from diffusers.models.cache_utils import CacheMixin

                denoiser = D.PixArtTransformer2DModel.from_config(cfg).eval()
                # PixArt lacks CacheMixin; give it the mixin so diffusers' hooks install as on the others
                denoiser.__class__ = type(type(denoiser).__name__, (type(denoiser), CacheMixin), {})
                denoiser._cache_config = None
                pipe = D.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=denoiser,
                                             scheduler=D.DPMSolverMultistepScheduler())
            elif model.kind == "flux":
                denoiser = D.FluxTransformer2DModel.from_config(cfg).eval()
                pipe = D.FluxPipeline(scheduler=D.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                      tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=denoiser)
            elif model.kind == "wan":
                denoiser = D.WanTransformer3DModel.from_config(cfg).eval()
                pipe = D.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=denoiser,
                                     scheduler=D.UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction",
                                                                         use_flow_sigmas=True))
            elif model.kind == "cogvideox":
                denoiser = D.CogVideoXTransformer3DModel.from_config(cfg).eval()
                pipe = D.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=denoiser,
                                           scheduler=D.CogVideoXDDIMScheduler(timestep_spacing="trailing"))
            elif model.kind == "hunyuan":
                denoiser = D.HunyuanVideoTransformer3DModel.from_config(cfg).eval()
                pipe = D.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=denoiser, vae=None,
                                              scheduler=D.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                              text_encoder_2=None, tokenizer_2=None)
            else:
                raise ValueError(model.kind)
    finally:
        torch.set_default_dtype(previous)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer


def call_kwargs(model: Model, pipe, smoke: bool, steps: int, device, dtype) -> dict:
    """Random prompt embeddings of the model's text width; seeded latents via the generator."""
    cfg = denoiser_of(pipe).config
    g = torch.Generator().manual_seed(0)
    emb = lambda n, d: torch.randn(1, n, d, generator=g).to(device, dtype)  # noqa: E731
    kw = dict(num_inference_steps=steps, output_type="latent", **(model.smoke_call if smoke else model.call))
    if model.kind == "unet":
        d = cfg.cross_attention_dim
        kw.update(prompt_embeds=emb(77, d), negative_prompt_embeds=emb(77, d), guidance_scale=7.5)
        if "xl" in model.config:
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw.update(pooled_prompt_embeds=emb(1, pooled)[:, 0], negative_pooled_prompt_embeds=emb(1, pooled)[:, 0])
    elif model.kind == "dit":
        text = 120 if not smoke else 8
        kw.update(prompt_embeds=emb(text, cfg.caption_channels), negative_prompt_embeds=emb(text, cfg.caption_channels),
                  prompt_attention_mask=torch.ones(1, text, device=device),
                  negative_prompt_attention_mask=torch.ones(1, text, device=device), negative_prompt=None,
                  guidance_scale=4.5, use_resolution_binning=False)
    elif model.kind == "flux":
        text = 512 if not smoke else 8
        kw.update(prompt_embeds=emb(text, cfg.joint_attention_dim),
                  pooled_prompt_embeds=emb(1, cfg.pooled_projection_dim)[:, 0], guidance_scale=3.5)
    elif model.kind == "wan":
        text = 512 if not smoke else 8
        kw.update(prompt_embeds=emb(text, cfg.text_dim), negative_prompt_embeds=emb(text, cfg.text_dim),
                  guidance_scale=5.0)
    elif model.kind == "cogvideox":
        text = cfg.max_text_seq_length
        kw.update(prompt_embeds=emb(text, cfg.text_embed_dim), negative_prompt_embeds=emb(text, cfg.text_embed_dim),
                  guidance_scale=6.0)
    elif model.kind == "hunyuan":
        text = 256 if not smoke else 8
        kw.update(prompt_embeds=emb(text, cfg.text_embed_dim), pooled_prompt_embeds=emb(1, cfg.pooled_projection_dim)[:, 0],
                  prompt_attention_mask=torch.ones(1, text, device=device), guidance_scale=6.0)
    return kw


def run_call(pipe, kw):
    kw = dict(kw)
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(0), **kw)


# ---- variants ----------------------------------------------------------------------------------

class TimestepProbe:
    """diffusers' PAB / FasterCache hooks ask for the current timestep."""

    def __init__(self, denoiser):
        self.t = 1000.0
        self.handle = denoiser.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor) and t.numel():
            self.t = float(t.reshape(-1)[0])


def variants(model: Model, pipe, probe: TimestepProbe, mag_ratios) -> dict[str, tuple[Callable, Callable]]:
    """name -> (enable, disable): baseline, diffaccel presets and methods, peers at matched settings."""
    import diffaccel

    def ours(**kwargs):
        return (lambda: diffaccel.accelerate(pipe, **kwargs)), (lambda: diffaccel.disable(pipe))

    out = {"baseline": (lambda: None, lambda: None)}
    for preset in ("quality", "balanced", "fast"):
        out[f"diffaccel preset {preset}"] = ours(preset=preset)
    if model.kind == "unet":
        import tomesd
        from DeepCache import DeepCacheSDHelper

        helper = {}

        def deepcache_on():
            helper["h"] = DeepCacheSDHelper(pipe=pipe)
            helper["h"].set_params(cache_interval=3, cache_branch_id=0)
            helper["h"].enable()

        out["diffaccel DeepCache(N=3, branch 0)"] = ours(methods=[diffaccel.DeepCache(interval=3, branch=0)])
        out["DeepCache lib (N=3, branch 0)"] = (deepcache_on, lambda: helper.pop("h").disable())
        out["diffaccel ToMe(0.5)"] = ours(methods=[diffaccel.ToMe(ratio=0.5)])
        out["tomesd(0.5)"] = (lambda: tomesd.apply_patch(pipe, ratio=0.5), lambda: tomesd.remove_patch(pipe))
        return out
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    tr, now = pipe.transformer, (lambda: probe.t)
    scope = []
    fmt = "BFCHW" if model.kind in ("wan", "cogvideox", "hunyuan") else "BCHW"

    def peer(make):
        def enable():
            tr.enable_cache(make())
            if model.kind == "dit":  # PixArt's pipeline sets no cache context: hold one for the call
                scope.append(tr.cache_context("cond"))
                scope[-1].__enter__()

        def disable():
            if scope:
                scope.pop().__exit__(None, None, None)
            tr.disable_cache()

        return enable, disable

    out["diffaccel AdaptiveCache(0.2)"] = ours(methods=[diffaccel.AdaptiveCache(threshold=0.2)])
    out["diffusers FirstBlockCache(0.2)"] = peer(lambda: FirstBlockCacheConfig(threshold=0.2))
    if mag_ratios is not None:
        out["diffusers MagCache(0.06)"] = peer(lambda: MagCacheConfig(threshold=0.06, num_inference_steps=model.steps,
                                                                      mag_ratios=mag_ratios))
    out["diffusers TaylorSeerCache(interval 3)"] = peer(lambda: TaylorSeerCacheConfig(cache_interval=3))
    out["diffaccel PAB"] = ours(methods=[diffaccel.PAB()])
    out["diffusers PAB (spatial 2)"] = peer(lambda: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=now))
    if model.kind != "flux":  # FLUX.1-dev is guidance-distilled: no CFG branch to cache
        out["diffaccel FasterCache"] = ours(methods=[diffaccel.FasterCache()])
        out["diffusers FasterCache"] = peer(lambda: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=now, attention_weight_callback=lambda _: 0.3, tensor_format=fmt,
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 641)))
    return out


def calibrate_magcache(model: Model, pipe, kw):
    from diffusers import MagCacheConfig

    tr = pipe.transformer
    tr.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=model.steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), tr.cache_context("cond"):
            run_call(pipe, kw)
    finally:
        tr.disable_cache()
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("[")]
    return json.loads(lines[-1]) if lines else None


@dataclass
class Measured:
    calls: list[float]  # ms per denoiser call
    peak_gb: float
    ideal: float | None  # FLOP ratio from diffaccel's accounting (diffaccel variants)
    calls_per_step: float


def measure_variant(pipe, kw, enable, disable, clock: Clock, device, warmup_steps: int = 2) -> Measured:
    import diffaccel

    timer = CallTimer(denoiser_of(pipe), clock)
    try:
        enable()
        try:
            warm = min(warmup_steps, kw["num_inference_steps"])
            run_call(pipe, dict(kw, num_inference_steps=warm))  # warm-up (allocations, autotune, first cached step)
            timer.take()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            run_call(pipe, kw)
            calls = timer.take()
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            ideal = None
            if _accelerated(pipe):
                saved = diffaccel.stats(pipe).get("flops_saved_fraction")
                ideal = 1.0 / max(1e-9, 1.0 - saved) if saved is not None else None
        finally:
            disable()
    finally:
        timer.close()
    return Measured(calls, peak, ideal, len(calls) / kw["num_inference_steps"])


def _accelerated(pipe) -> bool:
    import diffaccel

    try:
        return bool(diffaccel.stats(pipe).get("methods"))
    except Exception:  # noqa: BLE001 -- not accelerated
        return False


def compose(measured: Measured, base_call_ms: float, gen_steps: int) -> tuple[float, float, float, float]:
    """(full ms, cached ms, cached fraction, whole-generation seconds)."""
    full = [c for c in measured.calls if c >= 0.7 * base_call_ms]
    cached = [c for c in measured.calls if c < 0.7 * base_call_ms]
    t_full = statistics.median(full) if full else float("nan")
    t_cached = statistics.median(cached) if cached else float("nan")
    fraction = len(cached) / len(measured.calls)
    per_call = (1 - fraction) * (t_full if full else 0.0) + fraction * (t_cached if cached else 0.0)
    return t_full, t_cached, fraction, gen_steps * measured.calls_per_step * per_call / 1e3


# ---- sections ----------------------------------------------------------------------------------

def section_kernels(args, guard: Guard, results: Path, device) -> list[str]:
    import gpu_kernels

    argv = ["--out", str(results / "gpu_kernels.md"), "--budget", str(max(1.0, guard.left() - 5))]
    if args.smoke:
        argv.append("--tiny")
    code = gpu_kernels.main(argv)
    return [f"kernels: gpu_kernels.py exited {code}; table in {results / 'gpu_kernels.md'}"]


def section_models(args, guard: Guard, results: Path, device, dtype, clock: Clock) -> list[str]:
    table = Table(results / "gpu_models.md", "diffaccel vs peers on real architectures (random weights)",
                  [header(args, device, dtype),
                   "Per variant: one warm-up call, then one measured call of `steps` steps; each denoiser call timed. "
                   "Calls >= 0.7x the baseline's median call count as full, the others as cached; the whole "
                   "generation of `gen steps` steps = steps x calls/step x (full share x full ms + cached share x "
                   "cached ms). achieved/ideal = speed-up / FLOP ratio (diffaccel's FLOP accounting; peers: none). "
                   "Peak memory: torch.cuda.max_memory_allocated during the measured call."],
                  ["model", "variant", "full ms/call", "cached ms/call", "cached share", "gen steps", "generation s",
                   "speed-up", "ideal", "achieved/ideal", "peak GB", "peak vs baseline"])
    summary = []
    for model in args.models:
        if not guard.allows(0 if args.smoke else model.est_s * 0.5):
            table.note(f"{model.name}: skipped (time guard, {guard.left():.0f} s left of {guard.seconds:.0f})")
            continue
        pipe = None
        try:
            pipe = build_pipeline(model, args.smoke, device, dtype)
            steps = 2 if args.smoke else model.steps
            model_steps = Model(**{**model.__dict__, "steps": steps})
            kw = call_kwargs(model, pipe, args.smoke, steps, device, dtype)
            probe = TimestepProbe(denoiser_of(pipe))
            mag = None
            if model.kind != "unet":
                try:
                    mag = calibrate_magcache(model_steps, pipe, kw)
                except Exception as exc:  # noqa: BLE001 -- the row says why
                    table.note(f"{model.name}: MagCache calibration failed: {short_error(exc)}")
            base = None
            for name, (enable, disable) in variants(model_steps, pipe, probe, mag).items():
                if not guard.allows():
                    table.add(model.name, name, "skipped (time guard)", *[""] * 9)
                    continue
                try:
                    m = measure_variant(pipe, kw, enable, disable, clock, device,
                                        warmup_steps=1 if model.kind in ("wan", "cogvideox") else 2)
                except Exception as exc:  # noqa: BLE001 -- a peer that cannot serve this model
                    traceback.print_exc()
                    table.add(model.name, name, short_error(exc), *[""] * 9)
                    continue
                if base is None:
                    base = (m, statistics.median(m.calls))
                full, cached, share, gen = compose(m, base[1], model.gen_steps)
                base_gen = compose(base[0], base[1], model.gen_steps)[3]
                speed = base_gen / gen if gen > 0 else float("nan")
                ideal = m.ideal if m.ideal is not None else None
                table.add(model.name, name, f"{full:.1f}", "" if math.isnan(cached) else f"{cached:.1f}", f"{share:.0%}",
                          model.gen_steps, f"{gen:.2f}", f"{speed:.2f}x", "" if ideal is None else f"{ideal:.2f}x",
                          "" if ideal is None else f"{speed / ideal:.2f}", f"{m.peak_gb:.2f}",
                          f"{m.peak_gb / base[0].peak_gb - 1:+.1%}" if base[0].peak_gb == base[0].peak_gb else "")
                if name.startswith("diffaccel preset"):
                    summary.append(f"{model.name} {name}: {speed:.2f}x")
            probe.handle.remove()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            table.note(f"{model.name}: {short_error(exc)}")
        finally:
            pipe = None
            free(device)
    return summary


def section_compile(args, guard: Guard, results: Path, device, dtype, clock: Clock) -> list[str]:
    import diffaccel

    table = Table(results / "gpu_compile.md", "Eager vs torch.compile", [
        header(args, device, dtype),
        "Median ms per denoiser call over one measured call after a warm-up call (compile time excluded); "
        "torch.compile of the repeated blocks (`compile_repeated_blocks`) or the whole denoiser."],
        ["model", "variant", "eager ms/call", "compiled ms/call", "compile speed-up", "compile s"])
    names = ("PixArt-alpha 1024px", "SD1.5 512px")
    summary = []
    for model in [m for m in args.models if m.name in names]:
        if not guard.allows(0 if args.smoke else 20):
            table.note(f"{model.name}: skipped (time guard)")
            continue
        pipe = None
        try:
            pipe = build_pipeline(model, args.smoke, device, dtype)
            kw = call_kwargs(model, pipe, args.smoke, 2 if args.smoke else 6, device, dtype)
            for label, enable in (("baseline", lambda: None),
                                  ("diffaccel preset balanced", lambda: diffaccel.accelerate(pipe, preset="balanced"))):
                if not guard.allows():
                    table.add(model.name, label, "skipped (time guard)", "", "", "")
                    continue
                enable()
                eager = measure_variant(pipe, kw, lambda: None, lambda: None, clock, device)
                denoiser = denoiser_of(pipe)
                t0 = time.monotonic()
                compile_model(denoiser, args.smoke)
                run_call(pipe, dict(kw, num_inference_steps=2))
                clock.sync()
                compile_s = time.monotonic() - t0
                compiled = measure_variant(pipe, kw, lambda: None, lambda: None, clock, device)
                diffaccel.disable(pipe)
                _uncompile(denoiser)
                e, c = statistics.median(eager.calls), statistics.median(compiled.calls)
                table.add(model.name, label, f"{e:.1f}", f"{c:.1f}", f"{e / c:.2f}x", f"{compile_s:.0f}")
                summary.append(f"{model.name} {label}: compile {e / c:.2f}x")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            table.note(f"{model.name}: {short_error(exc)}")
        finally:
            pipe = None
            free(device)
    return summary


def compile_model(denoiser, smoke: bool) -> None:
    backend = "eager" if smoke else "inductor"  # CPU smoke: trace only (inductor's C++ build is minutes)
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(fullgraph=False, backend=backend)
    else:
        denoiser.compile(backend=backend)


def _uncompile(denoiser) -> None:
    for module in denoiser.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


STA_SHAPES = [  # name, model, config overrides, call sizes, tile, window
    ("CogVideoX-2b 13x30x45 (+226 text)", Model("CogVideoX-2b", "cogvideox_2b_transformer.json", "cogvideox", 2, 50, 0),
     {}, dict(height=480, width=720, num_frames=49), (1, 8, 8), (5, 3, 3)),
    ("HunyuanVideo-size 30x48x80 (+256 text), 2+2 blocks",
     Model("HunyuanVideo", "hunyuan_video_transformer.json", "hunyuan", 2, 50, 0),
     dict(num_layers=2, num_single_layers=2), dict(height=768, width=1280, num_frames=117), (6, 8, 8), (3, 3, 3)),
]
STA_SMOKE = {"cogvideox": (dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, text_embed_dim=32,
                                time_embed_dim=8, in_channels=4, out_channels=4, sample_width=8, sample_height=8,
                                sample_frames=9, max_text_seq_length=8), dict(height=64, width=96, num_frames=9),
                           (1, 2, 2), (1, 3, 3)),
             "hunyuan": (dict(num_layers=1, num_single_layers=1, num_refiner_layers=1, num_attention_heads=2,
                              attention_head_dim=8, text_embed_dim=32, pooled_projection_dim=8, rope_axes_dim=[2, 2, 4],
                              in_channels=4, out_channels=4), dict(height=64, width=96, num_frames=9),
                         (2, 2, 2), (1, 3, 3))}


def section_sta(args, guard: Guard, results: Path, device, dtype, clock: Clock) -> list[str]:
    import diffaccel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = Table(results / "gpu_sta.md", "Sliding-tile attention inside full transformer steps", [
        header(args, device, dtype),
        "Median ms per denoiser call (CFG as the pipeline runs it) over the sparse steps of a short pipeline call "
        "(full_attention_fraction=0). Dense: each SDPA backend; the fastest is the reference. 'per layer' reorders "
        "q, k, v into tiles in every attention call; 'permute once' keeps the tokens in tile order for the whole "
        "step (diffaccel.methods.tile_order). ideal = 1 / attention density (attention only)."],
        ["shape", "variant", "tile", "window", "density", "ms/call", "speed-up vs best dense", "ideal (attention)"])
    summary = []
    backends = {"SDPA default": None, "SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cudnn": SDPBackend.CUDNN_ATTENTION,
                "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION}
    for label, model, overrides, sizes, tile, window in STA_SHAPES:
        if not guard.allows(0 if args.smoke else 15):
            table.note(f"{label}: skipped (time guard)")
            continue
        if args.smoke:
            overrides, sizes, tile, window = STA_SMOKE[model.kind]
        pipe = None
        try:
            spec = Model(**{**model.__dict__, "smoke": overrides})
            pipe = build_pipeline(spec, True, device, dtype)  # "smoke" = apply the overrides
            spec_call = Model(**{**spec.__dict__, "call": sizes, "smoke_call": sizes})
            kw = call_kwargs(spec_call, pipe, args.smoke, 2, device, dtype)
            dense = {}
            for name, backend in backends.items():
                if not guard.allows():
                    break
                context = contextlib.nullcontext() if backend is None else sdpa_kernel([backend])
                try:
                    with context:
                        m = measure_variant(pipe, kw, lambda: None, lambda: None, clock, device, warmup_steps=1)
                except Exception as exc:  # noqa: BLE001 -- backend not available for this shape
                    table.add(label, name, "", "", "100%", short_error(exc)[:80], "", "")
                    continue
                dense[name] = statistics.median(m.calls)
                table.add(label, name, "", "", "100%", f"{dense[name]:.1f}", "", "")
            best = min(dense.values()) if dense else float("nan")
            for name, permute in (("STA per layer", False), ("STA permute once", True)):
                if not guard.allows():
                    table.add(label, name, tile, window, "", "skipped (time guard)", "", "")
                    continue
                config = diffaccel.SlidingTileAttention(tile=tile, window=window, full_attention_fraction=0.0,
                                                        min_tokens=0, permute_once=permute)
                stats = {}

                def enable(config=config):
                    diffaccel.accelerate(pipe, methods=[config])

                def disable():
                    stats.update(diffaccel.stats(pipe)["methods"]["sliding_tile"])
                    diffaccel.disable(pipe)

                try:
                    m = measure_variant(pipe, kw, enable, disable, clock, device, warmup_steps=1)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    table.add(label, name, tile, window, "", short_error(exc), "", "")
                    continue
                ms = statistics.median(m.calls)
                density = stats.get("mean_density", float("nan"))
                table.add(label, name, tile, window, f"{density:.1%}", f"{ms:.1f}", f"{best / ms:.2f}x",
                          f"{1 / density:.2f}x")
                summary.append(f"STA {label} {name}: {best / ms:.2f}x per step")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            table.note(f"{label}: {short_error(exc)}")
        finally:
            pipe = None
            free(device)
    return summary


def section_profile(args, guard: Guard, results: Path, device, dtype, clock: Clock) -> list[str]:
    """Save a random-weight SD1.5 pipeline (real U-Net and VAE, a small CLIP text encoder of the
    real width, the bundled tokenizer) and time ``diffaccel profile`` on it."""
    import diffusers as D
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    table = Table(results / "gpu_profile.md", "diffaccel profile on a real-size architecture", [
        header(args, device, dtype), "Random-weight SD1.5 U-Net and VAE (eval/configs), a 2-layer CLIP text encoder "
        "of width 768 and the bundled tokenizer, saved with save_pretrained; the CLI runs in a subprocess."],
        ["model", "command", "wall s", "exit"])
    model = MODELS[0]
    if not guard.allows(0 if args.smoke else 30):
        table.note("skipped (time guard)")
        return []
    with tempfile.TemporaryDirectory() as folder:
        unet_pipe = build_pipeline(model, args.smoke, "cpu", torch.float32)
        unet = unet_pipe.unet
        width = unet.config.cross_attention_dim
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"),
                                                  subfolder="tokenizer")
        text = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                                            num_attention_heads=max(1, width // 64), vocab_size=len(tokenizer),
                                            max_position_embeddings=77, projection_dim=width))
        vae = (D.AutoencoderKL.from_config(json.loads((CONFIGS / "sd_vae.json").read_text())) if not args.smoke else
               D.AutoencoderKL(block_out_channels=(8,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1))
        pipe = D.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                         scheduler=unet_pipe.scheduler, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
        pipe.save_pretrained(folder)
        pipe = unet_pipe = unet = None
        size = "64" if args.smoke else "512"
        command = ["diffaccel", "profile", folder, "--out", str(Path(folder) / "profile.json"), "--steps",
                   "2" if args.smoke else "10", "--num-prompts", "1" if args.smoke else "2", "--height", size, "--width",
                   size, "--device", device.type, "--dtype", "fp32" if args.smoke else "bf16", "--no-progress"]
        from diffaccel.cli import main as cli_main  # the command's own entry point, in this process (no re-import)

        t0 = time.monotonic()
        try:
            code = str(cli_main(command[1:]) or 0)
        except SystemExit as exc:
            code = str(exc.code)
        except Exception as exc:  # noqa: BLE001
            code = short_error(exc)
        wall = time.monotonic() - t0
        shown = " ".join(["diffaccel", "profile", "<saved SD1.5>", *command[3:]]).replace(folder, "<dir>")
        table.add("SD1.5 (random weights)", f"`{shown}`", f"{wall:.1f}", code.replace("|", "/").replace("\n", " "))
    return [f"diffaccel profile SD1.5: {wall:.1f} s (exit {code[:20]})"]


# ---- driver ------------------------------------------------------------------------------------

def header(args, device, dtype) -> str:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU smoke run (tiny configs, not a measurement)"
    return (f"Device: {name}; torch {torch.__version__}; {str(dtype).replace('torch.', '')}; "
            f"command: `bash eval/gpu_suite.sh` (eval/gpu_suite.py{' --smoke' if args.smoke else ''}).")


def free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plan(args) -> list[str]:
    lines = [f"plan ({'smoke' if args.smoke else 'GPU'}): section budgets in s: {BUDGET_S} (total {sum(BUDGET_S.values())})"]
    lines += [f"  models: {m.name}: ~{m.est_s:.0f} s ({m.steps} steps measured, composed to {m.gen_steps})"
              for m in args.models]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny configs, fp32, perf_counter (the test)")
    parser.add_argument("--out", default=None, help="folder for gpu_*.md (default eval/results)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--models", default=None, help="comma-separated substrings of model names")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every section budget")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke for the CPU dry run", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.models = [m for m in MODELS if not args.models or any(s in m.name for s in args.models.split(","))]
    results = Path(args.out) if args.out else EVAL / "results"
    results.mkdir(parents=True, exist_ok=True)
    clock = Clock(device)
    print("\n".join(plan(args)), flush=True)
    summary, started = [], time.monotonic()
    for section in [s for s in SECTIONS if s in args.only.split(",")]:
        guard = Guard(section, BUDGET_S[section] * args.scale)
        t0 = time.monotonic()
        try:
            if section == "kernels":
                summary += section_kernels(args, guard, results, device)
            else:
                fn = globals()[f"section_{section}"]
                summary += fn(args, guard, results, device, dtype, clock)
        except Exception as exc:  # noqa: BLE001 -- one section never stops the next
            traceback.print_exc()
            summary.append(f"{section}: {short_error(exc)}")
        summary.append(f"[{section}] took {time.monotonic() - t0:.0f} s of {guard.seconds:.0f}")
    summary.append(f"total {time.monotonic() - started:.0f} s")
    (results / "gpu_summary.md").write_text("# GPU suite summary\n\n" + header(args, device, dtype) + "\n\n"
                                            + "\n".join(f"- {line}" for line in summary) + "\n")
    print("== summary ==\n" + "\n".join(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

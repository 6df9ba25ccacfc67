"""Fidelity of the DiT caches (FasterCache, PAB, AdaptiveCache, the presets) on the bundled
trained DiTs, next to diffusers' own cache hooks at matched settings.

    python eval/fidelity_dit.py --model tiny-dit   --seeds 0-7
    python eval/fidelity_dit.py --model tiny-video --seeds 0-7

A thin layer over diffaccel.evaluation (the same runner as eval/evaluate.py): every config
generates the same seeds and captions (--prompts bundled: training captions; heldout: the
held-out colour-shape pairs); PSNR / SSIM against the
baseline of the same seed, prompt-following read back from the pixels, measured denoiser FLOPs
saved, and wall speed-up (median of interleaved rounds). Extra config specs (e.g. candidate
preset values) go in with --configs. Writes eval/results/fidelity_dit_<model>.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

OURS = ("quality,balanced,fast,faster_cache,faster_cache:attention_interval=1,pab,pab:spatial_interval=3,"
        "adaptive_cache:threshold=0.05,adaptive_cache:threshold=0.1,adaptive_cache:threshold=0.2,max_consecutive=4")


def calibrate_mag_ratios(pipe, call_kwargs: dict, prompts: list[str], steps: int) -> list[float]:
    """diffusers MagCache prints per-step ratios after a calibration call (once per cache context:
    cond and uncond for Wan); average them over contexts and calibration captions (seeds 1000+,
    which no evaluation here uses)."""
    import contextlib
    import io
    import json

    import torch
    from diffusers import MagCacheConfig

    lists = []
    for i, prompt in enumerate(prompts):
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), torch.no_grad():
            pipe(prompt, generator=torch.Generator().manual_seed(1000 + i), output_type="np", **call_kwargs)
        pipe.transformer.disable_cache()
        lists += [json.loads(ln) for ln in buf.getvalue().splitlines() if ln.strip().startswith("[1")]  # the ratio lists
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios.")
    return [sum(col) / len(col) for col in zip(*lists)]


def cache_dit_config(threshold: float, fn_blocks: int = 1, warmup: int = 2, max_continuous: int = -1):
    """cache-dit's DBCache through its documented config. Its defaults (Fn_compute_blocks=8,
    max_warmup_steps=8) cache nothing on the bundled 6-block, 20-step models: 8 head blocks leave
    no block to cache, so Fn / warmup are set like ours (first block, 2 warm-up steps)."""
    import cache_dit

    return cache_dit.DBCacheConfig(residual_diff_threshold=threshold, Fn_compute_blocks=fn_blocks, Bn_compute_blocks=0,
                                   max_warmup_steps=warmup, max_continuous_cached_steps=max_continuous)


def peers(video: bool, steps: int, mag_ratios: list[float] | None = None) -> dict:
    """diffusers hook configs, settings matched to ours (same intervals and normalised time ranges).
    Its CFG skipping needs batched CFG: off for Wan (separate cond / uncond calls, each treated
    as unguided). cache-dit entries are ("cache-dit", DBCacheConfig) pairs."""
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig

    fmt = "BFCHW" if video else "BCHW"
    return {
        "diffusers PAB (spatial 2)": lambda now: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=now),
        "diffusers FasterCache": lambda now: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 700),
            current_timestep_callback=now, attention_weight_callback=lambda _: 0.5, tensor_format=fmt,
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 650),
            is_guidance_distilled=video),
        "diffusers FirstBlockCache(0.1)": lambda now: FirstBlockCacheConfig(threshold=0.1),
        "diffusers FirstBlockCache(0.2)": lambda now: FirstBlockCacheConfig(threshold=0.2),
        "diffusers MagCache(0.06)": lambda now: MagCacheConfig(threshold=0.06, num_inference_steps=steps,
                                                               mag_ratios=mag_ratios),
        "diffusers MagCache(0.12)": lambda now: MagCacheConfig(threshold=0.12, num_inference_steps=steps,
                                                               mag_ratios=mag_ratios),
        "cache-dit DBCache(0.1)": ("cache-dit", lambda: cache_dit_config(0.1)),
        "cache-dit DBCache(0.2)": ("cache-dit", lambda: cache_dit_config(0.2)),
    }


class _Peers:
    """Installs / removes one diffusers cache hook on the pipeline's transformer, or cache-dit."""

    def __init__(self, pipe):
        from bench_dit import TimestepProbe
        from diffusers.models.cache_utils import CacheMixin

        self.pipe, self.tr, self.active, self.cache_dit = pipe, pipe.transformer, False, False
        if not isinstance(self.tr, CacheMixin):  # PixArt: give it the mixin (as eval/bench_dit.py does)
            self.tr.__class__ = type(type(self.tr).__name__, (type(self.tr), CacheMixin), {})
            self.tr._cache_config = None
        self.probe = TimestepProbe(pipe)
        if type(pipe).__name__.startswith("PixArt"):  # its pipeline opens no cache context (batched CFG)
            self.tr.register_forward_pre_hook(self._context)

    def _context(self, module, args):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        if self.active:  # before each call: the context does not survive from one pipeline call to the next
            _set_cache_context(module, CacheContext("cond"))

    def clear(self):
        if self.active:
            self.tr.disable_cache()
            self.active = False
        if self.cache_dit:
            import cache_dit

            cache_dit.disable_cache(self.pipe)
            self.cache_dit = False

    def install(self, make):
        self.clear()
        if isinstance(make, tuple):  # ("cache-dit", config factory)
            import cache_dit

            cache_dit.enable_cache(self.pipe, cache_config=make[1]())
            self.cache_dit = True
            return
        self.tr.enable_cache(make(lambda: self.probe.t))
        self.active = True


def wrap(configs, pipe, video: bool, steps: int, with_peers: bool):
    """Our configs first clear any peer; peer configs install theirs (MagCache calibrated first)."""
    from diffaccel.evaluation.configs import EvalConfig

    hooks = _Peers(pipe)

    class Ours(EvalConfig):
        def apply(self, p):
            hooks.clear()
            return super().apply(p)

    class Peer(EvalConfig):
        make = None

        def apply(self, p):
            import diffaccel

            diffaccel.disable(p)
            hooks.install(self.make)
            return p

    out = [Ours(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}) for c in configs]
    table = {}
    if with_peers:
        from diffaccel.bundled.loader import default_call_kwargs
        from diffaccel.evaluation.generation import builtin_prompts

        calibration = builtin_prompts("bundled", video)[-2:]  # training captions no seed 0-15 run uses
        ratios = calibrate_mag_ratios(pipe, default_call_kwargs("tiny-video" if video else "tiny-dit"), calibration, steps)
        table = peers(video, steps, ratios)
        try:
            import cache_dit  # noqa: F401
        except ImportError as exc:
            print(f"cache-dit unavailable ({exc}): its rows are left out", file=sys.stderr)
            table = {k: v for k, v in table.items() if not isinstance(v, tuple)}
    for name, make in table.items():
        peer = Peer(name)
        peer.make = make
        out.append(peer)
    return out


def main(argv=None) -> int:
    import torch

    from diffaccel.bundled.loader import default_call_kwargs, load_bundled
    from diffaccel.evaluation.configs import parse_configs
    from diffaccel.evaluation.report import markdown
    from diffaccel.evaluation.runner import EvalOptions, parse_seeds, run_evaluation

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny-dit", "tiny-video"), default="tiny-dit")
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--configs", default=OURS, help="our config specs (eval/evaluate.py syntax)")
    p.add_argument("--prompts", choices=("bundled", "heldout"), default="bundled")
    p.add_argument("--no-peers", action="store_true", help="skip diffusers' hooks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/fidelity_dit/<model>)")
    p.add_argument("--table", type=Path, default=None, help="default eval/results/fidelity_dit_<model>.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    video = args.model == "tiny-video"

    pipe = load_bundled(args.model)
    steps = default_call_kwargs(args.model)["num_inference_steps"]
    configs = wrap(parse_configs(args.configs), pipe, video, steps, not args.no_peers)
    results = run_evaluation(EvalOptions(model=args.model, out=args.out or Path("runs/fidelity_dit") / args.model,
                                         configs=configs, seeds=parse_seeds(args.seeds), repeats=args.repeats, prompts=args.prompts,
                                         pipe=pipe, progress=False))
    command = "python eval/fidelity_dit.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([f"# DiT caches on the bundled {args.model}", "", f"Command: `OMP_NUM_THREADS=1 {command}`  ",
                      "CPU fp32, 1 thread on a shared 2-core machine (load ~15): wall speed-ups are noisy; the FLOPs "
                      "column is exact. Rows named diffusers ... are diffusers' own hooks.", "", markdown(results)])
    table = args.table or REPO / "eval" / "results" / f"fidelity_dit_{args.model}.md"
    table.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

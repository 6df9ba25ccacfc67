"""DiT caches vs the peers at MATCHED cost on the bundled trained DiTs: sweeps, Pareto view.

    python eval/fidelity_dit_pareto.py run    --model tiny-dit --seeds 0-15 --configs "baseline;fbc:0.1;adaptive_cache:threshold=0.1"
    python eval/fidelity_dit_pareto.py report --model tiny-dit [--prompts heldout]

``run`` generates every (config, seed) once and stores the output with the denoiser FLOPs of
that very call (FlopCounterMode, CPU SDPA counted): data-dependent caches (AdaptiveCache,
FirstBlockCache, cache-dit) skip different steps for different seeds, so FLOPs saved is the
mean over the same seeds the fidelity is measured on, not one seed's. Finished samples are
skipped, so an interrupted run resumes (``--max-seconds`` stops it cleanly between samples).
``report`` scores everything stored (PSNR/SSIM vs the baseline of the same seed, prompt-
following read from the pixels) and prints the Pareto / matched tables.

Config specs, separated by ";": ``baseline``; ours in eval/evaluate.py syntax
(``adaptive_cache:threshold=0.1,max_consecutive=4``, ``pab``, a preset name); peers:
``fbc:T`` (diffusers FirstBlockCache), ``mag:T[:K]`` (diffusers MagCache, threshold T,
max_skip_steps K, ratios calibrated on seeds/captions outside the evaluation),
``dpab:N`` (diffusers PAB, spatial interval N), ``dfc:N`` (diffusers FasterCache, spatial
interval N), ``cachedit:T[:F[:W[:C]]]`` (cache-dit DBCache: residual_diff_threshold T, Fn_compute_blocks F,
max_warmup_steps W, max_continuous_cached_steps C; here 1, 2, -1 unless given; cache-dit's own
defaults are 0.08, 8, 8, -1). Experiment:
``xanchor:<adaptive_cache params>`` = our AdaptiveCache with FirstBlockCache's decision rule
(compare with the last computed step, no accumulation); ``xjoint:`` = CFG branches decide
together (all compute when one must); ``xboth:`` = both; ``xlead:`` = the conditional branch
decides for both (batched or separate CFG alike).
After the configs, baseline seed 0 is generated again and compared with the stored one: the
peers' removal must leave the pipeline as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

PEER_KINDS = ("fbc", "mag", "dpab", "dfc", "cachedit")


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", spec)


def anchor_rule(pipe) -> None:
    """Experiment: AdaptiveCache deciding like FirstBlockCache -- compare the head residual with
    the one of the last COMPUTED step (the anchor) instead of accumulating step-to-step changes."""
    from diffaccel.api import session_of
    from diffaccel.methods.adaptive_cache import _AdaptiveInstalled

    handle = next(h for h in session_of(pipe).installed if isinstance(h, _AdaptiveInstalled))
    original = handle._decide

    def decide(head_residual):
        for state in handle.branches.values():
            if getattr(state, "anchor", None) is not None:
                state.signal, state.accumulated = state.anchor, 0.0  # d is then |r - anchor| / |anchor|
        plan = original(head_residual)
        for name, compute in plan:
            state = handle.branches[name]
            if compute or getattr(state, "anchor", None) is None:
                state.anchor = state.signal
        return plan

    handle._decide = decide  # anchors live on the branch states, which every call rebuilds


def joint_rule(pipe) -> None:
    """Experiment: the CFG branches keep separate state but decide together -- when one must
    compute, all compute (a stale conditional next to a fresh unconditional output is amplified
    by the guidance scale; both stale partly cancel). Only the counters in stats go wrong."""
    from diffaccel.api import session_of
    from diffaccel.methods.adaptive_cache import _AdaptiveInstalled

    handle = next(h for h in session_of(pipe).installed if isinstance(h, _AdaptiveInstalled))
    original = handle._decide

    def decide(head_residual):
        plan = original(head_residual)
        if any(c for _, c in plan) and not all(c for _, c in plan):
            for name, compute in plan:
                if not compute:
                    state = handle.branches[name]
                    state.accumulated, state.consecutive = 0.0, 0
                    if getattr(state, "anchor", None) is not None:  # xboth: a computed step is the new anchor
                        state.anchor = state.signal
            plan = [(name, True) for name, _ in plan]
        return plan

    handle._decide = decide


def lead_rule(pipe) -> None:
    """Experiment: the conditional branch decides, the unconditional one follows it in the same
    step -- the same in batched and in separate CFG calls (cond runs first in both)."""
    from diffaccel.api import session_of
    from diffaccel.methods.adaptive_cache import _AdaptiveInstalled

    handle = next(h for h in session_of(pipe).installed if isinstance(h, _AdaptiveInstalled))
    original, lead = handle._decide, {}

    def decide(head_residual):
        plan = original(head_residual)
        step = handle.session.ctx.step
        for name, compute in plan:
            if name == "cond":
                lead.update(step=step, compute=compute)
        out = []
        for name, compute in plan:
            state = handle.branches[name]
            has_cache = state.residual is not None or bool(state.block_residuals)
            follow = lead.get("compute", compute) if name == "uncond" and lead.get("step") == step else compute
            if follow and not compute:
                state.accumulated, state.consecutive = 0.0, 0
            elif compute and not follow and has_cache:
                state.consecutive = 1
            else:
                follow = compute if not has_cache else follow
            out.append((name, follow))
        return out

    handle._decide = decide


class Installer:
    """Puts one config (ours, a diffusers hook, or cache-dit) on the pipeline, removing the last."""

    def __init__(self, pipe, model: str, steps: int, call_kwargs: dict, calib_prompts: list[str]):
        from fidelity_dit import _Peers

        self.pipe, self.steps, self.video = pipe, steps, model == "tiny-video"
        self.hooks = _Peers(pipe)
        self.call_kwargs, self.calib_prompts = call_kwargs, calib_prompts
        self._mag = None

    def mag_ratios(self) -> list[float]:
        if self._mag is None:
            self.clear()
            from fidelity_dit import calibrate_mag_ratios

            self._mag = calibrate_mag_ratios(self.pipe, self.call_kwargs, self.calib_prompts, self.steps)
        return self._mag

    def clear(self):
        import diffaccel

        diffaccel.disable(self.pipe)
        self.hooks.clear()

    def install(self, spec: str):
        from diffaccel.evaluation.configs import parse_config

        self.clear()
        kind, _, rest = spec.partition(":")
        if spec == "baseline":
            return
        if kind == "xlead":
            parse_config("adaptive_cache:" + rest).apply(self.pipe)
            lead_rule(self.pipe)
            return
        if kind in ("xanchor", "xjoint", "xboth"):  # experiments: our cache with other decision rules
            parse_config("adaptive_cache:" + rest).apply(self.pipe)
            if kind != "xjoint":
                anchor_rule(self.pipe)
            if kind != "xanchor":
                joint_rule(self.pipe)  # wraps the anchored decision for xboth
            return
        if kind not in PEER_KINDS:
            parse_config(spec).apply(self.pipe)
            return
        args = [float(a) for a in rest.split(":")]
        if kind == "cachedit":
            from fidelity_dit import cache_dit_config

            self.hooks.install(("cache-dit", lambda: cache_dit_config(args[0], *(int(a) for a in args[1:]))))
            return
        self.hooks.install(self.peer_config(kind, args))

    def peer_config(self, kind: str, args: list[float]):
        from diffusers import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig

        if kind == "fbc":
            return lambda now: FirstBlockCacheConfig(threshold=args[0])
        if kind == "mag":
            ratios, extra = self.mag_ratios(), ({"max_skip_steps": int(args[1])} if len(args) > 1 else {})
            return lambda now: MagCacheConfig(threshold=args[0], num_inference_steps=self.steps, mag_ratios=ratios, **extra)
        if kind == "dpab":  # time range as in eval/fidelity_dit.py's matched default
            return lambda now: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(args[0]), spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=now)
        # dfc: Wan calls cond / uncond separately, diffusers' CFG skipping needs batched CFG (off there)
        return lambda now: FasterCacheConfig(
            spatial_attention_block_skip_range=int(args[0]), spatial_attention_timestep_skip_range=(-1, 700),
            current_timestep_callback=now, attention_weight_callback=lambda _: 0.5,
            tensor_format="BFCHW" if self.video else "BCHW", unconditional_batch_skip_range=5,
            unconditional_batch_timestep_skip_range=(-1, 650), is_guidance_distilled=self.video)


def denoiser_flops(pipe, prompt: str, seed: int, call) -> tuple:
    """(output, denoiser FLOPs) of one generation."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffaccel.evaluation import generation
    from diffaccel.flops import _register_cpu_sdpa_formula

    _register_cpu_sdpa_formula()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = generation.generate(pipe, prompt, seed, call)
    per_module = counter.get_flop_counts()
    name = type(pipe.transformer).__name__
    return out, int(sum(per_module.get(name, {}).values())), int(counter.get_total_flops())


def run(args) -> int:
    import numpy as np
    import torch

    from diffaccel.bundled.loader import default_call_kwargs, load_bundled
    from diffaccel.evaluation import generation
    from diffaccel.evaluation.runner import parse_seeds

    torch.set_num_threads(args.threads)
    start = time.monotonic()
    pipe = load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    video = args.model == "tiny-video"
    kwargs = default_call_kwargs(args.model)
    call = generation.CallSettings(dict(kwargs))
    prompts = generation.builtin_prompts(args.prompts, video)
    calib = generation.builtin_prompts("bundled", video)[-2:]  # training captions; seeds 1000+ (not evaluated)
    inst = Installer(pipe, args.model, kwargs["num_inference_steps"], kwargs, calib)
    out = args.out or REPO / "runs" / "pareto" / f"{args.model}-{args.prompts}"
    specs = ["baseline"] + [s.strip() for s in args.configs.split(";") if s.strip() and s.strip() != "baseline"]
    for spec in specs:
        folder = out / slug(spec)
        todo = [s for s in parse_seeds(args.seeds) if not (folder / f"seed{s:04d}.npz").is_file()]
        if not todo:
            continue
        try:
            inst.install(spec)
        except Exception as exc:  # a peer that cannot serve this model: record why, keep going
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "failed.txt").write_text(f"{type(exc).__name__}: {exc}")
            print(f"{spec}: failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr, flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "failed.txt").unlink(missing_ok=True)
        (folder / "spec.txt").write_text(spec)
        if spec.startswith("mag:"):
            (out / "mag_ratios.json").write_text(json.dumps(inst.mag_ratios()))
        for seed in todo:
            quiet = args.yield_to and Path(args.yield_to).exists()  # someone is timing: get off the CPU
            if quiet or (args.max_seconds and time.monotonic() - start > args.max_seconds):
                print(f"stopped ({'yielding' if quiet else f'after {args.max_seconds}s'}); rerun to resume", flush=True)
                inst.clear()
                return 3
            image, flops, total = denoiser_flops(pipe, prompts[seed % len(prompts)], seed, call)
            tmp = folder / f"seed{seed:04d}.partial.npz"
            np.savez(tmp, image=image, flops=flops, total_flops=total)
            os.replace(tmp, folder / f"seed{seed:04d}.npz")
        print(f"{spec}: done ({time.monotonic() - start:.0f}s)", flush=True)
    inst.clear()
    first = parse_seeds(args.seeds)[0]
    again, _, _ = denoiser_flops(pipe, prompts[first % len(prompts)], first, call)
    stored = np.load(out / "baseline" / f"seed{first:04d}.npz")["image"]
    same = bool(np.array_equal(again, stored))
    print(f"baseline seed {first} regenerated after all configs: identical to the stored one: {same}", flush=True)
    return 0 if same else 4


if __name__ == "__main__":
    from fidelity_dit_pareto_report import main as report_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "report"))
    p.add_argument("--model", choices=("tiny-dit", "tiny-video"), default="tiny-dit")
    p.add_argument("--seeds", default="0-15")
    p.add_argument("--configs", default="baseline")
    p.add_argument("--prompts", choices=("bundled", "heldout"), default="bundled")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--yield-to", default=None, help="stop between samples while this file exists")
    a = p.parse_args()
    raise SystemExit(run(a) if a.action == "run" else report_main(a))

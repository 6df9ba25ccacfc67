"""StepCache on the bundled DiTs: PSNR against the unaccelerated output and FLOPs saved, for the
presets, PSNR-planned schedules, and uniform schedules of the same cost.

    python eval/step_cache_eval.py --model tiny-video --split heldout --seeds 5000-5015
    python eval/step_cache_eval.py --model tiny-dit --split train --seeds 100-107 --psnr 35,30,25
    python eval/step_cache_eval.py --model tiny-sd --split heldout --seeds 5000-5015 --deepcache 10,7,6,5,4
    python eval/step_cache_eval.py --model tiny-sd --split heldout --seeds 5000-5015 --targets 3.5,4.2

Captions: ``train`` (tuning) or ``heldout`` (the held-out colour-shape pairs; report on these),
caption i goes with seed i. PSNR is over the decoded pixels in [0, 1]: pooled over the seeds (of the
mean MSE, the statistic evaluate.py checks promises with), their mean and their minimum; FLOPs saved
is diffaccel.stats' count. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import diffaccel
from diffaccel.bundled.loader import default_call_kwargs
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.metrics import psnr


def seeds_of(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def generate(pipe, prompt: str, seed: int) -> torch.Tensor:
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np")
    a = torch.from_numpy(np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float32))
    return a.reshape(-1, *a.shape[-3:])


def uniform_mask(n: int, computed: int) -> tuple[bool, ...]:
    """``computed`` steps spread evenly over ``n``, step 0 and the last included."""
    keep = {round(i * (n - 1) / (computed - 1)) for i in range(computed)} if computed > 1 else {0}
    return tuple(i in keep for i in range(n))


def deepcache_schedules(pipe, n: int, k: int) -> list[tuple[str, "diffaccel.DeepCache"]]:
    """(name, DeepCache config) with ``k`` full steps of ``n``: DeepCache's plan alone from the shipped profile (at
    the scheduler's timesteps; with its verified schedule and forecast where the profile has them), evenly
    spread, and every N steps where ceil(n / N) = k; the uniform ones also with each verified forecast."""
    from diffaccel.pipelines import detect
    from diffaccel.profiler.plan_deepcache import plan_deepcache
    from diffaccel.profiler.schedule import shipped_profile
    from diffaccel.profiler.plan_common import FORECASTS

    adapter = detect(pipe)
    profile = shipped_profile(adapter)
    for run in profile.calibration["deepcache_forecast"]["runs"]:  # DeepCache's own plan: without CfgCache
        run.pop("cfg", None)  # (--targets runs the plans that compose it)
    pipe.scheduler.set_timesteps(n)
    times = [adapter.normalised_time(t) for t in pipe.scheduler.timesteps]
    full, saved = float(profile.costs["call"]), float(profile.costs["deepcache_saved"]["0"])
    target = n * full / (k * full + (n - k) * (full - saved))  # exactly k full steps' speed-up
    plan = plan_deepcache(profile, times, target)
    planned = [i for i, c in enumerate(plan.computed) if c]
    forecast = f", forecast order {plan.config.forecast_order}" + (f" guard {plan.config.guard:g}" if plan.config.guard < 1 else "")
    out = [(f"DeepCache planned, {k} full{forecast if plan.config.forecast_order else ''}",
            diffaccel.DeepCache(schedule=planned, forecast_order=plan.config.forecast_order, guard=plan.config.guard))]
    uniform = [(f"DeepCache evenly spread, {k} full", [i for i, c in enumerate(uniform_mask(n, k)) if c])]
    uniform += [(f"DeepCache every {N}", list(range(0, n, N))) for N in range(2, n) if -(-n // N) == k]
    for name, steps in uniform:
        out += [(f"{name}{'' if label == 'order 0' else ', ' + label}", diffaccel.DeepCache(schedule=steps, forecast_order=o, guard=g))
                for label, (o, g) in FORECASTS.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-video")
    ap.add_argument("--split", default="heldout", choices=("train", "heldout"))
    ap.add_argument("--seeds", default="5000-5015")
    ap.add_argument("--psnr", default="", help="comma-separated PSNR targets for StepCache(min_psnr=...)")
    ap.add_argument("--veto", default="", help="comma-separated StepCache vetoes: each --psnr target also with each")
    ap.add_argument("--presets", action="store_true", help="also the quality / balanced / fast presets")
    ap.add_argument("--profile", default=None, help="profile JSON the --psnr and --presets configs plan from "
                    "(default: the one shipped with the model)")
    ap.add_argument("--drop-chaotic", action="store_true", help="leave out seeds whose unaccelerated output changes "
                    "under a 1e-4 perturbation of the initial noise (as the profile's validation does; they are listed)")
    ap.add_argument("--uniform", default="", help="comma-separated computed-step counts of uniform masks (order 1 and 0)")
    ap.add_argument("--deepcache", default="", help="U-Net: comma-separated full-step counts K; for each, DeepCache's "
                    "schedule planned from the shipped profile, K evenly spread steps, and every N steps where that gives K")
    ap.add_argument("--targets", default="", help="comma-separated speed-ups for accelerate(target_speedup=...) "
                    "(planned from the shipped profile; the methods the plan composes are named)")
    args = ap.parse_args()
    pipe = diffaccel.load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    video = args.model == "tiny-video"
    captions = builtin_prompts("bundled" if args.split == "train" else "heldout", video)
    seeds = seeds_of(args.seeds)
    runs = [(captions[s % len(captions)], s) for s in seeds]
    chaotic = []
    if args.drop_chaotic:
        from diffaccel.profiler.reuse_error import noise_sensitivity
        from diffaccel.profiler.verify_step_cache import CHAOTIC_DB

        sensitivity = noise_sensitivity(pipe, [c for c, _ in runs], [s for _, s in runs], {})
        chaotic = [s for (_, s), db in zip(runs, sensitivity) if db < CHAOTIC_DB]
        runs = [(c, s) for c, s in runs if s not in chaotic]
    refs = [generate(pipe, c, s) for c, s in runs]
    n = default_call_kwargs(args.model)["num_inference_steps"]  # what generate() runs: the bundled call
    configs = []
    if args.presets:
        configs += [(p, dict(preset=p, profile=args.profile)) for p in ("quality", "balanced", "fast")]
    vetoes = [0.0] + [float(v) for v in args.veto.split(",") if v]
    configs += [(f"StepCache(min_psnr={t}" + (f", veto={v:g})" if v else ")"), dict(methods=[diffaccel.StepCache(min_psnr=float(t), veto=v)], profile=args.profile))
                for t in args.psnr.split(",") if t for v in vetoes]
    for k in [int(k) for k in args.uniform.split(",") if k]:
        for order in (1, 0):
            configs.append((f"uniform {k}/{n} order {order}",
                            dict(methods=[diffaccel.StepCache(mask=uniform_mask(n, k), forecast_order=order)])))
    for k in [int(k) for k in args.deepcache.split(",") if k]:
        configs += [(name, dict(methods=[config])) for name, config in deepcache_schedules(pipe, n, k)]
    configs += [(f"target_speedup={t}", dict(target_speedup=float(t))) for t in args.targets.split(",") if t]
    print(f"model {args.model}, {args.split} captions, seeds {args.seeds} ({len(seeds)})"
          + (f"; left out chaotic seeds {chaotic}" if args.drop_chaotic else "") + "\n")
    print("| config | FLOPs saved | PSNR pooled (dB) | PSNR mean | PSNR min | computed steps |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, kw in configs:
        diffaccel.accelerate(pipe, **kw)
        ps, saved = [], []
        for (c, s), ref in zip(runs, refs):
            ps.append(psnr(generate(pipe, c, s), ref))
            st = diffaccel.stats(pipe)
            saved.append(st["flops_saved_fraction"])
        steps = next((m.get("computed_steps", m.get("full_steps")) for m in st["methods"].values()
                      if "computed_steps" in m or "full_steps" in m), "")
        if "target_speedup" in kw:  # the methods the plan installed
            name += " (" + " + ".join(m for m in st["methods"] if m != "profile_schedule") + ")"
        pooled = -10 * np.log10(np.mean([10 ** (-p / 10) for p in ps]))  # PSNR of the mean MSE, as evaluate.py
        print(f"| {name} | {100 * np.mean(saved):.1f}% | {pooled:.2f} | {np.mean(ps):.2f} | {np.min(ps):.2f} | {steps} |",
              flush=True)
        diffaccel.disable(pipe)


if __name__ == "__main__":
    main()

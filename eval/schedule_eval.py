"""Evaluate profile-chosen schedules on the bundled models against uniform schedules of equal cost.

For each model: profile it (8 prompts x 25 steps, timed), then at the model's default call
(20 steps):
  * predicted vs measured speed-up (denoiser FLOPs and wall) for targets 1.5x, 2x, 3x;
  * fidelity (PSNR vs the unaccelerated output, same seed) of the profile-chosen schedule vs the
    uniform schedule at equal cost: DeepCache (U-Net) / AdaptiveCache (DiT, video) with a fixed
    interval N, against the profile's plan for the speed-up that uniform schedule measured;
  * the spread of the redundancy pattern across prompts;
and on tiny-sd the portability check: a 50-step DDIM profile applied to 20 DPM-Solver++ steps and
to 64x64 images.

    python eval/schedule_eval.py --model tiny-sd            # trained bundled model from assets/
    python eval/schedule_eval.py --model tiny-sd --random-weights   # architecture only (no assets)
    python eval/schedule_eval.py --report                   # eval/results/schedules.md from the JSONs
    python eval/schedule_eval.py --model tiny-dit --eval-prompts 8 --resume --budget 240
        # in pieces: stops after ~240 s, a rerun continues (profile per prompt, then row by row)

Wall times are single runs interleaved with the baseline on the same prompt (mean over prompts);
on a shared CPU they are noisy, FLOPs are exact.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import diffaccel
from diffaccel.metrics import psnr
from diffaccel.profiler.measure import measure
from diffaccel.pipelines import detect
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.schedule import ProfileSchedule, plan_all

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (1.5, 2.0, 3.0)
INTERVALS = (2, 3, 4)


def load(model: str, random_weights: bool):
    if random_weights:
        from diffaccel.bundled.models import build_pipeline

        pipe = build_pipeline(model)
    else:
        pipe = diffaccel.load_bundled(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt, kwargs, seed=100):
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs)
    images = out.frames if hasattr(out, "frames") else out.images
    return images.float().clamp(0, 1), time.perf_counter() - start


def flops_speedup(pipe) -> float:
    return 1.0 / (1.0 - diffaccel.stats(pipe)["flops_saved_fraction"])


def run_with(pipe, prompts, kwargs, baselines, *, methods=None, profile=None, target=None):
    """Accelerated outputs for each prompt, interleaved with a fresh baseline timing."""
    psnrs, times, base_times, speedups, info = [], [], [], [], {}
    for prompt, (base_img, _) in zip(prompts, baselines):
        diffaccel.disable(pipe)
        base_times.append(generate(pipe, prompt, kwargs)[1])
        if methods is not None:
            diffaccel.accelerate(pipe, methods=methods())
        else:
            diffaccel.accelerate(pipe, profile=profile, target_speedup=target)
        img, sec = generate(pipe, prompt, kwargs)
        times.append(sec)
        speedups.append(flops_speedup(pipe))
        info = diffaccel.stats(pipe)["methods"]
        psnrs.append(psnr(img, base_img))
        diffaccel.disable(pipe)
    return {"psnr": statistics.mean(psnrs), "flops_speedup": statistics.mean(speedups),
            "wall_speedup": sum(base_times) / sum(times), "methods": _jsonable(info)}


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def uniform_methods(family, interval):
    if family == "unet":
        return lambda: [diffaccel.DeepCache(interval=interval, schedule="uniform")]
    # Static caching every `interval` steps: threshold never reached, reuse capped at interval - 1.
    return lambda: [diffaccel.AdaptiveCache(threshold=1e9, warmup=1, max_consecutive=interval - 1)]


def profiled_methods(family, profile, target):
    method = diffaccel.DeepCache() if family == "unet" else diffaccel.AdaptiveCache(warmup=1)

    def make():
        controlled = type(method)(**{k: v for k, v in method.to_dict().items() if k != "method"})
        return [ProfileSchedule(profile=profile, target_speedup=target, controlled=controlled), controlled]

    return make


def prompt_spread(partial_path, profile) -> dict:
    """Across prompts: coefficient of variation per (step, block) and correlation of prompt patterns."""
    runs = list(json.loads(Path(partial_path).read_text())["runs"].values())
    cols = [j for j, m in enumerate(profile.modules) if m["kind"] == "block"]
    mean, std = profile.stats["rel_l1"]["mean"], profile.stats["rel_l1"]["std"]
    cvs = [std[s][j] / mean[s][j] for s in range(1, len(mean)) for j in cols if mean[s][j]]
    flat = [[r["values"]["rel_l1"][s][j] for s in range(1, len(mean)) for j in cols] for r in runs]
    corr = [_pearson(flat[a], flat[b]) for a in range(len(flat)) for b in range(a + 1, len(flat))]
    return {"cv_median": statistics.median(cvs), "cv_p90": sorted(cvs)[int(0.9 * (len(cvs) - 1))], "cv_max": max(cvs),
            "pattern_corr_min": min(corr), "pattern_corr_mean": statistics.mean(corr), "prompts": len(runs)}


def _pearson(x, y):
    mx, my = statistics.mean(x), statistics.mean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


class OutOfTime(Exception):
    """The --budget ran out; what is done so far is saved and a --resume run continues."""


def evaluate(model: str, random_weights: bool, eval_prompts: int, profile_prompts: int, existing_profile=None,
             intervals=INTERVALS, portable: bool = True, resume: bool = False, budget: float | None = None) -> dict:
    from diffaccel.bundled.loader import default_call_kwargs
    from diffaccel.bundled.dataset import all_image_captions, all_video_captions
    from diffaccel.commands.profile import default_prompts

    pipe = load(model, random_weights)
    family = detect(pipe).family
    kwargs = default_call_kwargs(model)
    tag = model + ("-random" if random_weights else "")
    work = RESULTS / "profiles" / tag
    work.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"schedules_{tag}.json"
    settings = {"eval_prompts": eval_prompts, "profile_prompts": profile_prompts, "profile_from": existing_profile,
                "intervals": list(intervals)}
    result = {"model": model, "random_weights": random_weights, "family": family, "call": _jsonable(kwargs),
              "load_average_1min": os.getloadavg()[0], "settings": settings}
    if resume and out_path.is_file():
        saved = json.loads(out_path.read_text())
        if saved.get("settings") == settings and not saved.get("complete"):
            result = saved
    deadline = time.monotonic() + budget if budget else math.inf

    def checkpoint():  # save after every finished piece; stop once the budget is spent
        out_path.write_text(json.dumps(result, indent=1))
        if time.monotonic() > deadline:
            raise OutOfTime

    prompts = default_prompts(model)[:profile_prompts]
    if existing_profile:  # e.g. the shipped assets/<model>/profile.json: no re-profiling, no spread
        profile = load_profile(existing_profile, detect(pipe))
        result["profile_from"] = str(existing_profile)
    else:  # Profile: 8 prompts x 25 steps with the model's own scheduler, timed.
        partial = work / "p25.partial.json"
        if "spread" in result:  # profiled by an earlier piece of this run
            profile = load_profile(work / "profile.json", detect(pipe))
        else:
            if not resume:
                partial.unlink(missing_ok=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            profile = measure(pipe, prompts, {**kwargs, "num_inference_steps": 25}, model=model, partial_path=partial,
                              progress=False)
            # Wall seconds summed over resumed pieces; CPU time only when one process did it all.
            result["profile_seconds"] = profile.measured["seconds"]
            resumed = profile.measured["seconds"] > time.perf_counter() - start + 1
            result["profile_cpu_seconds"] = math.nan if resumed else time.process_time() - cpu_start
            result["profile_load_average_1min"] = os.getloadavg()[0]
            profile.save(work / "profile.json")
            result["spread"] = prompt_spread(partial, profile)
            print(model, "profiled in", round(result["profile_seconds"], 1), "s; spread", result["spread"], flush=True)
            checkpoint()

    captions = all_video_captions("heldout") if family == "video_dit" else all_image_captions("heldout")
    eval_set = captions[::max(1, len(captions) // eval_prompts)][:eval_prompts]
    baseline_file = work / f"baselines_{len(eval_set)}.pt"  # the same seed and prompts give the same images
    if resume and baseline_file.is_file():
        baselines = torch.load(baseline_file)
    else:
        baselines = [generate(pipe, p, kwargs) for p in eval_set]
        torch.save(baselines, baseline_file)

    rows = result.setdefault("targets", [])
    for target in TARGETS[len(rows):]:
        chosen, _ = plan_all(profile, target, kwargs["num_inference_steps"])
        got = run_with(pipe, eval_set, kwargs, baselines, profile=profile, target=target)
        # The re-planner's own prediction (for the call's actual timesteps) where there is one.
        replanned = got["methods"].get("profile_schedule", {})
        rows.append({"target": target, "method": chosen.method,
                     "predicted_flops": replanned.get("predicted_speedup", chosen.speedup),
                     "predicted_wall": replanned.get("predicted_wall_speedup", chosen.wall_speedup), **got})
        print(model, "target", target, rows[-1], flush=True)
        checkpoint()

    pairs = result.setdefault("equal_cost", [])
    for interval in intervals:
        pair = next((p for p in pairs if p["interval"] == interval), None)
        if pair is None:
            pair = {"interval": interval, "uniform": run_with(pipe, eval_set, kwargs, baselines,
                                                              methods=uniform_methods(family, interval))}
            pairs.append(pair)
            checkpoint()
        if "profiled" in pair:
            continue
        uniform = pair["uniform"]
        target = uniform["flops_speedup"] * 0.999  # plan for the cost the uniform schedule measured
        pair["profiled"] = run_with(pipe, eval_set, kwargs, baselines, methods=profiled_methods(family, profile, target))
        print(model, "interval", interval, "uniform", uniform["psnr"], uniform["flops_speedup"], "profiled",
              pair["profiled"]["psnr"], pair["profiled"]["flops_speedup"], flush=True)
        checkpoint()

    if model == "tiny-sd" and portable:
        result["portability"] = portability(pipe, model, prompts[:4], kwargs, eval_set[:1], work)
    result["complete"] = True
    return result


def portability(pipe, model, prompts, kwargs, eval_set, work) -> list[dict]:
    """Profile with 50 DDIM steps; apply to 20 DPM-Solver++ steps and to 64x64 images."""
    import diffusers

    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    p50 = measure(pipe, prompts, {**kwargs, "num_inference_steps": 50}, model=model, progress=False)
    p50.save(work / "profile_ddim50.json")
    rows = []
    settings = {"DPM-Solver++ 20 steps, 32x32": ("dpm", kwargs),
                "DDIM 20 steps, 64x64": ("ddim", {**kwargs, "height": 64, "width": 64})}
    for label, (sched, call) in settings.items():
        cls = diffusers.DPMSolverMultistepScheduler if sched == "dpm" else diffusers.DDIMScheduler
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        baselines = [generate(pipe, p, call) for p in eval_set]
        for target in TARGETS:
            got = run_with(pipe, eval_set, call, baselines, profile=p50, target=target)
            rows.append({"setting": label, "target": target, **got})
            print(model, label, target, got["flops_speedup"], got["psnr"], flush=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return rows


def report() -> str:
    lines = ["# Profile-chosen schedules: measured", ""]
    for path in sorted(RESULTS.glob("schedules_*.json")):
        r = json.loads(path.read_text())
        if "settings" in r and not r.get("complete"):  # a --budget run still in pieces
            continue
        weights = "RANDOM weights (architecture of the bundled model, not trained)" if r["random_weights"] else "trained bundled weights"
        lines += [f"## {r['model']} ({r['family']}), {weights}", "",
                  f"Call: {r['call']}. Load average during the run: {r['load_average_1min']:.1f} on 2 cores.", ""]
        if "spread" in r:
            sp = r["spread"]
            lines += [f"Profiling {sp['prompts']} prompts x 25 steps: {r['profile_seconds']:.0f} s wall "
                      f"(1-min load average {r['profile_load_average_1min']:.1f}; process CPU time "
                      f"{r.get('profile_cpu_seconds', float('nan')):.0f} s).", "",
                      f"Prompt spread of the block rel-L1 change: coefficient of variation across prompts median "
                      f"{sp['cv_median']:.3f}, 90th percentile {sp['cv_p90']:.3f}, max {sp['cv_max']:.3f}; correlation of "
                      f"per-prompt (step x block) patterns min {sp['pattern_corr_min']:.3f}, mean {sp['pattern_corr_mean']:.3f}.", ""]
        else:
            lines += [f"Profile: {r.get('profile_from')}.", ""]
            if "spread_of_profiling_run" in r:  # measured when this model was profiled by this script
                sp = r["spread_of_profiling_run"]
                lines += [f"Prompt spread ({sp['prompts']} prompts x 25 steps): coefficient of variation across prompts "
                          f"median {sp['cv_median']:.3f}, 90th percentile {sp['cv_p90']:.3f}, max {sp['cv_max']:.3f}; "
                          f"correlation of per-prompt patterns min {sp['pattern_corr_min']:.3f}, mean {sp['pattern_corr_mean']:.3f}.", ""]
        lines += [
                  "| target | method | predicted FLOPs | measured FLOPs | err | predicted wall | measured wall | err | PSNR dB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in r["targets"]:
            lines.append(f"| {t['target']}x | {t['method']} | {t['predicted_flops']:.2f}x | {t['flops_speedup']:.2f}x | "
                         f"{_err(t['flops_speedup'], t['predicted_flops'])} | {t['predicted_wall']:.2f}x | {t['wall_speedup']:.2f}x | "
                         f"{_err(t['wall_speedup'], t['predicted_wall'])} | {t['psnr']:.2f} |")
        lines += ["", "Equal cost (uniform interval N vs the profile's plan for the speed-up uniform measured):", "",
                  "| N | uniform FLOPs | uniform PSNR | profiled FLOPs | profiled PSNR | uniform PSNR at profiled FLOPs | winner |",
                  "|---|---|---|---|---|---|---|"]
        curve = sorted((p["uniform"]["flops_speedup"], p["uniform"]["psnr"]) for p in r["equal_cost"])
        for p in r["equal_cost"]:
            u, q = p["uniform"], p["profiled"]
            # Measured costs differ by a few %: also read the uniform PSNR off the uniform points at the
            # profiled plan's measured speed-up (linear between neighbours; "-" outside their range).
            same = _interpolate(curve, q["flops_speedup"])
            ref = u["psnr"] if same is None else same
            winner = "tie" if abs(q["psnr"] - ref) < 0.1 else "profile" if q["psnr"] > ref else "uniform"
            lines.append(f"| {p['interval']} | {u['flops_speedup']:.2f}x | {u['psnr']:.2f} | {q['flops_speedup']:.2f}x | "
                         f"{q['psnr']:.2f} | {'-' if same is None else f'{same:.2f}'} | {winner} |")
        if r.get("portability"):
            lines += ["", "Portability (profile: 50 DDIM steps, 32x32):", "",
                      "| applied to | target | measured FLOPs | off by | PSNR dB |", "|---|---|---|---|---|"]
            for p in r["portability"]:
                lines.append(f"| {p['setting']} | {p['target']}x | {p['flops_speedup']:.2f}x | {_err(p['flops_speedup'], p['target'])} | {p['psnr']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    (RESULTS / "schedules.md").write_text(text)
    return text


def _interpolate(points, x):
    """Linear interpolation in sorted (x, y) points; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    return None


def _err(measured, predicted):
    return f"{100 * (measured - predicted) / predicted:+.1f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny-sd", "tiny-dit", "tiny-video"])
    parser.add_argument("--random-weights", action="store_true", help="build the bundled architecture with random weights")
    parser.add_argument("--eval-prompts", type=int, default=2)
    parser.add_argument("--profile-prompts", type=int, default=8)
    parser.add_argument("--profile", help="use this profile instead of profiling (no spread / timing then)")
    parser.add_argument("--intervals", type=int, nargs="+", default=list(INTERVALS), help="uniform intervals to compare")
    parser.add_argument("--no-portability", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rebuild schedules.md from the saved JSONs")
    parser.add_argument("--resume", action="store_true", help="continue an unfinished run with the same settings")
    parser.add_argument("--budget", type=float, help="stop (saving what is done) after about this many seconds")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.model:
        try:
            result = evaluate(args.model, args.random_weights, args.eval_prompts, args.profile_prompts, args.profile,
                              tuple(args.intervals), not args.no_portability, args.resume, args.budget)
        except OutOfTime:
            print(f"budget of {args.budget:g} s spent; rerun with --resume to continue")
            return
        tag = args.model + ("-random" if args.random_weights else "")
        (RESULTS / f"schedules_{tag}.json").write_text(json.dumps(result, indent=1))
    print(report())


if __name__ == "__main__":
    main()

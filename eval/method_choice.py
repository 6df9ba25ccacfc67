"""Which planned method is better at a target: each DiT planner's plan, run for real.

    python eval/method_choice.py --model tiny-video --steps 25 --targets 1.5,2,2.5 --seeds 5000-5015

For every target, the plan of every planner of the family (StepCache, AdaptiveCache, PAB) is
installed as ``accelerate(target_speedup=...)`` installs the chosen one (re-planned per call where
the planner does), and run on held-out captions against the unaccelerated output of the same seed.
``plan_all`` ranks the methods by a measured preference (``Planner.preference``); this is the
measurement behind it. Prints a markdown table (pooled PSNR = of the mean MSE over the seeds).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import diffaccel
from diffaccel.bundled.loader import bundled_dir
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.profiler.planner import planners_for
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.schedule import ProfileSchedule, UnreachableTarget, plan_all, plan_method, planning_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-video", choices=("tiny-dit", "tiny-video"))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--targets", default="1.5,2,2.5")
    ap.add_argument("--seeds", default="5000-5015")
    args = ap.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    pipe = diffaccel.load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    profile = load_profile(bundled_dir() / args.model / "profile.json")
    captions = builtin_prompts("heldout", args.model == "tiny-video")
    runs = [(captions[s % len(captions)], s) for s in seeds]

    def generate(caption, seed):
        out = pipe(caption, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed), output_type="np")
        return np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float64)

    refs = [generate(c, s) for c, s in runs]
    times = planning_times(profile, args.steps)
    print(f"{args.model}, {args.steps} steps, held-out captions, seeds {args.seeds}\n")
    print("| target | method | chosen by plan_all | FLOPs saved | PSNR pooled (dB) | PSNR mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for target in (float(t) for t in args.targets.split(",")):
        chosen = plan_all(profile, target, args.steps)[0].method
        for planner in planners_for(profile.family):
            try:
                plan = plan_method(planner.name, profile, times, target)
            except UnreachableTarget:
                continue
            schedule = ProfileSchedule(profile=profile, target_speedup=target, controlled=plan.config)
            diffaccel.accelerate(pipe, methods=[schedule, plan.config] if planner.replans_per_call else [plan.config])
            mse, saved = [], []
            for (caption, seed), ref in zip(runs, refs):
                mse.append(float(((generate(caption, seed) - ref) ** 2).mean()))
                saved.append(diffaccel.stats(pipe)["flops_saved_fraction"])
            diffaccel.disable(pipe)
            per_seed = -10 * np.log10(np.maximum(mse, 1e-12))
            print(f"| {target:g} | {planner.name} | {'yes' if planner.name == chosen else ''} | {100 * np.mean(saved):.1f}% "
                  f"| {-10 * np.log10(max(np.mean(mse), 1e-12)):.2f} | {per_seed.mean():.2f} |", flush=True)


if __name__ == "__main__":
    main()

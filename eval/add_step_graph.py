"""Measure StepCache's step graph on a bundled DiT and store it in its shipped profile.

    python eval/add_step_graph.py tiny-video --prompts 3     # writes assets/tiny-video/profile.json

The graph (diffaccel.profiler.reuse_error.step_skip_errors) is measured at the model's default
call (20 steps) on training captions, seeds 0..prompts-1: every skip edge of up to 4 steps, forecast
orders 0 and 1, run as a real generation. ``diffaccel profile MODEL --step-graph N`` records the
same table while profiling from scratch.
"""
from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel
from diffaccel.bundled.loader import bundled_dir
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.pipelines import detect
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.plan_step_cache import candidates, one_more_skip, plan_of_mask, rule_candidates
from diffaccel.profiler.reuse_error import step_skip_errors, verify_step_schedules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=("tiny-dit", "tiny-video"))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-gap", type=int, default=4)
    ap.add_argument("--verify", type=int, default=4, help="training captions (seeds 100..) on which the planned "
                    "schedules are run and kept as verified ones (0: graph only)")
    ap.add_argument("--skip-graph", action="store_true", help="keep the stored graph, only verify")
    ap.add_argument("--rules", action="store_true", help="verify StepCache's rule schedules only and merge them "
                    "with the verified runs already stored")
    ap.add_argument("--computed", default="", help="verify only plans computing this many steps, e.g. 5-14")
    ap.add_argument("--refine", type=int, default=0, help="rounds of local search: verify every schedule that skips "
                    "one more step than a verified front schedule (FLOPs speed-up in --refine-range), keep the front. "
                    "Many rounds overfit the verification captions (eval/results/step_cache.md): check the presets "
                    "on other captions (eval/presets_table.py) after refining")
    ap.add_argument("--refine-range", default="1.2-3.0")
    args = ap.parse_args()
    pipe = diffaccel.load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    captions = builtin_prompts("bundled", args.model == "tiny-video")
    seeds = list(range(args.prompts))
    started = time.perf_counter()
    path = bundled_dir() / args.model / "profile.json"
    profile = load_profile(path)
    if not args.skip_graph:
        table = step_skip_errors(pipe, detect(pipe), [captions[s] for s in seeds], seeds, {}, max_gap=args.max_gap)
        profile.reuse_error["step_cache"] = table
        profile.save(path)
        print(f"{path}: step graph of {sum(len(r) for r in table['edges'].values())} edges in {time.perf_counter() - started:.0f} s")
    if args.refine:
        refine(pipe, profile, path, captions, args)
        return
    if args.verify:
        times = profile.reuse_error["step_cache"]["times"]
        previous = profile.calibration.pop("step_cache", None) if args.rules else None
        profile.calibration.pop("step_cache", None)
        lo, _, hi = args.computed.partition("-")
        keep = (lambda k: int(lo) <= k <= int(hi or lo)) if lo else (lambda k: True)
        plans = {p.config.mask + tuple(p.config.forecast_orders or ()): p for p in candidates(profile, times)
                 if keep(sum(p.computed))}
        if args.rules:
            plans = {p.config.mask + tuple(p.config.forecast_orders or ()): p for p in rule_candidates(profile, times)}
        vseeds = list(range(100, 100 + args.verify))
        runs = verify_step_schedules(pipe, detect(pipe), [captions[s % len(captions)] for s in vseeds], vseeds, {},
                                     [p.config for p in plans.values()])
        for run, plan in zip(runs, plans.values()):
            run["speedup"] = round(plan.speedup, 4)
        runs += previous["runs"] if previous else []
        # Keep the Pareto front: no other run both faster (or as fast) and better.
        save_front(profile, path, times, vseeds, runs)


def pareto(runs: list[dict]) -> list[dict]:
    """The runs no other run beats in both FLOPs speed-up (or ties) and PSNR."""
    return sorted((r for r in runs if not any(o["speedup"] >= r["speedup"] and o["psnr"] > r["psnr"] and o is not r
                                              for o in runs)), key=lambda r: r["speedup"])


def save_front(profile, path, times, seeds, runs) -> None:
    front = pareto(runs)
    profile.calibration["step_cache"] = {"times": times, "seeds": seeds, "runs": front,
                                         "statistic": "pooled PSNR (dB, of the mean MSE) over training captions vs the unaccelerated output"}
    profile.save(path)
    for r in front:
        print(f"  {r['speedup']:.2f}x  {r['psnr']:.2f} dB  skip {[i for i, c in enumerate(r['mask']) if not c]}")


def refine(pipe, profile, path, captions, args) -> None:
    """Local search from the verified front, on the same training captions and seeds."""
    cal = profile.calibration["step_cache"]
    times, vseeds, runs = cal["times"], cal["seeds"], list(cal["runs"])
    lo, _, hi = args.refine_range.partition("-")
    for round_ in range(args.refine):
        seen = {tuple(r["mask"]) + tuple(r["orders"]) for r in runs}
        todo = {}
        for r in pareto(runs):
            if float(lo) <= r["speedup"] <= float(hi):
                for mask, orders in one_more_skip(r["mask"], r["orders"]):
                    key = tuple(int(c) for c in mask) + tuple(orders)
                    if key not in seen:
                        todo[key] = plan_of_mask(profile, mask, orders, math.inf, "local search")
        print(f"refine round {round_ + 1}: {len(todo)} schedules")
        if not todo:
            break
        new = verify_step_schedules(pipe, detect(pipe), [captions[s % len(captions)] for s in vseeds], vseeds, {},
                                    [p.config for p in todo.values()])
        for run, plan in zip(new, todo.values()):
            run["speedup"] = round(plan.speedup, 4)
        runs = pareto(runs + new)
        save_front(profile, path, times, vseeds, runs)


if __name__ == "__main__":
    main()

"""Measure StepCache's step graph on a bundled DiT and store it in its shipped profile.

    python eval/add_step_graph.py tiny-video --prompts 3     # writes assets/tiny-video/profile.json
    python eval/add_step_graph.py tiny-dit --skip-graph --refine 3 --validate 300-323,0-15   # validated search

The graph (diffaccel.profiler.reuse_error.step_skip_errors) is measured at the model's default
call (20 steps) on training captions, seeds 0..prompts-1: every skip edge of up to 4 steps, forecast
orders 0 and 1, run as a real generation. ``diffaccel profile MODEL --step-graph N`` records the
same table while profiling from scratch.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel
from diffaccel.bundled.loader import bundled_dir
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.pipelines import detect
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.plan_step_cache import candidates, one_more_skip, plan_of_mask, rule_candidates
from diffaccel.profiler.reuse_error import noise_sensitivity, step_skip_errors, verify_step_schedules


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
                    "Without --validate many rounds overfit the verification captions (eval/results/step_cache.md)")
    ap.add_argument("--refine-range", default="1.2-3.0")
    ap.add_argument("--validate", default="", help="training-caption seeds, e.g. 300-323, on which every schedule "
                    "on the front (and every one entering it during --refine) is re-run: its PSNR becomes the lowest "
                    "over the seed sets it was run on (seeds whose baseline flips under a 1e-4 noise perturbation "
                    "are left out and listed); several sets: 300-323,0-15")
    args = ap.parse_args()
    if args.validate and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", args.validate):
        ap.error(f"--validate {args.validate!r}: give seed ranges such as 300-323 (several: 300-323,0-15)")
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
    if args.refine or args.validate:
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


CHAOTIC_DB = 60.0  # ordinary seeds measure 87-104 dB under a 1e-4 perturbation, chaotic ones ~33


def pareto(runs: list[dict]) -> list[dict]:
    """The runs no other run beats in both FLOPs speed-up (or ties) and PSNR."""
    return sorted((r for r in runs if not any(o["speedup"] >= r["speedup"] and o["psnr"] > r["psnr"] and o is not r
                                              for o in runs)), key=lambda r: r["speedup"])


def save_front(profile, path, times, seeds, runs, extra=None) -> None:
    front = pareto(runs)
    old = profile.calibration.get("step_cache", {})
    profile.calibration["step_cache"] = {"times": times, "seeds": seeds, "runs": front,
                                         "statistic": "pooled PSNR (dB, of the mean MSE) over training captions vs the unaccelerated output",
                                         **({"validation": old["validation"]} if "validation" in old else {}), **(extra or {})}
    if "validation" in profile.calibration["step_cache"]:
        profile.calibration["step_cache"]["statistic"] += "; psnr = the lowest over psnr_sets (verification and validation seeds)"
    profile.save(path)
    for r in front:
        print(f"  {r['speedup']:.2f}x  {r['psnr']:.2f} dB  skip {[i for i, c in enumerate(r['mask']) if not c]}")


def refine(pipe, profile, path, captions, args) -> None:
    """Local search from the verified front on the same training captions and seeds; with --validate,
    a schedule only enters the front with the PSNR it also keeps on the validation seeds."""
    cal = profile.calibration["step_cache"]
    times, vseeds, runs = cal["times"], cal["seeds"], list(cal["runs"])
    lo, _, hi = args.refine_range.partition("-")
    checks = [validation(pipe, profile, captions, spec) for spec in args.validate.split(",") if spec]
    extra = {"validation": {**cal.get("validation", {}), **{k: v for c in checks for k, v in c.info.items()}}} if checks else {}
    runs = validate_front(checks, runs)
    tried = {tuple(r["mask"]) + tuple(r["orders"]) for r in runs}
    if checks:
        save_front(profile, path, times, vseeds, runs, extra)
    for round_ in range(args.refine):
        todo = {}
        for r in pareto(runs):
            if float(lo) <= r["speedup"] <= float(hi):
                for mask, orders in one_more_skip(r["mask"], r["orders"]):
                    key = tuple(int(c) for c in mask) + tuple(orders)
                    if key not in tried:
                        todo[key] = plan_of_mask(profile, mask, orders, math.inf, "local search")
        tried |= set(todo)
        print(f"refine round {round_ + 1}: {len(todo)} schedules")
        if not todo:
            break
        new = verify_step_schedules(pipe, detect(pipe), [captions[s % len(captions)] for s in vseeds], vseeds, {},
                                    [p.config for p in todo.values()])
        for run, plan in zip(new, todo.values()):
            run["speedup"] = round(plan.speedup, 4)
        runs = validate_front(checks, runs + new)
        save_front(profile, path, times, vseeds, runs, extra)


def validate_front(checks, runs: list[dict]) -> list[dict]:
    """The front of ``runs`` once every schedule on it is validated on every seed set (only those pay for
    validation; one that was dominated by a schedule whose PSNR validation lowered may surface, so repeat)."""
    while True:
        todo = [(c, [r for r in pareto(runs) if c.spec not in r.get("psnr_sets", {})]) for c in checks]
        if not any(rs for _, rs in todo):
            return pareto(runs)
        for check, rs in todo:
            check(rs)


def validation(pipe, profile, captions, spec: str):
    """A function that re-runs schedules on the validation seeds and lowers their PSNR to what holds there."""
    first, _, last = spec.partition("-")
    seeds = list(range(int(first), int(last or first) + 1))
    prompts = [captions[s % len(captions)] for s in seeds]
    sensitivity = noise_sensitivity(pipe, prompts, seeds, {})
    chaotic = [s for s, db in zip(seeds, sensitivity) if db < CHAOTIC_DB]
    print(f"validation seeds {spec}: left out {chaotic} (baseline under a 1e-4 noise perturbation: "
          f"{[round(db, 1) for s, db in zip(seeds, sensitivity) if s in chaotic]} dB)")
    kept = [(p, s) for p, s in zip(prompts, seeds) if s not in chaotic]
    if not kept:
        raise SystemExit(f"--validate {spec}: every seed is chaotic (see above); give other seeds")

    def check(runs: list[dict]) -> None:
        if not runs:
            return
        configs = [plan_of_mask(profile, r["mask"], r["orders"], math.inf, "validation").config for r in runs]
        measured = verify_step_schedules(pipe, detect(pipe), [p for p, _ in kept], [s for _, s in kept], {}, configs)
        for r, m in zip(runs, measured):
            r.setdefault("psnr_sets", {"verification": r["psnr"]})[spec] = round(m["psnr"], 3)
            r["psnr"] = min(r["psnr_sets"].values())
        print(f"  validated {len(runs)} on {spec}: " + ", ".join(
            f"{r['speedup']:.2f}x " + "/".join(f"{v:.1f}" for v in r["psnr_sets"].values()) for r in runs))

    check.spec = spec
    check.info = {spec: {"seeds": [s for _, s in kept], "left_out_chaotic": chaotic}}
    return check


if __name__ == "__main__":
    main()

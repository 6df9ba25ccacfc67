"""Measure StepCache's step graph on a bundled DiT and store it in its shipped profile.

    python eval/add_step_graph.py tiny-video --prompts 3     # writes assets/tiny-video/profile.json
    python eval/add_step_graph.py tiny-dit --skip-graph --refine 3 --validate 300-323,0-15   # validated search
    python eval/add_step_graph.py tiny-dit --skip-graph --fresh --verify 12 --refine 1 --validate 300-323,0-15 \
        --stress 1000-1255:8     # a new front, also validated on the 8 seeds of 256 one skip changes most

The graph (diffaccel.profiler.reuse_error.step_skip_errors) is measured at the model's default
call (20 steps) on training captions, seeds 0..prompts-1: every skip edge of up to 4 steps, forecast
orders 0 and 1, run as a real generation. Verification, validation and the local search are
diffaccel.profiler.verify_step_cache's; ``diffaccel profile MODEL --step-graph N --verify M --validate K``
does the same for any DiT while profiling from scratch.
"""
from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel
from diffaccel.bundled.loader import bundled_dir
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.pipelines import detect
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.plan_step_cache import VERIFIED, graph_candidates, rule_candidates
from diffaccel.profiler.reuse_error import step_skip_errors
from diffaccel.profiler.verify_step_cache import (CHAOTIC_DB, SeedSet, distinct, pareto, refine_front, run_plans,
                                                  store_front, validate_front, verify_step_cache)

__all__ = ["main", "refine", "pareto", "validate_front", "CHAOTIC_DB"]  # the front's helpers, as before they moved


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
                    "one step more or one fewer than a verified front schedule (FLOPs speed-up in --refine-range), "
                    "keep the front. "
                    "Without --validate many rounds overfit the verification captions (eval/results/step_cache.md)")
    ap.add_argument("--refine-range", default="1.2-3.0")
    ap.add_argument("--validate", default="", help="training-caption seeds, e.g. 300-323, on which every schedule "
                    "on the front (and every one entering it during --refine) is re-run: its PSNR becomes the lowest "
                    "over the seed sets it was run on (seeds whose baseline flips under a 1e-4 noise perturbation "
                    "are left out and listed); several sets: 300-323,0-15")
    ap.add_argument("--confirm", default="", help="with --refine: training-caption seeds, e.g. 400-431, that the "
                    "search never measures; a schedule it puts on the front is kept only if it beats there the one "
                    "it replaced")
    ap.add_argument("--stress", default="", help="SEEDS:K, e.g. 1000-1255:8: screen those training-caption seeds by "
                    "how much one skipped step changes their output and validate on the K that change most")
    ap.add_argument("--fresh", action="store_true", help="with --refine / --validate / --stress: start from a new "
                    "verification on --verify captions (every candidate kept for validation), not the stored front")
    args = ap.parse_args()
    if args.stress and not re.fullmatch(r"\d+-\d+:\d+", args.stress):
        ap.error(f"--stress {args.stress!r}: give a seed range and a count such as 1000-1255:8")
    if args.confirm and not re.fullmatch(r"\d+(-\d+)?", args.confirm):
        ap.error(f"--confirm {args.confirm!r}: give one seed range such as 400-431")
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
        table = step_skip_errors(pipe, detect(pipe), [captions[s] for s in seeds], seeds, {}, max_gap=args.max_gap, progress=True)
        profile.reuse_error["step_cache"] = table
        profile.save(path)
        print(f"{path}: step graph of {sum(len(r) for r in table['edges'].values())} edges in {time.perf_counter() - started:.0f} s")
    if args.fresh:
        fresh(pipe, profile, path, captions, args)
        return
    if args.refine or args.validate or args.stress:
        refine(pipe, profile, path, captions, args)
        return
    if args.verify:
        times = profile.reuse_error["step_cache"]["times"]
        previous = profile.calibration.pop(VERIFIED, None)  # a fresh verification starts a fresh front
        previous = previous if args.rules else None
        lo, _, hi = args.computed.partition("-")
        keep = (lambda k: int(lo) <= k <= int(hi or lo)) if lo else (lambda k: True)
        plans = rule_candidates(profile, times) if args.rules else graph_candidates(profile, times)
        plans = distinct([p for p in plans if keep(sum(p.computed))])
        vseeds = list(range(100, 100 + args.verify))
        runs = run_plans(pipe, profile, plans, [captions[s % len(captions)] for s in vseeds], vseeds, {}, progress=True)
        runs += previous["runs"] if previous else []
        save(profile, path, store_front(profile, times, vseeds, runs))


def save(profile, path, entry) -> None:
    profile.save(path)
    for r in entry["runs"]:
        print(f"  {r['speedup']:.2f}x  {r['psnr']:.2f} dB  skip {[i for i, c in enumerate(r['mask']) if not c]}")


def seed_range(spec: str) -> list[int]:
    first, _, last = spec.partition("-")
    return list(range(int(first), int(last or first) + 1))


def with_captions(captions, seeds: list[int]) -> tuple[list, list[int]]:
    return [captions[s % len(captions)] for s in seeds], seeds


def stress_set(captions, args) -> tuple[list, list[int], int] | None:
    if not args.stress:
        return None
    spec, _, keep = args.stress.partition(":")
    return (*with_captions(captions, seed_range(spec)), int(keep))


def fresh(pipe, profile, path, captions, args) -> None:
    """A new front: the graph's candidates verified on --verify captions, validated, stressed and refined."""
    profile.calibration.pop(VERIFIED, None)
    entry = verify_step_cache(pipe, profile, *with_captions(captions, list(range(100, 100 + args.verify))), {},
                              validation=[with_captions(captions, seed_range(v)) for v in filter(None, args.validate.split(","))],
                              refine=args.refine, refine_range=tuple(float(x) for x in args.refine_range.split("-")),
                              progress=True, confirm=with_captions(captions, seed_range(args.confirm)) if args.confirm else None,
                              stress=stress_set(captions, args))
    for name, info in entry.get("validation", {}).items():
        print(f"{name}: seeds {info['seeds']}, left out chaotic {info['left_out_chaotic']}"
              + (f", lowest single-skip PSNR {info['single_skip_psnr']}" if "single_skip_psnr" in info else ""))
    save(profile, path, entry)


def refine(pipe, profile, path, captions, args) -> None:
    """Local search from the verified front on its own training captions and seeds; with --validate,
    a schedule only enters the front with the PSNR it also keeps on the validation seeds."""
    cal = profile.calibration[VERIFIED]
    vseeds = cal["seeds"]
    checks = []
    for spec in filter(None, args.validate.split(",")):
        check = SeedSet(pipe, profile, *with_captions(captions, seed_range(spec)), {}, spec, progress=True)
        print(f"validation seeds {spec}: left out chaotic seeds {check.chaotic}")
        checks.append(check)
    if args.stress:
        prompts, seeds, keep = stress_set(captions, args)
        check = SeedSet.stress(pipe, profile, prompts, seeds, {}, keep, progress=True)
        print(f"stress seeds {args.stress}: {check.info[check.spec]}")
        checks.append(check)
    confirm = None
    if args.confirm:
        confirm = SeedSet(pipe, profile, *with_captions(captions, seed_range(args.confirm)), {}, f"confirm {args.confirm}",
                          progress=True)
        print(f"confirmation seeds {args.confirm}: left out chaotic seeds {confirm.chaotic}")
    lo, _, hi = args.refine_range.partition("-")
    runs = refine_front(pipe, profile, list(cal["runs"]), *with_captions(captions, vseeds), {},
                        checks, args.refine, (float(lo), float(hi)), progress=True, confirm=confirm)
    info = {k: v for c in [*checks, *([confirm] if confirm else [])] for k, v in c.info.items()}
    save(profile, path, store_front(profile, cal["times"], vseeds, runs, info))


if __name__ == "__main__":
    main()

"""Verify DeepCache's forecasts on the bundled U-Net and store them in its shipped profile.

    python eval/add_deepcache_forecasts.py --prompts 48 --validate 300-323,0-15   # writes assets/tiny-sd/profile.json (as shipped)

The planner's schedules for a range of full-step counts run at the model's default call (20
steps; the profile was measured at 25) with each forecast of the deep features, alone and composed with
CfgCache, on training captions, seeds 100..; see
diffaccel.profiler.verify_deepcache. ``diffaccel profile UNET_MODEL --verify M`` does the same for
any U-Net while profiling from scratch.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel
from diffaccel.bundled.loader import bundled_dir, default_call_kwargs
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.verify_deepcache import verify_deepcache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd", choices=("tiny-sd",))
    ap.add_argument("--prompts", type=int, default=16, help="training captions (seeds 100..) the schedules run on")
    ap.add_argument("--validate", default="", help="comma-separated seed ranges (training captions) every run is "
                    "repeated on; a run keeps its lowest pooled PSNR over all sets, e.g. 300-323,0-15")
    args = ap.parse_args()
    pipe = diffaccel.load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    captions = builtin_prompts("bundled", False)
    seeds = list(range(100, 100 + args.prompts))
    path = bundled_dir() / args.model / "profile.json"
    profile = load_profile(path)
    started = time.perf_counter()
    call = {"num_inference_steps": default_call_kwargs(args.model)["num_inference_steps"]}  # where users run it
    validation = []
    for text in filter(None, args.validate.split(",")):
        lo, _, hi = text.partition("-")
        extra = list(range(int(lo), int(hi or lo) + 1))
        validation.append(([captions[s % len(captions)] for s in extra], extra))
    entry = verify_deepcache(pipe, profile, [captions[s % len(captions)] for s in seeds], seeds, call, progress=True,
                             validation=validation)
    profile.save(path)
    for run in entry["runs"]:
        for part, with_cfg in ((run, ""), (run.get("cfg"), " + CfgCache")):
            if part is not None:
                measured = "  ".join(f"{label} {db:.2f}" for label, db in part["psnr"].items())
                print(f"{len(run['full_steps']):2d} of {entry['steps']} full, {run['schedule']:8s}{with_cfg:11s}: {measured} dB"
                      f" -> {part['best']}")
    runs = len(entry["runs"]) * (2 if "cfg" in entry["runs"][0] else 1)
    print(f"{path}: {runs} schedules x 3 forecasts in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Measure StepCache's step graph on a bundled DiT and store it in its shipped profile.

    python eval/add_step_graph.py tiny-video --prompts 3     # writes assets/tiny-video/profile.json

The graph (diffaccel.profiler.reuse_error.step_skip_errors) is measured at the model's default
call (20 steps) on training captions, seeds 0..prompts-1: every skip edge of up to 4 steps, forecast
orders 0 and 1, run as a real generation. ``diffaccel profile MODEL --step-graph N`` records the
same table while profiling from scratch.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel
from diffaccel.bundled.loader import bundled_dir
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.pipelines import detect
from diffaccel.profiler.profile import load_profile
from diffaccel.profiler.reuse_error import step_skip_errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=("tiny-dit", "tiny-video"))
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--max-gap", type=int, default=4)
    args = ap.parse_args()
    pipe = diffaccel.load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    captions = builtin_prompts("bundled", args.model == "tiny-video")
    seeds = list(range(args.prompts))
    started = time.perf_counter()
    table = step_skip_errors(pipe, detect(pipe), [captions[s] for s in seeds], seeds, {}, max_gap=args.max_gap)
    path = bundled_dir() / args.model / "profile.json"
    profile = load_profile(path)
    profile.reuse_error["step_cache"] = table
    profile.save(path)
    print(f"{path}: step graph of {sum(len(r) for r in table['edges'].values())} edges in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""Add the text-only modules' costs to a bundled model's shipped profile (what TextCache's planner reads).

    python eval/add_text_costs.py tiny-dit tiny-video tiny-sd

Profiles made by this diffaccel record them while profiling (``costs["text_modules"]``: FLOPs per
denoiser call of each module TextCache would cache; ``costs["tokens"]``: text and visual tokens of
the profiled call; their wall seconds in ``costs["module_seconds"]``). For the shipped profiles this
measures one call at the profiled settings and adds only those entries: the wall seconds are scaled
by the profile's own call time over this run's, so they stay comparable with the rest of the
profile (timed on another day); every other entry, and so every other plan, is unchanged.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffaccel
from diffaccel.bundled.loader import bundled_dir
from diffaccel.pipelines import detect
from diffaccel.profiler.costs import measure_costs
from diffaccel.profiler.planner import planner_for
from diffaccel.profiler.profile import load_profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", choices=("tiny-sd", "tiny-dit", "tiny-video"))
    args = ap.parse_args()
    for model in args.models:
        path = bundled_dir() / model / "profile.json"
        profile = load_profile(path)
        pipe = diffaccel.load_bundled(model)
        pipe.set_progress_bar_config(disable=True)
        adapter = detect(pipe)
        call = {k: v for k, v in profile.measured["call_kwargs"].items() if k != "output_type"}
        prompt = "a red circle in the center on a black background"
        costs = measure_costs(pipe, adapter, prompt, call, 0, [planner_for("text_cache")])
        scale = float(profile.costs["call_seconds"]) / float(costs["call_seconds"])
        text = costs["text_modules"]
        profile.costs["text_modules"] = text
        profile.costs["tokens"] = costs["tokens"]
        profile.costs["module_seconds"].update({p: costs["module_seconds"][p] * scale for p in text})
        profile.save(path)
        share = sum(text.values()) / float(profile.costs["call"])
        print(f"{path}: {len(text)} text-only modules, {share:.1%} of a denoiser call's FLOPs; "
              f"tokens {costs['tokens']}")


if __name__ == "__main__":
    main()

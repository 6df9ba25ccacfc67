"""Wall time of a computed and of a skipped StepCache step on a bundled DiT (inside the denoiser's forward).

    python eval/skipped_step_cost.py --model tiny-dit --threads 2

Why the wall speed-up of whole-step skipping falls short of its FLOPs ratio on the 32-px models: a
skipped step still runs the denoiser's embeddings and output head, and the block hooks. Prints the
median per-step time of: every step computed; StepCache skipping every step after the first; the
same with TextCache; and, for the floor, the denoiser with its block list emptied (no hooks).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffaccel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-dit", choices=["tiny-dit", "tiny-video"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = diffaccel.load_bundled(args.model)
    pipe.set_progress_bar_config(disable=True)
    den = pipe.transformer
    attr = "transformer_blocks" if hasattr(den, "transformer_blocks") else "blocks"
    times: list[float] = []
    forward = den.forward

    def timed(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        times.append(time.perf_counter() - t)
        return out

    den.forward = timed
    steps = 20
    skip_all = tuple([True] + [False] * (steps - 1))

    def per_step(methods, empty=False) -> float:
        times.clear()
        if methods:
            diffaccel.accelerate(pipe, methods=methods)
        blocks = getattr(den, attr)
        if empty:
            setattr(den, attr, torch.nn.ModuleList())
        try:
            pipe("a red circle in the center on a black background", num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0))
        finally:
            setattr(den, attr, blocks)
            if methods:
                diffaccel.disable(pipe)
        return statistics.median(times[2:]) * 1e3  # the first two calls compute (step 0 of each CFG form)

    rows = {"computed": lambda: per_step(None),
            "skipped (StepCache)": lambda: per_step([diffaccel.StepCache(mask=skip_all, forecast_order=0)]),
            "skipped (TextCache + StepCache)": lambda: per_step([diffaccel.TextCache(),
                                                                diffaccel.StepCache(mask=skip_all, forecast_order=0)]),
            "no blocks, no hooks (floor)": lambda: per_step(None, empty=True)}
    got = {name: [] for name in rows}
    for _ in range(args.rounds):  # interleaved
        for name, run in rows.items():
            got[name].append(run())
    full = statistics.median(got["computed"])
    print(f"{args.model}, {args.threads} threads, median of {args.rounds} interleaved rounds (ms per denoiser call)")
    for name, values in got.items():
        ms = statistics.median(values)
        print(f"  {name:34s} {ms:7.3f} ms  ({ms / full:6.1%} of a computed step)")


if __name__ == "__main__":
    main()

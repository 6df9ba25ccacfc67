"""Headroom of a per-call choice among DeepCache schedules of equal cost on the bundled tiny-sd.

    python eval/per_call_oracle.py --seeds 0-15 --schedules "0,2,4,6,8,10,12,14,16,18" "0,1,3,5,7,9,11,13,15,17"

Each schedule (the full steps of a 20-step call, forecast order 1) runs on every seed; the table gives each
one's pooled PSNR against the unaccelerated output and the oracle's: for every seed the schedule that
turned out best for it, chosen after seeing the error. A real per-call rule decides before the error is
known, so the oracle bounds what one could gain over the best fixed schedule (eval/results/step_cache.md).
"""
from __future__ import annotations

import argparse
import math

import torch

import diffaccel
from diffaccel.bundled.loader import default_call_kwargs
from diffaccel.evaluation.generation import builtin_prompts
from diffaccel.evaluation.runner import parse_seeds
from diffaccel.metrics import psnr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-15", help="training-caption seeds, e.g. 0-15")
    p.add_argument("--schedules", nargs="+", required=True, help="full steps of each schedule, comma-separated")
    p.add_argument("--forecast-order", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    schedules = [[int(s) for s in text.split(",")] for text in args.schedules]
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    prompts = builtin_prompts("bundled", False)
    call = default_call_kwargs("tiny-sd")

    def image(prompt, seed):
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **call)
        return out.images.float().clamp(0, 1)

    mse = [[] for _ in schedules]
    for seed in parse_seeds(args.seeds):
        prompt = prompts[seed % len(prompts)]
        base = image(prompt, seed)
        for errors, full in zip(mse, schedules):
            diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(schedule=full, forecast_order=args.forecast_order)])
            try:
                errors.append(10 ** (-psnr(image(prompt, seed), base) / 10))
            finally:
                diffaccel.disable(pipe)

    def pooled(errors):
        return -10 * math.log10(sum(errors) / len(errors))

    print(f"tiny-sd, {call['num_inference_steps']} steps, seeds {args.seeds}, forecast order {args.forecast_order}\n")
    print("| full steps | pooled PSNR dB |\n| --- | --- |")
    for full, errors in zip(schedules, mse):
        print(f"| {full} | {pooled(errors):.2f} |")
    print(f"| oracle: the best schedule per seed | {pooled([min(e) for e in zip(*mse)]):.2f} |")


if __name__ == "__main__":
    main()

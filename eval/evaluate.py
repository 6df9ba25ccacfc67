"""Evaluate configs of a diffusion pipeline: fidelity, FID, CLIP score, prompt-following, speed.

    python eval/evaluate.py --model tiny-sd --configs baseline,balanced,fast --seeds 0-7 --out runs/tiny-sd
    accelerate launch --num_processes 2 --cpu eval/evaluate.py ...   # or torchrun; seeds dealt to ranks

Every (config, seed) sample is saved under OUT/samples/<config>/ and skipped when it exists, so
a killed run resumes where it stopped. Rank 0 writes OUT/results.json, OUT/results.md and
OUT/speed_quality.png. The core lives in diffaccel.evaluation (shared with `diffaccel demo`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    from diffaccel.cli import DefaultsFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
    p.add_argument("--model", required=True, help="bundled name (tiny-sd, tiny-dit, tiny-video), local pipeline folder or hub id")
    p.add_argument("--configs", default="baseline,balanced",
                   help="comma-separated: baseline, quality/balanced/fast, method lists like "
                        "deepcache:interval=3+tome:ratio=0.5, profile:PATH@2.0, target@2.0, fast@PROFILE.json (baseline is always added)")
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3,5 (seed s uses prompt s mod the number of prompts)")
    p.add_argument("--prompts", default=None,
                   help="file with one prompt per line, or a built-in set: bundled (default for bundled models), heldout, generic")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the bundled model's, else 20)")
    p.add_argument("--resolution", type=int, default=None, help="height = width in pixels (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip, video models (default: the model's)")
    p.add_argument("--out", required=True, type=Path, help="output folder (resumed if it holds this model's run)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available; one GPU per rank)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the checkpoint's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds per config at least (median); more follow until the medians are stable")
    p.add_argument("--timing-budget", type=float, default=60.0,
                   help="seconds after which no more timing rounds start (0: exactly --repeats)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per config before timing")
    p.add_argument("--inception", default=None,
                   help="FID features: TorchScript module file or torch-fidelity's FID Inception .pth (default: torch hub cache)")
    p.add_argument("--fid-ref", default=None,
                   help="FID reference: folder of images or .npz with mu, sigma, n (default: bundled dataset or baseline outputs)")
    p.add_argument("--clip", default=None, help="local CLIP model folder for CLIP score, named in the report (default: no CLIP score)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from diffaccel.evaluation.configs import parse_configs
    from diffaccel.evaluation.report import markdown
    from diffaccel.evaluation.runner import EvalOptions, parse_seeds, run_evaluation
    from diffaccel.validate import output_folder, positive_int

    try:
        if args.threads is not None:
            positive_int(args.threads, "--threads", "Leave it out for torch's default.")
            torch.set_num_threads(args.threads)
        output_folder(args.out, "--out")  # before loading and generating: a bad path fails now
        options = EvalOptions(model=args.model, out=args.out, configs=parse_configs(args.configs),
                              seeds=parse_seeds(args.seeds), prompts=args.prompts, steps=args.steps,
                              resolution=args.resolution, frames=args.frames, device=args.device, dtype=args.dtype,
                              repeats=args.repeats, timing_budget_s=args.timing_budget, warmup=args.warmup, inception=args.inception,
                              fid_ref=args.fid_ref, clip=args.clip, progress=not args.no_progress)
        results = run_evaluation(options)
    except (ValueError, OSError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    if results is not None:
        print(markdown(results))
        print(f"wrote {args.out / 'results.json'}, results.md, speed_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

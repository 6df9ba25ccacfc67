"""Fidelity of sliding tile attention and mediator attention on the bundled trained DiTs
(tiny-dit = PixArt-alpha, tiny-video = Wan), and searched windows vs a uniform window of
equal density.

    python eval/fidelity_sparse_attention.py --model tiny-dit   [--seeds 16]
    python eval/fidelity_sparse_attention.py --model tiny-video [--seeds 8]

For each setting: PSNR / SSIM of the output against the unaccelerated output of the same
seed and prompt (pooled), prompt-following (bundled pixel analyser: every captioned
attribute read back), FLOPs share saved (diffaccel.stats) and wall time. The window search
runs on calibration seeds disjoint from the evaluation seeds, at two target densities; the
uniform window compared with it is the one whose density is closest. Writes
eval/results/fidelity_sparse_attention_<model>.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def generate(pipe, prompts, seeds, call_kwargs, video: bool) -> np.ndarray:
    outputs = []
    for prompt, seed in zip(prompts, seeds):
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **call_kwargs)
        outputs.append(np.asarray(out.frames[0] if video else out.images[0]))
    return np.stack(outputs)


def model_grid(pipe, call_kwargs) -> tuple[int, int, int]:
    """Token grid of the denoiser's self-attention for these call arguments (one probe call)."""
    from diffaccel.pipelines import detect

    adapter, grids = detect(pipe), []
    hook = adapter.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: grids.append(adapter.grid_from_call(args, kwargs)), with_kwargs=True)
    try:
        pipe(prompt="probe", generator=torch.Generator().manual_seed(0), output_type="latent",
             **(call_kwargs | {"num_inference_steps": 1 if "num_frames" in call_kwargs else 2}))
    finally:
        hook.remove()
    return grids[0].frames, grids[0].height, grids[0].width


def settings(video: bool, grid, tile):
    from diffaccel.methods.mediator import MediatorAttention
    from diffaccel.methods.sliding_tile import SlidingTileAttention

    windows = [(1, 1, 1), (3, 1, 1), (3, 3, 3)] if video else [(1, 1, 1), (1, 3, 3)]
    out = [(f"STA tile {tile} window {w}", SlidingTileAttention(tile=tile, window=w, min_tokens=0)) for w in windows]
    out += [(f"STA window {windows[-1]}, no full-attention phase",
             SlidingTileAttention(tile=tile, window=windows[-1], min_tokens=0, full_attention_fraction=0.0))]
    for ratio in ((1 / 16, 1 / 4), (1 / 4, 1 / 2)):
        out.append((f"mediators {ratio[0]:.3g}->{ratio[1]:.3g} of tokens",
                    MediatorAttention(mediator_ratio=ratio, min_tokens=0)))
    return out


def main(argv=None) -> int:
    import diffaccel
    from diffaccel.api import session_of
    from diffaccel.bundled.analyser import prompt_following
    from diffaccel.bundled.loader import default_call_kwargs, load_bundled
    from diffaccel.evaluation.generation import builtin_prompts
    from diffaccel.kernels import sliding_tile_density
    from diffaccel.methods.sliding_tile import SlidingTileAttention, uniform_window_for_density
    from diffaccel.methods.window_search import search_windows
    from diffaccel.metrics import psnr, ssim

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny-dit", "tiny-video"), default="tiny-dit")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--calibration-seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: the bundled model's own")
    parser.add_argument("--random-weights", action="store_true",
                        help="smoke test: the bundled architecture untrained (quality numbers meaningless)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    video = args.model == "tiny-video"

    if args.random_weights:
        from diffaccel.bundled.models import build_pipeline
        pipe = build_pipeline(args.model)
    else:
        pipe = load_bundled(args.model)  # FileNotFoundError names the training command when absent
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = default_call_kwargs(args.model)
    if args.steps:
        call_kwargs["num_inference_steps"] = args.steps
    grid = model_grid(pipe, call_kwargs)
    tile = (1, 2, 2)
    prompts = builtin_prompts("bundled", video=video)
    eval_prompts, eval_seeds = prompts[: args.seeds], list(range(args.seeds))
    calibration = [dict(prompt=prompts[-1 - i], generator=torch.Generator().manual_seed(1000 + i),
                        output_type="latent", **call_kwargs) for i in range(args.calibration_seeds)]

    configs = settings(video, grid, tile)
    for target in (0.25, 0.5):
        started = time.perf_counter()
        result = search_windows(pipe, calibration, tile=tile, target_density=target, sizes=(1, 3, 5))
        search_s = time.perf_counter() - started
        uniform = uniform_window_for_density(grid, tile, result.density)
        configs.append((f"searched windows, density {result.density:.2f} (search {search_s:.0f} s)",
                        result.config(min_tokens=0)))
        configs.append((f"uniform window {uniform}, density {sliding_tile_density(grid, tile, uniform):.2f}",
                        SlidingTileAttention(tile=tile, window=uniform, min_tokens=0)))

    rows, baseline = [], None
    for label, config in [("baseline", None)] + configs:
        if config is not None:
            diffaccel.accelerate(pipe, methods=[config])
        started = time.perf_counter()
        try:
            outputs = generate(pipe, eval_prompts, eval_seeds, call_kwargs, video)
            saved = diffaccel.stats(pipe).get("flops_saved_fraction") if session_of(pipe) else None
        finally:
            diffaccel.disable(pipe)
        seconds = time.perf_counter() - started
        baseline = outputs if baseline is None else baseline
        flat_out = outputs.reshape(-1, *outputs.shape[-3:])
        flat_base = baseline.reshape(-1, *baseline.shape[-3:])
        follow = prompt_following(list(outputs), eval_prompts, video=video)
        rows.append((label, psnr(flat_out, flat_base), ssim(flat_out, flat_base), follow["all"], saved, seconds))
        print(rows[-1], flush=True)

    lines = [f"# Sparse attention fidelity on the bundled {args.model}", "",
             f"Command: `python eval/fidelity_sparse_attention.py --model {args.model} --seeds {args.seeds}"
             + (f" --steps {args.steps}" if args.steps else "") + (" --random-weights" if args.random_weights else "")
             + "`  ",
             f"Token grid {grid}, tile {tile}; {args.seeds} seeds x bundled captions, "
             f"{call_kwargs['num_inference_steps']} steps, CPU fp32. Sliding tile keeps full attention for the first "
             f"30% of steps unless stated. PSNR/SSIM vs the baseline output of the same seed (frames pooled for video). "
             f"Prompt-following: share with every captioned attribute read back. FLOPs saved: diffaccel.stats. "
             f"Window search on {args.calibration_seeds} calibration seeds disjoint from the evaluation seeds.", "",
             "| setting | PSNR dB | SSIM | prompt-following | FLOPs saved | time s |", "|---|---|---|---|---|---|"]
    for label, p, s, follow, saved, seconds in rows:
        p_text = "inf" if math.isinf(p) else f"{p:.2f}"
        saved_text = "" if saved is None else f"{100 * saved:.0f}%"
        lines.append(f"| {label} | {p_text} | {s:.4f} | {100 * follow:.0f}% | {saved_text} | {seconds:.1f} |")
    if args.random_weights:
        lines.insert(1, "**Smoke run with untrained (random) weights: checks the script, not quality.**")
    suffix = "_random" if args.random_weights else ""
    out = REPO / "eval" / "results" / f"fidelity_sparse_attention_{args.model}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

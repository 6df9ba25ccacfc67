"""``diffaccel demo``: the bundled models, baseline vs the presets, same seeds, offline.

For each bundled model it generates a few samples per config, times every config (median of
interleaved rounds, with their spread), and prints one table: latency, speed-up, FLOPs saved,
PSNR/SSIM against the baseline sample of the same seed, prompt-following. It writes a side-by-side grid (PNG; an
animated GIF for the video model) per model into the output folder. Everything runs through
diffaccel.evaluation, the same code as eval/evaluate.py.
"""
from __future__ import annotations

from pathlib import Path

UPSCALE = 4  # the bundled models draw 32x32 pixels: enlarge for viewing


def add_arguments(parser) -> None:
    parser.add_argument("--models", default="tiny-sd,tiny-dit,tiny-video", help="comma-separated bundled models")
    parser.add_argument("--presets", default=None,
                        help="comma-separated presets to compare with the baseline (default: every preset that has "
                             "methods for the model's family)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: each model's own, 20)")
    parser.add_argument("--seeds", default="0-1", help="seeds, e.g. 0-3 (one sample per seed and config)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per config at least; more follow until the medians are stable")
    parser.add_argument("--timing-budget", type=float, default=20.0,
                        help="seconds per model after which no more timing rounds start (0: exactly --repeats)")
    parser.add_argument("--out", type=Path, default=Path("diffaccel-demo"), help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (a GPU when there is one)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def demo_configs(family: str, presets: str | None) -> str:
    from diffaccel.presets import PRESETS

    if presets:
        unknown = [p for p in presets.split(",") if p not in PRESETS]
        if unknown:
            raise ValueError(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(PRESETS)}.")
        return "baseline," + presets
    chosen = [name for name, per_family in PRESETS.items() if per_family.get(family)] or ["balanced"]
    return "baseline," + ",".join(chosen)


def main(args) -> int:
    import os
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffaccel.bundled.loader import BUNDLED_MODELS
    from diffaccel.evaluation.distributed import Ranks
    from diffaccel.evaluation.runner import EvalOptions, parse_seeds, run_evaluation
    from diffaccel.loading import load_pipeline, resolve_device
    from diffaccel.metrics import eval_extra_note
    from diffaccel.pipelines import detect

    from diffaccel.validate import at_least, output_folder, positive_int

    start, cpu_start = time.perf_counter(), time.process_time()
    output_folder(args.out, "--out")  # before loading and generating: a bad path fails now
    if args.steps is not None:
        positive_int(args.steps, "--steps", "Leave it out for each model's own (20).")
    positive_int(args.repeats, "--repeats", "It is the least number of timed rounds, e.g. 3.")
    at_least(args.timing_budget, "--timing-budget", 0.0, "Seconds of timing per model; 0 times exactly --repeats rounds.")
    if args.presets:
        demo_configs("", args.presets)  # unknown presets fail before the first model loads
    resolve_device(args.device)
    seeds = parse_seeds(args.seeds)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in BUNDLED_MODELS]
    if unknown or not models:
        raise ValueError(f"--models: {', '.join(unknown) or 'none given'}; the demo runs bundled models: "
                         f"{', '.join(BUNDLED_MODELS)}.")
    # Under torchrun / accelerate launch the seeds are dealt to the ranks (one GPU each); rank 0
    # times, writes and prints. Ranks never wait on each other while generating.
    ranks = Ranks.from_env(args.device)
    try:
        device = ranks.device(args.device)
        all_results, written = [], []
        for k, model in enumerate(models, 1):
            if ranks.main:
                print(f"[{k}/{len(models)}] {model}", flush=True)
            pipe = load_pipeline(model, device=device)
            configs = demo_configs(detect(pipe).family, args.presets)
            out = args.out / model
            results = run_evaluation(EvalOptions(model=model, out=out, configs=configs, seeds=seeds, steps=args.steps,
                                                 device=device, repeats=args.repeats,
                                                 timing_budget_s=args.timing_budget, warmup=0,
                                                 progress=not args.no_progress, pipe=pipe, replace_stale=True))
            if ranks.main:
                all_results.append(results)
                written.append(write_grid(out, results, args.out))
    finally:
        ranks.close()
    if not ranks.main:
        return 0
    print(summary_table(all_results))
    extra = eval_extra_note()
    if extra:
        print(extra)
    print(f"\nwrote {', '.join(str(w) for w in written)} (per-model results.md/json under {args.out}/<model>) "
          f"in {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU")
    return 0


def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None:
        return none
    return "identical" if value == "inf" else format(value, spec)


def summary_table(all_results: list[dict]) -> str:
    """One markdown table over every model, then what its columns mean and any timing warning."""
    from diffaccel.evaluation.report import PROMPT_FOLLOWING_NOTE, latency_text, speedup_text, timing_warning

    head = ["model", "config", "latency s/call (IQR)", "speed-up", "FLOPs saved", "PSNR dB", "SSIM", "prompt-following %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for results in all_results:
        for name, r in results["configs"].items():
            s = r["speed"]
            saved = None if s["flops_saved"] is None else 100 * s["flops_saved"]
            lines.append("| " + " | ".join([
                results["model"], name, latency_text(s["e2e_median_s"], s["e2e_iqr_s"], ".2f"),
                speedup_text(s["speedup"], s["ideal_speedup"]), _fmt(saved, ".0f") + "%", _fmt(r.get("psnr"), ".1f"),
                _fmt(r.get("ssim"), ".3f"), _fmt(r.get("prompt_following"), ".0f")]) + " |")
    rounds = ", ".join(f"{r['model']} {r['timing']['rounds']}" for r in all_results)
    lines += ["", f"latency: seconds per pipeline call, median of interleaved timing rounds ({rounds}); IQR: their "
                  "interquartile range as a share of the median. speed-up: baseline latency / config latency; "
                  "PSNR/SSIM: against the baseline output of the same seed.", PROMPT_FOLLOWING_NOTE]
    for results in all_results:
        warning = timing_warning(results)
        if warning:
            lines.append(f"WARNING {results['model']}: {warning}")
    return "\n".join(lines)


def caption(config: str, results: dict) -> str:
    """Config name, speed-up (its IQR-based spread; "?" when the timings are doubtful, "> ideal"
    above the FLOPs ideal) and PSNR, for the grid's row label."""
    from diffaccel.evaluation.report import timing_warning

    r = results["configs"][config]
    s = r["speed"]
    speed = f"{s['speedup']:.2f}x" + ("?" if timing_warning(results) else "")
    if s["e2e_iqr_s"] is not None and s["e2e_median_s"]:
        speed += f" IQR {100 * s['e2e_iqr_s'] / s['e2e_median_s']:.0f}%"
    if s["above_ideal"]:
        speed += "\n> FLOPs ideal"
    psnr = "" if config == "baseline" else _fmt(r.get("psnr"), ".1f") + (" dB" if r.get("psnr") != "inf" else "")
    return f"{config}\n{speed}\n{psnr}"


def write_grid(out: Path, results: dict, folder: Path) -> Path:
    """Rows = configs, columns = seeds, the captions underneath; a GIF for a video model."""
    import numpy as np
    from PIL import Image, ImageDraw

    from diffaccel.evaluation.generation import load_sample, sample_paths, to_uint8
    from diffaccel.evaluation.report import timing_warning
    from diffaccel.validate import write_atomic

    configs, seeds, video = list(results["configs"]), results["seeds"], results["video"]
    samples = {(c, s): to_uint8(load_sample(sample_paths(out, c, s, video)[1])) for c in configs for s in seeds}
    frames = len(next(iter(samples.values()))) if video else 1
    h, w = next(iter(samples.values())).shape[-3:-1]
    cell_h, cell_w, label_w, line = h * UPSCALE, w * UPSCALE, 110, 14
    prompts = {r["seed"]: r["prompt"] for r in results["samples"]}
    notes = [f"seed {seed}: {prompts[seed]}" for seed in seeds]
    if timing_warning(results):
        notes.append("timings unreliable (machine busy): speed-ups may be off")
    width = max(label_w + cell_w * len(seeds), 8 + 6 * max(len(n) for n in notes) + 60)
    height = line + cell_h * len(configs) + line * len(notes) + 6
    pictures = []
    for t in range(frames):
        canvas = Image.new("RGB", (width, height), (128, 128, 128))
        draw = ImageDraw.Draw(canvas)
        for j, seed in enumerate(seeds):
            draw.text((label_w + j * cell_w + 4, 1), f"seed {seed}", fill=(255, 255, 255))
        for j, note in enumerate(notes):
            colour = (255, 255, 255) if note.startswith("seed") else (255, 220, 0)
            draw.text((4, line + cell_h * len(configs) + j * line + 3), note, fill=colour)
        for i, config in enumerate(configs):
            draw.text((4, line + i * cell_h + 4), caption(config, results), fill=(255, 255, 255))
            for j, seed in enumerate(seeds):
                pixels = samples[(config, seed)][t] if video else samples[(config, seed)]
                tile = Image.fromarray(np.ascontiguousarray(pixels)).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (label_w + j * cell_w, line + i * cell_h))
        pictures.append(canvas)
    path = folder / f"{results['model']}.{'gif' if video else 'png'}"
    if video:
        return write_atomic(path, lambda tmp: pictures[0].save(tmp, save_all=True, append_images=pictures[1:],
                                                               duration=150, loop=0))
    return write_atomic(path, pictures[0].save)

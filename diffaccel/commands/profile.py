"""``diffaccel profile MODEL --out P.json``: measure how much each block changes step to step."""
from __future__ import annotations

from pathlib import Path

GENERIC_PROMPTS = ("a photo of a cat", "a watercolor landscape", "a red car on a street", "a bowl of fruit",
                   "a city at night", "a portrait of an old man", "a forest in autumn", "a sailing boat at sea")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="bundled name (tiny-sd, tiny-dit, tiny-video), local pipeline folder or hub id")
    parser.add_argument("--out", required=True, help="profile JSON to write (progress is kept in OUT.partial.json)")
    parser.add_argument("--plot", help="also write a PNG: step x block heatmap and per-step curves (needs the eval "
                                       "extra; default: no plot)")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: built-in prompts)")
    parser.add_argument("--num-prompts", type=int, default=8, help="how many prompts to use")
    parser.add_argument("--steps", type=int, default=25, help="num_inference_steps")
    parser.add_argument("--scheduler", help="diffusers scheduler class, e.g. DDIMScheduler (default: the pipeline's)")
    parser.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    parser.add_argument("--frames", type=int, help="video models: number of frames (default: the model's)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto, a GPU when available)")
    parser.add_argument("--dtype", help="fp32, fp16 or bf16 (default: as stored)")
    parser.add_argument("--calibration-prompts", type=int, default=2,
                        help="prompts on which probe schedules are compared with the unaccelerated output, to map "
                             "predicted error to PSNR for `diffaccel schedule --min-psnr` (0 skips)")
    parser.add_argument("--step-graph", type=int, default=0, metavar="N",
                        help="DiTs: also measure StepCache's step graph on the first N prompts (every skip edge run "
                             "as a generation: about steps x 8 generations per prompt); its planner needs it for "
                             "measured errors and PSNR targets (0 skips)")
    parser.add_argument("--verify", type=int, default=0, metavar="M",
                        help="DiTs, with --step-graph: run the step graph's candidate schedules (about 3 x steps) as real "
                             "generations on M prompts (seeds SEED+1000..) and keep the fastest ones per measured PSNR; "
                             "StepCache(min_psnr=...) and the DiT presets then choose among them. U-Nets: run DeepCache's "
                             "planned and evenly spread schedules (full steps every 1.25..8 steps) with each forecast of the "
                             "deep features, alone and with CfgCache where the calls run CFG, on M prompts; plans at this "
                             "step count then take the best measured (0 skips)")
    parser.add_argument("--validate", type=int, default=0, metavar="K",
                        help="with --verify: re-run every kept schedule (U-Nets: every verified run) on K more prompts "
                             "(seeds SEED+2000..) and keep its lower PSNR, so a schedule tuned to the verification seeds "
                             "loses its place (0 skips)")
    parser.add_argument("--refine", type=int, default=0, metavar="R",
                        help="with --verify: R rounds of local search, each trying every schedule that skips one step "
                             "more or one fewer than a kept one (use with --validate, or it overfits the verification seeds)")
    parser.add_argument("--confirm", type=int, default=0, metavar="C",
                        help="with --refine: a schedule the search puts on the front is kept only if it also beats, on C "
                             "more prompts (seeds SEED+3000..) that the search never measured, the one it replaced (0 skips)")
    parser.add_argument("--stress", type=int, default=0, metavar="S",
                        help="DiTs, with --verify: screen 32 x S more prompts (seeds SEED+4000..) by how much one skipped "
                             "step changes their output (about steps / 2 generations each) and re-run every kept schedule "
                             "on the S that change most, counted at their share of the screened prompts: a rare seed turns "
                             "into another image when one step is skipped and sets a pooled PSNR alone (on tiny-dit this "
                             "changed one preset's schedule and did not make the promises hold on larger held-out sets; "
                             "eval/results/step_cache.md) (0 skips)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def read_prompts(path: str | None, count: int, model: str) -> list[str]:
    if count < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {count}.")
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"Prompts file {path!r} does not exist.")
        prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"Prompts file {path!r} is empty: put one prompt per line.")
    else:
        prompts = default_prompts(model)
    return [prompts[i % len(prompts)] for i in range(count)]


def default_prompts(model: str) -> list[str]:
    """Varied captions for the bundled models (spread over their caption set), else generic ones."""
    from diffaccel.bundled.dataset import all_image_captions, all_video_captions

    if model == "tiny-video":
        captions = all_video_captions("train")
    elif model in ("tiny-sd", "tiny-dit"):
        captions = all_image_captions("train")
    else:
        return list(GENERIC_PROMPTS)
    stride = max(1, len(captions) // 16)
    return captions[7::stride]


def call_arguments(model: str, args) -> dict:
    from diffaccel.bundled.loader import BUNDLED_MODELS, default_call_kwargs

    kwargs = default_call_kwargs(model) if model in BUNDLED_MODELS else {}
    kwargs["num_inference_steps"] = args.steps
    for name, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames),
                        ("guidance_scale", args.guidance_scale)):
        if value is not None:
            kwargs[name] = value
    return kwargs


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def set_scheduler(pipe, name: str | None) -> None:
    if name is None:
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        options = sorted(c.__name__ for c in getattr(pipe.scheduler, "compatibles", []))
        raise ValueError(f"Unknown scheduler {name!r}; schedulers compatible with this pipeline: {', '.join(options)}.")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def main(args) -> int:
    import time

    from diffaccel.evaluation.distributed import Ranks
    from diffaccel.loading import load_pipeline, resolve_device
    from diffaccel.metrics import EVAL_EXTRA, available
    from diffaccel.profiler.measure import measure
    from diffaccel.validate import at_least, non_negative_int, output_file, positive_int

    output_file(args.out, "--out")  # before loading and measuring (minutes): a bad path fails now
    if args.plot:
        output_file(args.plot, "--plot")
    for flag, value in (("--height", args.height), ("--width", args.width), ("--frames", args.frames)):
        if value is not None:
            positive_int(value, flag, "Leave it out for the model's default.")
    if args.guidance_scale is not None:
        at_least(args.guidance_scale, "--guidance-scale", 0.0, "Leave it out for the model's default.")
    non_negative_int(args.calibration_prompts, "--calibration-prompts", "0 skips the PSNR calibration.")
    for flag, value in (("--step-graph", args.step_graph), ("--verify", args.verify), ("--validate", args.validate),
                        ("--refine", args.refine), ("--confirm", args.confirm), ("--stress", args.stress)):
        non_negative_int(value, flag, "0 skips it.")
    if (args.validate or args.refine or args.stress) and not args.verify:
        raise ValueError("--validate, --refine and --stress work on the verified schedules: add --verify M (e.g. 4).")
    if args.confirm and not args.refine:
        raise ValueError("--confirm checks what the local search changed: add --refine R (e.g. 2).")
    from diffaccel.bundled.loader import BUNDLED_MODELS

    if args.frames is not None and args.model in BUNDLED_MODELS and BUNDLED_MODELS[args.model].num_frames is None:
        raise ValueError(f"--frames applies to video models only; {args.model} makes images (leave --frames out).")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2 (change is measured between steps), got {args.steps}.")
    if args.plot and not available("matplotlib"):
        raise ValueError(f"--plot needs matplotlib: {EVAL_EXTRA} (or leave out --plot).")
    started = time.perf_counter()
    prompts = read_prompts(args.prompts, args.num_prompts, args.model)
    # Under torchrun / accelerate launch the prompts are dealt to the ranks; rank 0 writes the
    # profile (the plan any rank later derives from it is the same: a function of the file).
    ranks = Ranks.from_env(args.device)
    try:
        device = ranks.device(resolve_device(args.device))
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
        set_scheduler(pipe, args.scheduler)
        _check_verification_applies(pipe, args)
        out = Path(args.out)
        if ranks.main:
            out.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".partial.json" if ranks.main else f".partial.rank{ranks.rank}.json"
        partial = out.with_name(out.name + suffix)
        seeds = [args.seed + i for i in range(len(prompts))]
        call = call_arguments(args.model, args)
        if ranks.main:
            print(f"profiling {args.model}: per-module costs (one call, timed modules), then "
                  f"{_count(len(prompts), 'prompt')} x {args.steps} steps"
                  + (f" on {ranks.world} ranks" if ranks.world > 1 else ""), flush=True)
        profile = measure(pipe, prompts, call, model=args.model, seeds=seeds, partial_path=partial,
                          progress=not args.no_progress and ranks.main, ranks=ranks if ranks.world > 1 else None, step_graph=args.step_graph,
                          describe={"device": device, "dtype": str(pipe.dtype).replace("torch.", "")})
        if not ranks.main:  # nothing else needs the other ranks: no collective follows
            partial.unlink(missing_ok=True)
            return 0
    finally:
        ranks.close()
    calibration_s = 0.0
    if args.calibration_prompts > 0:
        from diffaccel.profiler.calibrate_psnr import calibrate_psnr

        count = min(args.calibration_prompts, len(prompts))
        print(f"calibrating PSNR: probe schedules vs the unaccelerated output on {_count(count, 'prompt')}", flush=True)
        calibration_start = time.perf_counter()
        profile.calibration = calibrate_psnr(pipe, profile, prompts[:count], call, seeds[:count])
        calibration_s = time.perf_counter() - calibration_start
    verify_s = _verify(pipe, profile, prompts, call, args) if args.verify else 0.0
    profile.save(out)
    partial.unlink(missing_ok=True)
    print(f"wrote {out}: {len(profile.times)} steps x {len(profile.modules)} modules, {_count(len(prompts), 'prompt')}; "
          f"profiling {profile.measured['seconds']:.1f} s, calibration {calibration_s:.1f} s, "
          + (f"verification {verify_s:.1f} s, " if args.verify else "") +
          f"{time.perf_counter() - started:.1f} s in all")
    if args.plot:
        from diffaccel.profiler.plot import plot_profile

        print(f"wrote {plot_profile(profile, args.plot)}")
    return 0


def _verify(pipe, profile, prompts: list, call: dict, args) -> float:
    """Verified (and validated) StepCache schedules, or a U-Net's verified DeepCache forecasts, into
    ``profile``; returns the seconds it took."""
    import time

    from diffaccel.profiler.verify_step_cache import verify_step_cache

    def prompt_set(count: int, first_seed: int):
        return [prompts[i % len(prompts)] for i in range(count)], [first_seed + i for i in range(count)]

    started = time.perf_counter()
    if profile.family == "unet":
        from diffaccel.profiler.verify_deepcache import verify_deepcache

        print(f"verifying DeepCache forecasts on {_count(args.verify, 'prompt')}", flush=True)
        validation = [prompt_set(args.validate, args.seed + 2000)] if args.validate else []
        entry = verify_deepcache(pipe, profile, *prompt_set(args.verify, args.seed + 1000), call,
                                 progress=not args.no_progress, validation=validation)
        for run in entry["runs"]:
            for part, label in ((run, f" ({run['speedup']:.2f}x FLOPs)"), (run.get("cfg"), " + CfgCache")):
                if part is not None:
                    measured = "  ".join(f"{name} {db:.2f} dB" for name, db in part["psnr"].items())
                    print(f"  {len(run['full_steps'])} of {entry['steps']} full steps, {run['schedule']}{label}: {measured}"
                          f"  -> {part['best']}")
        return time.perf_counter() - started
    print(f"verifying StepCache schedules on {_count(args.verify, 'prompt')}"
          + (f", validating on {args.validate} more" if args.validate else "")
          + (f", {_count(args.refine, 'round')} of local search" if args.refine else "")
          + (f", stressed on the {args.stress} of {32 * args.stress} prompts one skip changes most" if args.stress else ""),
          flush=True)
    validation = [prompt_set(args.validate, args.seed + 2000)] if args.validate else []
    confirm = prompt_set(args.confirm, args.seed + 3000) if args.confirm else None
    stress = (*prompt_set(32 * args.stress, args.seed + 4000), args.stress) if args.stress else None
    entry = verify_step_cache(pipe, profile, *prompt_set(args.verify, args.seed + 1000), call, validation=validation,
                              refine=args.refine, confirm=confirm, progress=not args.no_progress, stress=stress)
    for run in entry["runs"]:
        print(f"  {run['speedup']:.2f}x FLOPs  {run['psnr']:.2f} dB  computes {sum(run['mask'])} of {len(run['mask'])} steps")
    return time.perf_counter() - started


def _check_verification_applies(pipe, args) -> None:
    from diffaccel.methods.step_cache import StepCache
    from diffaccel.pipelines import detect

    family = detect(pipe).family
    if family == "unet":
        if args.step_graph:
            raise ValueError(f"--step-graph measures StepCache's schedules, which apply to image and video DiTs; "
                             f"{args.model} is a unet model. Leave --step-graph out (--verify M verifies DeepCache's forecasts).")
        if args.refine or args.stress:
            raise ValueError("--refine and --stress work on StepCache's verified schedules (DiTs); on a unet model leave "
                             "them out (--verify M, with --validate K, verifies DeepCache's schedules).")
    elif family not in StepCache.supported_families():
        if args.step_graph or args.verify:
            raise ValueError(f"--step-graph / --verify measure StepCache's schedules, which apply to image and video DiTs; "
                             f"{args.model} is a {family} model. Leave them out.")
    elif args.verify and not args.step_graph:
        raise ValueError("--verify runs schedules planned from the step graph: add --step-graph N (e.g. 2).")

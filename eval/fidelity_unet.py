"""Fidelity of DeepCache and ToMe on the bundled trained U-Net (tiny-sd).

    python eval/fidelity_unet.py [--seeds 16] [--steps 20] [--batch 8]

For every setting of the speed suite (DeepCache N = 2, 3, 5; ToMe ratio 0.3 / 0.5 / 0.7; both
combined) plus non-uniform DeepCache at the same number of full steps as uniform, and the
reference implementations (DeepCache's helper at N=3, tomesd at every ratio): PSNR / SSIM of the output image against the
unaccelerated output of the same seed and prompt (pooled over seeds), prompt-following (share
of images whose colour, shape, position and background the pixel analyser reads back as
captioned) and the FLOPs share saved (diffaccel.stats). ToMe runs with ``gate=False``: at
tiny-sd's token counts the gate (rightly) skips merging on CPU, which would measure nothing.
Writes eval/results/fidelity_unet.md.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "eval" / "results" / "fidelity_unet.md"


def configs(max_downsample: int) -> list[tuple[str, object]]:
    """(label, installer) pairs; an installer takes the pipe and returns an undo function."""
    import diffaccel
    import tomesd
    from DeepCache import DeepCacheSDHelper

    def ours(*methods):
        def install(pipe):
            diffaccel.accelerate(pipe, methods=list(methods))
            return lambda: diffaccel.disable(pipe)
        return install

    def deepcache_lib(n):
        def install(pipe):
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=n, cache_branch_id=0)
            helper.enable()
            return helper.disable
        return install

    def tomesd_patch(ratio):
        def install(pipe):
            tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample)
            return lambda: tomesd.remove_patch(pipe)
        return install

    tome = lambda r, **kw: diffaccel.ToMe(ratio=r, max_downsample=max_downsample, gate=False, **kw)  # noqa: E731
    out = [("baseline", lambda pipe: (lambda: None))]
    for n in (2, 3, 5):
        out.append((f"DeepCache N={n} uniform", ours(diffaccel.DeepCache(interval=n))))
        out.append((f"DeepCache N={n} non-uniform (center 0.5)", ours(diffaccel.DeepCache(interval=n, schedule="non-uniform"))))
        out.append((f"DeepCache N={n} non-uniform (center 0.3)",
                    ours(diffaccel.DeepCache(interval=n, schedule="non-uniform", center=0.3))))
    out.append(("DeepCache lib N=3 (reference)", deepcache_lib(3)))
    for r in (0.3, 0.5, 0.7):
        out.append((f"ToMe r={r}", ours(tome(r))))
        out.append((f"tomesd r={r} (reference)", tomesd_patch(r)))
    out.append(("ToMe r=0.5 K/V-only", ours(tome(0.5, mode="kv"))))
    out.append(("DeepCache N=3 + ToMe r=0.5", ours(diffaccel.DeepCache(interval=3), tome(0.5))))
    return out


def generate(pipe, prompts, seeds, call_kwargs, batch: int) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(prompt=prompts[i:i + batch], generator=gens, output_type="np", **call_kwargs)
        images.append(np.asarray(out.images))
    return np.concatenate(images)


def main(argv=None) -> None:
    import diffaccel
    from diffaccel.api import session_of
    from diffaccel.bundled.analyser import prompt_following
    from diffaccel.bundled.loader import default_call_kwargs, load_bundled
    from diffaccel.evaluation.generation import builtin_prompts
    from diffaccel.metrics import psnr, ssim
    from diffaccel.pipelines import detect

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="default: the bundled model's own")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated label substrings to run (baseline always runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = default_call_kwargs("tiny-sd")
    if args.steps:
        call_kwargs["num_inference_steps"] = args.steps
    levels = sorted({d for _, _, d in detect(pipe).transformer_blocks()})
    max_downsample = levels[0]  # the model's largest-grid transformer blocks
    prompts = builtin_prompts("bundled", video=False)[: args.seeds]
    seeds = list(range(args.seeds))

    rows, baseline = [], None
    wanted = [w for w in args.only.split(",") if w]
    for label, install in configs(max_downsample):
        if wanted and label != "baseline" and not any(w in label for w in wanted):
            continue
        undo = install(pipe)
        try:
            images = generate(pipe, prompts, seeds, call_kwargs, args.batch)
            session = session_of(pipe)
            saved = diffaccel.stats(pipe).get("flops_saved_fraction") if session else None
        finally:
            undo()
        if baseline is None:
            baseline = images
        follow = prompt_following(list(images), prompts)
        rows.append(dict(label=label, psnr=psnr(images, baseline), ssim=ssim(images, baseline),
                         follow=follow["all"], colour=follow.get("colour"), shape=follow.get("shape"),
                         saved=saved))
        print(rows[-1], flush=True)

    lines = ["# Fidelity on the bundled tiny-sd U-Net", "",
             f"Command: `python eval/fidelity_unet.py --seeds {args.seeds}"
             + (f" --steps {args.steps}" if args.steps else "") + f" --batch {args.batch}"
             + (f" --only '{args.only}'" if args.only else "") + "`  ",
             f"{args.seeds} seeds x bundled captions, {call_kwargs['num_inference_steps']} steps, guidance "
             f"{call_kwargs['guidance_scale']}, {call_kwargs['height']}x{call_kwargs['width']} px, CPU fp32, "
             f"ToMe on blocks downsampled <= {max_downsample} (the model's largest attention grid), gate off. "
             "PSNR/SSIM against the baseline image of the same seed, pooled over seeds. Prompt-following: share of "
             "images with every captioned attribute read back correctly (colour, shape alone also shown). "
             "FLOPs saved: diffaccel.stats' estimate (references: not reported by them). Speed: "
             "eval/results/bench_unet.md (this script's wall time is not a benchmark).", "",
             "| setting | PSNR dB | SSIM | prompt-following | colour | shape | FLOPs saved |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr_text = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.2f}"
        saved = f"{100 * r['saved']:.0f}%" if r["saved"] is not None else ""
        lines.append(f"| {r['label']} | {psnr_text} | {r['ssim']:.4f} | {100 * r['follow']:.0f}% | "
                     f"{100 * (r['colour'] or 0):.0f}% | {100 * (r['shape'] or 0):.0f}% | {saved} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

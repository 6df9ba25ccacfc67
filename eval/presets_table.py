"""Measure every preset on every bundled model and write the README's preset table.

    python eval/presets_table.py --seeds 0-15 --out runs/presets --table eval/results/presets.md

Runs eval/evaluate.py's core once per bundled model (resumable: rerun after a kill), then writes
one markdown file with each model's table and whether each preset keeps its promise
(diffaccel.evaluation.report.PROMISES).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-sd,tiny-dit,tiny-video")
    p.add_argument("--seeds", default="0-15")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/presets"))
    p.add_argument("--table", type=Path, default=Path("eval/results/presets.md"))
    args = p.parse_args(argv)

    from diffaccel.evaluation.report import PROMISES, markdown
    from diffaccel.evaluation.runner import EvalOptions, parse_seeds, run_evaluation

    command = "python eval/presets_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    parts = ["# Presets on the bundled models", "", f"Command: `{command}`", "",
             "Promises (PSNR vs the baseline output of the same seed, pooled over seeds; prompt-following = % of "
             "caption attributes read back from the pixels, loss in points vs baseline):", ""]
    parts += [f"- {name}: PSNR >= {img:g} dB (video {vid:g}), prompt-following loss <= {pts:g} points"
              for name, (img, vid, pts) in PROMISES.items()]
    failing = []
    for model in args.models.split(","):
        results = run_evaluation(EvalOptions(model=model, out=args.out / model, configs="baseline," + ",".join(PROMISES),
                                             seeds=parse_seeds(args.seeds), device=args.device, repeats=args.repeats))
        parts += ["", markdown(results)]
        failing += [f"{model} {name}" for name, row in results["configs"].items()
                    if "promise" in row and not row["promise"]["holds"]]
    parts += ["", "Presets failing their promise: " + (", ".join(failing) if failing else "none") + "."]
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(parts) + "\n")
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

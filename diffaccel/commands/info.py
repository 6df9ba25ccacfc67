"""``diffaccel info MODEL``: what diffaccel recognises in a pipeline."""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("model", help="bundled name (tiny-sd, tiny-dit, tiny-video), local pipeline folder or hub id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> int:
    from diffaccel.loading import load_pipeline
    from diffaccel.pipelines import detect
    from diffaccel.presets import PRESETS

    adapter = detect(load_pipeline(args.model, device=args.device))
    info = adapter.describe()
    info["presets"] = {p: [name for name, _ in fams[adapter.family]] for p, fams in PRESETS.items()}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>10}: {value}")
    return 0

"""Speed side by side with the peer implementations, one suite per denoiser family.

    python eval/bench.py --suite unet     # DeepCache / tomesd vs diffaccel (eval/bench_unet.py)
    python eval/bench.py --suite dit      # PixArt-alpha: diffusers' caches, cache-dit vs ours (eval/bench_dit.py)
    python eval/bench.py --suite video    # CogVideoX-2b: the same (eval/bench_dit.py)
    python eval/bench.py --suite frontier --model tiny-dit   # quality at speed on a bundled trained model,
                                          # PSNR vs FLOPs saved vs wall, ours and every peer (eval/frontier.py)

Each suite lives in its own module beside this script, with ``add_arguments(parser)`` and
``main(args)``; add a suite by adding its module to SUITES. (Run as a script, Python puts this
folder first on the import path, which is how the suites are found.)
"""
from __future__ import annotations

import argparse
import importlib

SUITES = {
    "unet": "bench_unet",
    "dit": "bench_dit",
    "video": "bench_dit",
    "frontier": "frontier",
}


def main(argv=None) -> None:
    suite_arg = argparse.ArgumentParser(add_help=False)
    suite_arg.add_argument("--suite", choices=sorted(SUITES), required=True)
    known, rest = suite_arg.parse_known_args(argv)
    module = importlib.import_module(SUITES[known.suite])
    parser = argparse.ArgumentParser(description=f"diffaccel bench, suite {known.suite}", parents=[suite_arg])
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv)) or 0


if __name__ == "__main__":
    raise SystemExit(main())

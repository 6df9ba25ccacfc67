"""Which error model predicts DeepCache's real fidelity loss? (trained tiny-sd, 20 DDIM steps)

Runs, per held-out prompt: one baseline generation under the ReuseProbe (measured output error
e[step][age] of reusing deep features `age` steps old), then many DeepCache schedules (uniform
with every offset, single reused steps, random ones) and their PSNR against the baseline. Then it
ranks the schedules by each candidate predictor and writes eval/results/deepcache_error_model.md.

    python eval/deepcache_error_model.py --prompts 8 --out runs/dc_error.json   # measure (~2 min, 1 core)
    python eval/deepcache_error_model.py --from runs/dc_error.json               # report only
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

import torch

import diffaccel
from diffaccel.metrics import psnr
from diffaccel.profiler.reuse_error import ReuseProbe

RESULTS = Path(__file__).resolve().parent / "results"
STEPS, AGES = 20, 8


def schedules(n=STEPS) -> dict[str, list[int]]:
    out = {}
    for interval in (2, 3, 4, 5, 6):
        for offset in range(interval):
            out[f"u{interval}o{offset}"] = sorted({0, *range(offset, n, interval)})
    for s in range(1, n):
        out[f"single{s}"] = [i for i in range(n) if i != s]
    rng = random.Random(0)
    for k in (4, 5, 7, 10):
        for r in range(3):
            out[f"rand{k}_{r}"] = sorted({0, *rng.sample(range(1, n), k - 1)})
    return out


def measure(num_prompts: int, out_path: Path) -> dict:
    from diffaccel.bundled.dataset import all_image_captions
    from diffaccel.bundled.loader import default_call_kwargs

    torch.set_num_threads(1)
    pipe = diffaccel.load_bundled("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    kwargs = default_call_kwargs("tiny-sd")
    captions = all_image_captions("heldout")
    prompts = captions[::max(1, len(captions) // 8)][:num_prompts]

    def generate(prompt):
        with torch.no_grad():
            out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(100), output_type="pt", **kwargs)
        return out.images.float().clamp(0, 1)

    result = {"prompts": prompts, "call": kwargs, "schedules": schedules(), "runs": []}
    for prompt in prompts:
        with ReuseProbe(pipe, branch=0, max_age=AGES) as probe:
            base = generate(prompt)
        run = {"prompt": prompt, "errors": probe.errors, "psnr": {}, "mse": {}}
        for name, full in result["schedules"].items():
            diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(schedule=full)])
            image = generate(prompt)
            diffaccel.disable(pipe)
            run["mse"][name], run["psnr"][name] = float((image - base).pow(2).mean()), psnr(image, base)
        result["runs"].append(run)
        out_path.write_text(json.dumps(result))
        print("done", prompt, flush=True)
    return result


def _spearman(x, y):
    rank = lambda v: {val: i for i, val in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(x), rank(y)
    a, b = [rx[v] for v in x], [ry[v] for v in y]
    ma, mb = statistics.mean(a), statistics.mean(b)
    return sum((p - ma) * (q - mb) for p, q in zip(a, b)) / math.sqrt(sum((p - ma) ** 2 for p in a) * sum((q - mb) ** 2 for q in b))


def report(data: dict, drift_profile: str) -> str:
    from diffusers import DDIMScheduler

    from diffaccel.profiler.profile import load_profile

    n, runs = STEPS, data["runs"]
    from diffaccel.bundled.loader import bundled_dir

    scheduler = DDIMScheduler.from_pretrained(bundled_dir() / "tiny-sd" / "scheduler")
    scheduler.set_timesteps(n)
    ts = [int(t) for t in scheduler.timesteps]
    alpha = lambda t: float(scheduler.alphas_cumprod[t]) if t >= 0 else float(scheduler.final_alpha_cumprod)  # noqa: E731
    sigma = lambda t: math.sqrt((1 - alpha(t)) / alpha(t))  # noqa: E731
    nxt = ts[1:] + [-1]
    weights = {
        "output error x DDIM coefficient sqrt(a_next) abs(d sigma) (the planner's model)":
            [math.sqrt(alpha(b)) * abs(sigma(a) - sigma(b)) for a, b in zip(ts, nxt)],
        "output error x abs(d sigma) (x / sqrt(alpha_bar) frame)": [abs(sigma(a) - sigma(b)) for a, b in zip(ts, nxt)],
        "output error, unweighted": [1.0] * n,
    }
    table = [[statistics.mean(r["errors"][s][a] for r in runs) if runs[0]["errors"][s][a] is not None else None
              for a in range(AGES)] for s in range(n)]

    def err(s, age):
        row = [0.0] + table[s]
        if age < len(row) and row[age] is not None:
            return row[age]
        known = [k for k, v in enumerate(row) if v is not None]
        slope = row[known[-1]] - row[known[-2]] if len(known) > 1 else 0.0
        return row[known[-1]] + max(slope, 0.0) * (age - known[-1])

    def predicted(full, cost):
        fulls, last, total = set(full), 0, 0.0
        for i in range(n):
            last = i if i in fulls else last
            total += 0.0 if i in fulls else cost(i, last)
        return total

    profile = load_profile(drift_profile)
    cum = profile.drift("up_blocks.1").on([t / 1000 for t in ts])
    predictors = {name: (lambda w: lambda i, f: w[i] * err(i, i - f))(w) for name, w in weights.items()}
    predictors[f"deep-feature drift (the old planner; {drift_profile})"] = lambda i, f: cum[i] - cum[f]
    names = [k for k in data["schedules"] if not k.startswith("single")]
    mean_psnr = {k: statistics.mean(r["psnr"][k] for r in runs) for k in data["schedules"]}
    lines = ["# DeepCache error models against measured PSNR (trained tiny-sd)", "",
             f"{len(runs)} held-out prompts, seed 100, call {data['call']}, branch 0. Command: "
             "`python eval/deepcache_error_model.py --prompts 8 --out runs/dc_error.json` (measured on 1 core).", "",
             "## What reusing the deep features costs, per step", "",
             "e = RMS change of the guided denoiser output when the deep features are `age` steps old (mean over prompts); "
             "single-reuse PSNR = PSNR of the schedule that reuses only that step (age 1).", "",
             "| step | t | drift of deep feature (rel-L1) | e age 1 | e age 2 | e age 4 | DDIM coeff. | single-reuse PSNR |",
             "|---|---|---|---|---|---|---|---|"]
    drift = [cum[i] - cum[i - 1] if i else 0.0 for i in range(n)]
    coeff = weights[next(iter(weights))]
    for s in range(n):
        cells = [f"{table[s][a]:.3f}" if table[s][a] is not None else "-" for a in (0, 1, 3)]
        single = f"{mean_psnr[f'single{s}']:.1f}" if s else "-"
        lines.append(f"| {s} | {ts[s]} | {drift[s]:.3f} | {' | '.join(cells)} | {coeff[s]:.3f} | {single} |")
    lines += ["", "## Ranking schedules", "",
              f"{len(names)} schedules with 4-11 full steps (uniform with every offset, random). Spearman correlation of the "
              "predicted error with the measured PSNR loss, and per number of full steps k: which schedule the predictor "
              "ranks best and its measured PSNR, vs the best measured among those tried.", "",
              "| predictor | Spearman | " + " | ".join(f"k={k}" for k in sorted({len(data['schedules'][x]) for x in names})) + " |",
              "|---|---|" + "---|" * len({len(data['schedules'][x]) for x in names})]
    by_k = defaultdict(list)
    for x in names:
        by_k[len(data["schedules"][x])].append(x)
    best = {k: max(v, key=mean_psnr.get) for k, v in by_k.items()}
    for label, cost in predictors.items():
        pred = {x: predicted(data["schedules"][x], cost) for x in names}
        rho = _spearman([-mean_psnr[x] for x in names], [pred[x] for x in names])
        picks = []
        for k in sorted(by_k):
            pick = min(by_k[k], key=pred.get)
            picks.append(f"{pick} {mean_psnr[pick]:.1f}" + ("" if pick == best[k] else f" (best {best[k]} {mean_psnr[best[k]]:.1f})"))
        lines.append(f"| {label} | {rho:.3f} | " + " | ".join(picks) + " |")
    lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--out", default="runs/dc_error.json")
    parser.add_argument("--from", dest="source", help="report from this measured JSON instead of measuring")
    parser.add_argument("--drift-profile", default="assets/tiny-sd/profile.json",
                        help="profile whose deep-feature drift curve the old planner used")
    args = parser.parse_args()
    if args.source:
        data = json.loads(Path(args.source).read_text())
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data = measure(args.prompts, Path(args.out))
    text = report(data, args.drift_profile)
    (RESULTS / "deepcache_error_model.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

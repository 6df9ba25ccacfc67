"""Scores what eval/fidelity_dit_pareto.py stored and prints the Pareto and matched-cost tables.

Columns: FLOPs saved = 1 - (sum of the denoiser's FLOPs over the seeds) / (the baseline's sum),
each call counted exactly; PSNR = pooled over seeds (mean MSE) vs the baseline of the same
seed, per frame for video; worst = lowest single-seed PSNR; PF = prompt-following, % of
caption attributes read back from the pixels (baseline's in the header).
"""
from __future__ import annotations

import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GROUPS = {"fbc": "diffusers FirstBlockCache", "mag": "diffusers MagCache", "dpab": "diffusers PAB",
          "dfc": "diffusers FasterCache", "cachedit": "cache-dit DBCache"}


def group_of(spec: str) -> str:
    kind = spec.partition(":")[0]
    if kind in GROUPS:
        return GROUPS[kind]
    experiments = {"xanchor": "anchored rule", "xjoint": "joint CFG decision", "xboth": "anchored + joint",
                   "xlead": "cond decides for uncond"}
    if kind in experiments:
        return f"experiment: AdaptiveCache, {experiments[kind]}"
    return "baseline" if spec == "baseline" else "ours " + kind


def is_ours(spec: str) -> bool:
    return group_of(spec).startswith("ours")


def score(folder: Path, seeds: list[int]) -> dict | None:
    import numpy as np

    from diffaccel.evaluation import generation
    from diffaccel.evaluation.quality import sample_record, summarise

    out = folder.parent
    video = folder.parent.name.startswith("tiny-video")
    prompts = generation.builtin_prompts(folder.parent.name.split("-")[-1], video)
    spec = (folder / "spec.txt").read_text()
    records, flops, base_flops, per_seed = [], 0, 0, []
    for seed in seeds:
        f, b = folder / f"seed{seed:04d}.npz", out / "baseline" / f"seed{seed:04d}.npz"
        if not (f.is_file() and b.is_file()):
            return None
        got, ref = np.load(f), np.load(b)
        ref_image = None if spec == "baseline" else ref["image"]
        records.append(sample_record(spec, seed, prompts[seed % len(prompts)], got["image"], ref_image, prompt_following=True))
        flops, base_flops = flops + int(got["flops"]), base_flops + int(ref["flops"])
        per_seed.append(1 - int(got["flops"]) / int(ref["flops"]))
    row = summarise(records)
    row.update(spec=spec, group=group_of(spec), saved=100 * (1 - flops / base_flops),
               saved_min=100 * min(per_seed), saved_max=100 * max(per_seed))
    return row


def pareto(rows: list[dict]) -> None:
    for r in rows:
        r["front"] = not any(o is not r and o["saved"] >= r["saved"] and o["psnr"] >= r["psnr"]
                             and (o["saved"] > r["saved"] or o["psnr"] > r["psnr"]) for o in rows)


def fmt(x, digits=2):
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.{digits}f}"


def tables(rows: list[dict], base: dict, title: str) -> str:
    scored = [r for r in rows if r["spec"] != "baseline"]
    pareto(scored)
    lines = [f"### {title}", "", f"Baseline prompt-following {fmt(base['prompt_following'], 1)}%. "
             "Rows sorted by FLOPs saved; * = on the Pareto front of FLOPs saved vs PSNR over all rows.", "",
             "| group | setting | FLOPs saved % (seed range) | PSNR dB | worst dB | SSIM | PF % | front |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(scored, key=lambda r: (r["saved"], r["psnr"])):
        lines.append(f"| {r['group']} | `{r['spec']}` | {fmt(r['saved'], 1)} ({fmt(r['saved_min'], 0)}-{fmt(r['saved_max'], 0)}) "
                     f"| {fmt(r['psnr'])} | {fmt(r['psnr_worst_seed'])} | {fmt(r['ssim'], 4)} "
                     f"| {fmt(r['prompt_following'], 1)} | {'*' if r['front'] else ''} |")
    ours = [r for r in scored if is_ours(r["spec"])]
    lines += ["", f"#### {title}: matched cost", "",
              "For each peer setting: our setting with the closest FLOPs saved; our best PSNR among our settings "
              "saving at least as much; our largest saving among our settings with at least the peer's PSNR.", "",
              "| peer | saved % | PSNR | PF | ours, closest cost | saved % | PSNR | PF | ours best PSNR at >= saving | ours most saved at >= PSNR |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    peers = [r for r in scored if r["group"] in GROUPS.values()]
    for p in sorted(peers, key=lambda r: (r["group"], r["saved"])):
        if not ours:
            break
        near = min(ours, key=lambda o: (abs(o["saved"] - p["saved"]), -o["psnr"]))
        cheaper = [o for o in ours if o["saved"] >= p["saved"]]
        better = [o for o in ours if o["psnr"] >= p["psnr"]]
        best = max(cheaper, key=lambda o: o["psnr"]) if cheaper else None
        most = max(better, key=lambda o: o["saved"]) if better else None
        best_text = f"{fmt(best['psnr'])} (`{best['spec']}`, {fmt(best['saved'], 1)}%)" if best else "none"
        most_text = f"{fmt(most['saved'], 1)}% (`{most['spec']}`, {fmt(most['psnr'])} dB)" if most else "none"
        lines.append(
            f"| {p['group']} `{p['spec']}` | {fmt(p['saved'], 1)} | {fmt(p['psnr'])} | {fmt(p['prompt_following'], 1)} "
            f"| `{near['spec']}` | {fmt(near['saved'], 1)} | {fmt(near['psnr'])} | {fmt(near['prompt_following'], 1)} "
            f"| {best_text} | {most_text} |")
    return "\n".join(lines)


def main(args) -> int:
    from diffaccel.evaluation.runner import parse_seeds

    out = args.out or REPO / "runs" / "pareto" / f"{args.model}-{args.prompts}"
    seeds = parse_seeds(args.seeds)
    base = score(out / "baseline", seeds)
    rows, missing, failed = [], [], []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        if (folder / "failed.txt").is_file():
            failed.append(f"{folder.name}: {(folder / 'failed.txt').read_text()[:200]}")
        elif (folder / "spec.txt").is_file():
            row = score(folder, seeds)
            (rows.append(row) if row else missing.append(folder.name))
    text = tables(rows, base, f"{args.model}, {args.prompts} captions, seeds {args.seeds}")
    if failed:
        text += "\n\nFailed: " + "; ".join(failed)
    if missing:
        text += "\n\nIncomplete (not all seeds yet): " + ", ".join(missing)
    (out / "report.md").write_text(text + "\n")
    print(text)
    return 0

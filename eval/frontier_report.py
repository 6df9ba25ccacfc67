"""Tables, Pareto frontier, remaining peer wins and the plot of the frontier suite (eval/frontier.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PSNR_CAP = 100.0  # dB given to a seed whose output equals the baseline bit for bit (for the mean)
WIN_MARGIN_DB = 1.0  # a peer point stays a win unless a diffaccel point is this much better at no less saving


def psnr_per_seed(images: dict, baseline: dict) -> list[float]:
    out = []
    for seed, image in images.items():
        mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(baseline[seed], np.float64)) ** 2))
        out.append(PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse)))
    return out


def mean_ci(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Mean and 95% bootstrap percentile interval (fixed generator: the same numbers every run)."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _family(spec: str, owner: str) -> tuple[str, str]:
    """(method, setting) for the table."""
    if owner == "baseline":
        return "baseline", ""
    head, _, rest = spec.partition(":")
    if owner == "peer":
        return head, rest
    if head in ("quality", "balanced", "fast"):
        return "diffaccel preset", head
    if spec.startswith(("target@", "profile:")):
        return "diffaccel target_speedup", spec.rpartition("@")[2]
    return "diffaccel " + "+".join(p.partition(":")[0] for p in spec.split("+")), spec


def summarise(configs, results: dict, timings: dict) -> list[dict]:
    base = results["baseline"]
    base_flops = sum(base["flops"].values())
    rows = []
    for config in configs:
        res = results[config.spec]
        method, setting = _family(config.spec, config.owner)
        row = {"spec": config.spec, "owner": config.owner, "method": method, "setting": setting}
        if "error" in res:
            rows.append({**row, "error": res["error"]})
            continue
        psnrs = psnr_per_seed(res["images"], base["images"])
        mean, lo, hi = mean_ci(psnrs)
        row.update(saved=1.0 - sum(res["flops"].values()) / base_flops, psnr=mean, lo=lo, hi=hi, hooked=res["hooked"],
                   identical=sum(p >= PSNR_CAP for p in psnrs), seeds=len(psnrs))
        timing = timings.get(config.spec)
        if timing and "pairs" in timing:
            pairs = np.asarray(timing["pairs"])
            wall, den = pairs[:, 0] / pairs[:, 1], pairs[:, 2] / np.maximum(pairs[:, 3], 1e-9)
            row.update(wall=float(np.median(wall)), wall_q=(float(np.percentile(wall, 25)), float(np.percentile(wall, 75))),
                       den=float(np.median(den)), load=timing.get("load"))
        elif timing:
            row["wall_error"] = timing.get("error")
        rows.append(row)
    mark_frontier(rows)
    mark_peer_wins(rows)
    return rows


def _points(rows, owner=None):
    return [r for r in rows if "psnr" in r and r["owner"] != "baseline" and (owner is None or r["owner"] == owner)]


def mark_frontier(rows: list[dict]) -> None:
    """Pareto-optimal in (FLOPs saved, PSNR): no other point is at least as good in both and better in one."""
    pts = _points(rows)
    for r in pts:
        r["frontier"] = not any(o is not r and o["saved"] >= r["saved"] and o["psnr"] >= r["psnr"]
                                and (o["saved"] > r["saved"] or o["psnr"] > r["psnr"]) for o in pts)


def mark_peer_wins(rows: list[dict]) -> None:
    """A peer point (that acts: saves FLOPs) remains a win unless some diffaccel point saves no less
    and is >= WIN_MARGIN_DB better; the best diffaccel answer at no less saving is kept beside it."""
    ours = _points(rows, "diffaccel")
    for r in _points(rows, "peer"):
        if r["saved"] <= 0:
            continue
        rivals = [o for o in ours if o["saved"] >= r["saved"]]
        best = max(rivals, key=lambda o: o["psnr"], default=None)
        r["answer"] = best
        r["win"] = best is None or best["psnr"] < r["psnr"] + WIN_MARGIN_DB


def _fmt_row(r: dict) -> str:
    if "error" in r:
        why = r["error"] if r["error"].startswith("not run yet") else "cannot run: " + r["error"]
        return f"| {r['method']} | {r['setting']} | - | {why} | - | - | - |"
    psnr = "identical" if r["identical"] == r["seeds"] else f"{r['psnr']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"
    if 0 < r["identical"] < r["seeds"]:
        psnr += f" ({r['identical']} identical)"
    wall = f"{r['wall']:.2f}x ({r['wall_q'][0]:.2f}-{r['wall_q'][1]:.2f})" if "wall" in r else (
        "failed" if "wall_error" in r else "-")
    den = f"{r['den']:.2f}x" if "den" in r else "-"
    flag = " *" if r.get("frontier") else ""
    inactive = " (acts on nothing)" if r["owner"] == "peer" and r["saved"] <= 0 and r["identical"] == r["seeds"] else ""
    return (f"| {r['method']}{flag} | {r['setting']}{inactive} | {100 * r['saved']:.1f} | {psnr} | {wall} | {den} | "
            f"{r['hooked']} |")


def write_report(out: Path, rows: list[dict], *, model: str, steps: int, seeds: list[int], captions: str,
                 command: str, seconds: tuple[float, float], rounds: int) -> None:
    loads = [r["load"] for r in rows if r.get("load") is not None]
    lines = [
        f"# Quality at speed on the bundled {model}: diffaccel against its peers", "",
        f"Command: `OMP_NUM_THREADS=1 {command}`  ",
        f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), {captions} captions, {steps} steps, CPU fp32, 1 thread. "
        "PSNR: mean over seeds of the per-seed PSNR against the unaccelerated output (pixel space, same seed and "
        "caption), with its 95% bootstrap interval; a seed identical to the baseline counts as "
        f"{PSNR_CAP:.0f} dB. FLOPs saved: denoiser FLOPs of the very calls measured, counted by one counter for "
        "every method (diffaccel.flops.flop_counter active inside the denoiser's forward), summed over the seeds. "
        f"Wall: median speed-up (IQR) of {rounds} paired rounds (baseline call, then config call, one seed), whole "
        "pipeline call; denoiser: the same rounds, time inside the denoiser's forward. "
        + (f"Load average while timing {min(loads):.1f}-{max(loads):.1f} on a shared 2-core machine: wall numbers "
           "are noisy, FLOPs and PSNR are exact. " if loads else "")
        + "`*`: on the Pareto frontier of all points. Hooked: modules the method hooked or patched in the denoiser.",
        f"Time: quality pass {seconds[0]:.0f} s, timing {seconds[1]:.0f} s (cached per-seed results are reused).", "",
        "| method | setting | FLOPs saved % | PSNR dB [95% CI] | wall speed-up (IQR) | denoiser wall | hooked |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"baseline": 0, "diffaccel": 1, "peer": 2}
    for r in sorted(rows, key=lambda r: (order[r["owner"]], r["method"], r.get("saved", 2))):
        lines.append(_fmt_row(r))
    front = sorted((r for r in _points(rows) if r.get("frontier")), key=lambda r: r["saved"])
    lines += ["", "## Pareto frontier (FLOPs saved, PSNR)", "",
              ", ".join(f"{r['method']} {r['setting']} ({100 * r['saved']:.1f}%, {r['psnr']:.1f} dB)" for r in front)]
    wins = [r for r in _points(rows, "peer") if r.get("win")]
    lines += ["", f"## Peer wins that remain ({len(wins)} of {sum('win' in r for r in _points(rows, 'peer'))} "
              f"acting peer points)", "",
              f"A peer point remains a win unless a diffaccel point saves at least as many FLOPs at >= "
              f"{WIN_MARGIN_DB:.0f} dB higher PSNR.", ""]
    if wins:
        lines += ["| peer | setting | FLOPs saved % | PSNR dB | best diffaccel at >= that saving | gap dB |", "|---|---|---|---|---|---|"]
        for r in sorted(wins, key=lambda r: r["saved"]):
            a = r.get("answer")
            answer = f"{a['method']} {a['setting']} ({100 * a['saved']:.1f}%, {a['psnr']:.2f} dB)" if a else "none saves as much"
            gap = f"{a['psnr'] - r['psnr']:+.2f}" if a else "-"
            lines.append(f"| {r['method']} | {r['setting']} | {100 * r['saved']:.1f} | {r['psnr']:.2f} | {answer} | {gap} |")
    else:
        lines.append("None.")
    plot = out.with_suffix(".png")
    lines += ["", f"Plot: [{plot.name}]({plot.name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    plot_frontier(plot, rows, model)


def plot_frontier(path: Path, rows: list[dict], model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = sorted({r["method"] for r in _points(rows)})
    cmap = plt.get_cmap("tab20")
    for i, method in enumerate(methods):
        pts = sorted((r for r in _points(rows) if r["method"] == method), key=lambda r: r["saved"])
        ours = pts[0]["owner"] == "diffaccel"
        ax.plot([100 * r["saved"] for r in pts], [min(r["psnr"], 60) for r in pts], marker="o" if ours else "x",
                linestyle="-" if ours else ":", color=cmap(i % 20), label=method, linewidth=2 if ours else 1)
    front = sorted((r for r in _points(rows) if r.get("frontier")), key=lambda r: r["saved"])
    ax.step([100 * r["saved"] for r in front], [min(r["psnr"], 60) for r in front], where="post", color="k",
            alpha=0.3, linewidth=4, label="Pareto frontier")
    ax.set_xlabel("denoiser FLOPs saved (%)")
    ax.set_ylabel("PSNR vs unaccelerated (dB, capped at 60)")
    ax.set_title(f"{model}: quality at speed (held-out captions)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""results.json, a markdown table and a speed vs quality plot from an evaluation's numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

from diffaccel import metrics
from diffaccel.evaluation import quality
from diffaccel.validate import write_atomic

# What each preset promises on every bundled model: minimum PSNR vs baseline (image, video)
# and the most prompt-following (percentage points of attributes right) it may lose.
PROMISES = {"quality": (35.0, 30.0, 2.0), "balanced": (30.0, 25.0, 3.0), "fast": (25.0, 20.0, 5.0)}


def promise_check(name: str, summary: dict, baseline: dict, video: bool) -> dict | None:
    if name not in PROMISES:
        return None
    image_db, video_db, points = PROMISES[name]
    need_db = video_db if video else image_db
    psnr = summary.get("psnr", math.inf)
    check = {"psnr_min": need_db, "psnr_ok": psnr >= need_db}
    if "prompt_following" in summary:
        lost = baseline["prompt_following"] - summary["prompt_following"]
        check.update(max_pf_loss=points, pf_loss=lost, pf_ok=lost <= points)
    check["holds"] = check["psnr_ok"] and check.get("pf_ok", True)
    return check


def assemble(options, configs, records, fids, fid_note, speed, notes, video, clip_name) -> dict:
    base = configs[0].name
    per_config = {}
    for config in configs:
        summary = quality.summarise([r for r in records if r["config"] == config.name])
        if config.name in fids:
            summary["fid"] = fids[config.name]
        summary["speed"] = speed_summary(speed["configs"][config.name], speed["configs"][base])
        summary["spec"] = config.spec
        summary["methods"] = config.method_dicts()
        per_config[config.name] = summary
    for config in configs:
        check = promise_check(config.preset or config.name, per_config[config.name], per_config[base], video)
        if check is not None:
            per_config[config.name]["promise"] = check
    return _plain({
        "model": options.model, "video": video, "seeds": list(options.seeds), "call": _call_of(options, video),
        "repeats": options.repeats, "timing": {k: v for k, v in speed.items() if k != "configs"},
        "clip_model": clip_name, "fid": fid_note, "skipped": notes,
        "configs": per_config, "samples": records,
    })


def speed_summary(s: dict, b: dict) -> dict:
    """One config's latencies (median, spread) and speed-ups against the baseline ``b``, each
    beside its FLOPs ideal; ``above_ideal`` flags a speed-up the saved FLOPs cannot explain."""
    def ratio(x, y):
        return x / y if y else None

    out = {
        "e2e_median_s": s["e2e"]["median_s"], "e2e_iqr_s": s["e2e"]["iqr_s"], "e2e_min_s": s["e2e"]["min_s"],
        "denoiser_median_s": s["denoiser"]["median_s"], "denoiser_iqr_s": s["denoiser"]["iqr_s"],
        "speedup": ratio(b["e2e"]["median_s"], s["e2e"]["median_s"]),
        "denoiser_speedup": ratio(b["denoiser"]["median_s"], s["denoiser"]["median_s"]),
        "ideal_speedup": ratio(b["flops"], s["flops"]),
        "denoiser_ideal_speedup": ratio(b["denoiser_flops"], s["denoiser_flops"]),
        "flops": s["flops"], "denoiser_flops": s["denoiser_flops"],
        "flops_saved": 1 - s["denoiser_flops"] / b["denoiser_flops"] if b["denoiser_flops"] else None,
        "flops_saved_estimate": s["flops_saved_estimate"], "e2e_s": s["e2e_s"], "denoiser_s": s["denoiser_s"],
    }
    out["above_ideal"] = any(x is not None and y is not None and x > y for x, y in
                             ((out["speedup"], out["ideal_speedup"]),
                              (out["denoiser_speedup"], out["denoiser_ideal_speedup"])))
    return out


def timing_warning(results: dict) -> str | None:
    """One line when the latencies should not be trusted as they stand, else None."""
    busy = results.get("timing", {}).get("busy")
    return None if not busy else ("Timings unreliable, the machine was busy: " + "; ".join(busy)
                                  + ". Speed-ups may be off; rerun on an idle machine.")


def latency_text(median, iqr, fmt: str = ".3f") -> str:
    """A latency with its spread: median (IQR as a share of it; "1 round" when there is no spread)."""
    if median is None:
        return "-"
    if iqr is None:
        return f"{format(median, fmt)} (1 round)"
    return f"{format(median, fmt)} ({100 * iqr / median:.0f}%)" if median else format(median, fmt)


def speedup_text(speedup, ideal) -> str:
    """A speed-up, flagged when it exceeds what the saved FLOPs allow (timing noise, or overhead saved)."""
    if speedup is None:
        return "-"
    flag = f" (above FLOPs ideal {ideal:.2f}x)" if ideal is not None and speedup > ideal else ""
    return f"{speedup:.2f}x{flag}"


PROMPT_FOLLOWING_NOTE = ("prompt-following: % of the caption's attributes (colour, shape, position or motion, "
                         "background) that the bundled pixel analyser reads back from the output.")


def _plain(value):
    """Exactly what results.json will hold (tuples become lists, odd values strings)."""
    from diffaccel.evaluation.runner import finite_or_text

    return json.loads(json.dumps(finite_or_text(value), default=str))


def _call_of(options, video):
    from diffaccel.evaluation.generation import CallSettings

    return CallSettings.for_model(options.model, options.steps, options.resolution, options.frames, video).kwargs


def _num(value, fmt: str) -> str:
    if value is None:
        return "-"
    if value == "inf":
        return "identical"
    return format(value, fmt)


def table(results: dict) -> str:
    """The markdown table: one row per config."""
    rows = results["configs"]
    extra = [(key, title, fmt) for key, title, fmt in
             (("lpips", "LPIPS", ".4f"), ("fid", "FID", ".2f"), ("clip", "CLIP", ".2f"),
              ("prompt_following", "prompt-following %", ".1f"))
             if any(key in r for r in rows.values())]
    head = ["config", "latency s/call (IQR)", "speed-up", "denoiser s/call (IQR)", "denoiser speed-up", "denoiser GFLOPs",
            "FLOPs saved",
            "PSNR dB", "worst-seed PSNR", "SSIM"] + [t for _, t, _ in extra] + ["promise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        s = r["speed"]
        promise = r.get("promise")
        cells = [name, latency_text(s["e2e_median_s"], s["e2e_iqr_s"]), speedup_text(s["speedup"], s["ideal_speedup"]),
                 latency_text(s["denoiser_median_s"], s["denoiser_iqr_s"]),
                 speedup_text(s["denoiser_speedup"], s["denoiser_ideal_speedup"]), _num(s["denoiser_flops"] / 1e9, ".3f"),
                 _num(100 * s["flops_saved"] if s["flops_saved"] is not None else None, ".1f") + "%",
                 _num(r.get("psnr"), ".2f"), _num(r.get("psnr_worst_seed"), ".2f"), _num(r.get("ssim"), ".4f")]
        cells += [_num(r.get(key), fmt) for key, _, fmt in extra]
        cells.append("-" if promise is None else ("holds" if promise["holds"] else "FAILS") +
                     f" (PSNR >= {promise['psnr_min']:g}" + (f", PF loss <= {promise['max_pf_loss']:g}" if "max_pf_loss" in promise else "")
                     + ("" if promise["psnr_ok"] or "worst_seed" not in r else
                        f"; {r['psnr_without_worst_seed']:.2f} without seed {r['worst_seed']}") + ")")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    call = ", ".join(f"{k}={v}" for k, v in results["call"].items())
    parts = [f"### {results['model']}", "", f"{len(results['seeds'])} seeds, {call}; {timing_text(results)}", "",
             table(results), ""]
    if any("prompt_following" in r for r in results["configs"].values()):
        parts.append(PROMPT_FOLLOWING_NOTE[0].upper() + PROMPT_FOLLOWING_NOTE[1:])
    warning = timing_warning(results)
    if warning:
        parts.append(f"**{warning}**")
    if results.get("clip_model"):
        parts.append(f"CLIP model: {results['clip_model']}.")
    if results.get("fid"):
        parts.append(f"FID features: {results['fid']['features']}; reference: {results['fid']['reference']}.")
    parts += [f"- {note}" for note in results["skipped"]]
    return "\n".join(parts) + "\n"


def timing_text(results: dict) -> str:
    """How the latencies were measured, in one sentence."""
    t = results["timing"]
    loads = "/".join(f"{x:.1f}" for x in t["load_average"]) or "unknown"
    return (f"latency = seconds per pipeline call, median of {t['rounds']} interleaved rounds (stopped: {t['stopped']}), "
            f"IQR = interquartile range over the rounds; load average {loads} on {t['cpus']} cores, "
            f"{t['threads']} threads timing.")


def plot(results: dict, path: Path) -> None:
    """Speed-up (x) against PSNR vs baseline (y), one labelled point per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["configs"]
    finite = [r["psnr"] for r in rows.values() if isinstance(r.get("psnr"), float)]
    top = (max(finite) if finite else 40.0) + 5.0  # where identical outputs (and the baseline) are drawn
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, r in rows.items():
        y = r["psnr"] if isinstance(r.get("psnr"), float) else top
        ax.scatter(r["speed"]["speedup"], y, color="tab:gray" if name == "baseline" else "tab:blue")
        label = (name if y != top else f"{name} (identical)") + (" (above FLOPs ideal)" if r["speed"]["above_ideal"] else "")
        ax.annotate(label, (r["speed"]["speedup"], y), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("end-to-end speed-up vs baseline")
    ax.set_ylabel("PSNR vs baseline (dB)")
    busy = " (timings unreliable: machine busy)" if timing_warning(results) else ""
    ax.set_title(f"{results['model']}: speed vs fidelity{busy}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.3, y=0.15)  # room for the labels
    fig.tight_layout()
    write_atomic(path, fig.savefig)
    plt.close(fig)


def write(out: Path, results: dict) -> None:
    text = json.dumps(results, indent=1)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(text))
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(markdown(results)))
    if metrics.available("matplotlib"):  # else skipped, with the eval extra's note
        plot(results, out / "speed_quality.png")

"""PNG of a Profile: heatmap of the change per (step, block) and per-step curves.

matplotlib comes with the ``eval``/``test`` extras; it is imported only here.
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.profiler.profile import Profile
from diffaccel.validate import write_atomic


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plotting a profile needs matplotlib: pip install 'diffaccel[eval]' (or pip install matplotlib).") from None
    return plt


def plot_profile(profile: Profile, path) -> Path:
    """Left: rel-L1 change of each block's output per step. Right: mean per step, by module kind, with spread."""
    plt = _pyplot()
    blocks = [m["name"] for m in profile.modules if m["kind"] == "block"]
    grid = [[profile.series(b)[s] if profile.series(b)[s] is not None else float("nan") for s in range(len(profile.times))] for b in blocks]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.3 * len(blocks) + 1.5)))
    image = left.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    left.set_yticks(range(len(blocks)), blocks, fontsize=7)
    left.set_xlabel("step")
    left.set_title("rel. L1 change of block output vs previous step")
    fig.colorbar(image, ax=left)
    x = profile.times
    for kind in sorted({m["kind"] for m in profile.modules}):
        cols = [j for j, m in enumerate(profile.modules) if m["kind"] == kind]
        means, spreads = [], []
        for s in range(len(x)):
            vals = [profile.stats["rel_l1"]["mean"][s][j] for j in cols]
            stds = [profile.stats["rel_l1"]["std"][s][j] for j in cols]
            ok = [(v, d) for v, d in zip(vals, stds) if v is not None]
            means.append(sum(v for v, _ in ok) / len(ok) if ok else float("nan"))
            spreads.append(sum(d for _, d in ok) / len(ok) if ok else float("nan"))
        right.plot(x, means, marker=".", label=kind)
        right.fill_between(x, [m - d for m, d in zip(means, spreads)], [m + d for m, d in zip(means, spreads)], alpha=0.2)
    right.invert_xaxis()  # noise (t = 1) on the left, like the denoising loop
    right.set_xlabel("normalised time t (1 = noise)")
    right.set_ylabel("rel. L1 change (mean ± std over prompts)")
    right.set_yscale("log")
    right.legend(fontsize=8)
    fig.suptitle(f"{profile.model} ({profile.pipeline}), {profile.measured.get('prompts', '?')} prompts x {len(x)} steps")
    fig.tight_layout()
    path = write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)
    return path

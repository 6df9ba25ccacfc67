"""Presets: for each family, the methods behind "quality", "balanced" and "fast".

Each entry is (method name, parameters). The promises the presets keep on the bundled models
(PSNR vs the unaccelerated output, prompt-following) are measured by eval/evaluate.py and
listed in README; tune the parameters here from those measurements.
"""
from __future__ import annotations

from diffaccel.methods.base import METHODS, Method

# U-Nets: DeepCache (branch 0) every 2 / 3 / 5 steps; "fast" adds ToMe, whose gate merges only where
# merging is measured to pay (large token counts). Checked on tiny-sd: eval/results/fidelity_unet.md.
# Image and video DiTs: block-residual caching (AdaptiveCache); image "fast" adds FasterCache's CFG-Cache
# (attention reuse off: it compounds with skipped blocks). On tiny-video CFG-Cache on top of a strong
# threshold cost prompt-following, so video uses thresholds alone. Tuned on tiny-dit / tiny-video
# (8 seeds, PSNR vs baseline and prompt-following): eval/results/fidelity_dit.md. Video "quality" never
# reuses two steps in a row: on tiny-video that kept 39.0 dB at 35.7% FLOPs saved where runs of reuses
# (max_consecutive 4) gave 32.1 dB at 43.6% (eval/results/fidelity_dit_peers.md).
PRESETS: dict[str, dict[str, list[tuple[str, dict]]]] = {
    "quality": {
        "unet": [("deepcache", dict(interval=2, branch=0))],
        "image_dit": [("adaptive_cache", dict(threshold=0.1, warmup=2, max_consecutive=3))],
        "video_dit": [("adaptive_cache", dict(threshold=0.3, warmup=2, max_consecutive=1))],
    },
    "balanced": {
        "unet": [("deepcache", dict(interval=3, branch=0))],
        "image_dit": [("adaptive_cache", dict(threshold=0.15, warmup=2, max_consecutive=3))],
        "video_dit": [("adaptive_cache", dict(threshold=0.25, warmup=2, max_consecutive=5))],
    },
    "fast": {
        "unet": [("deepcache", dict(interval=5, branch=0)), ("tome", dict(ratio=0.5, max_downsample=None))],
        "image_dit": [("adaptive_cache", dict(threshold=0.2, warmup=2, max_consecutive=4)),
                      ("faster_cache", dict(attention_interval=1, cfg_interval=3))],
        "video_dit": [("adaptive_cache", dict(threshold=0.35, warmup=2, max_consecutive=6))],
    },
}


def preset_methods(preset: str, family: str) -> list[Method]:
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")
    out = []
    for name, params in PRESETS[preset][family]:
        if name not in METHODS:
            raise RuntimeError(f"Preset {preset!r} names method {name!r}, which is not registered (diffaccel bug).")
        out.append(METHODS[name](**params))
    return out

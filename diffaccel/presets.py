"""Presets: for each family, the methods behind "quality", "balanced" and "fast".

Each entry is (method name, parameters). The promises the presets keep on the bundled models
(PSNR vs the unaccelerated output, prompt-following) are measured by eval/evaluate.py and
listed in README; tune the parameters here from those measurements.
"""
from __future__ import annotations

from diffaccel.methods.base import METHODS, Method

PRESETS: dict[str, dict[str, list[tuple[str, dict]]]] = {
    "quality": {"unet": [], "image_dit": [], "video_dit": []},
    "balanced": {"unet": [], "image_dit": [], "video_dit": []},
    "fast": {"unet": [], "image_dit": [], "video_dit": []},
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

"""Presets: the methods behind "quality", "balanced" and "fast" for each family.

The entries live with each family in :mod:`diffaccel.families`; :data:`PRESETS` is the same data
indexed by preset, ``{preset: {family: [(method name, parameters), ...]}}``. The promises the
presets keep on the bundled models (PSNR vs the unaccelerated output, prompt-following) are
measured by eval/evaluate.py and listed in README.
"""
from __future__ import annotations

from diffaccel.families import FAMILIES, PRESET_NAMES, preset_entry
from diffaccel.methods.base import METHODS, Method

PRESETS: dict[str, dict[str, list[tuple[str, dict]]]] = {
    preset: {family: [(name, dict(params)) for name, params in spec.presets.get(preset, ())]
             for family, spec in FAMILIES.items()}
    for preset in PRESET_NAMES
}


def preset_methods(preset: str, family: str) -> list[Method]:
    """Fresh method configs of ``preset`` for ``family``."""
    out = []
    for name, params in preset_entry(preset, family):
        if name not in METHODS:
            raise RuntimeError(f"Preset {preset!r} names method {name!r}, which is not registered (diffaccel bug).")
        out.append(METHODS[name](**params))
    return out

"""diffaccel: training-free acceleration for diffusers pipelines.

    import diffaccel
    pipe = diffaccel.accelerate(pipe)          # family detected, "balanced" preset
    image = pipe(prompt).images[0]
    print(diffaccel.stats(pipe))
    diffaccel.disable(pipe)                    # bit-identical to never accelerated
"""
from diffaccel.api import accelerate, disable, stats
from diffaccel.bundled.loader import load_bundled
from diffaccel.families import Family
from diffaccel.methods import (
    METHODS,
    PAB,
    AdaptiveCache,
    CfgCache,
    DeepCache,
    FasterCache,
    Instrument,
    MediatorAttention,
    Method,
    SlidingTileAttention,
    StepCache,
    TextCache,
    ToMe,
    instrument,
)
from diffaccel.presets import PRESETS

__version__ = "0.1.0"

__all__ = [
    "accelerate", "disable", "stats", "load_bundled", "METHODS", "Method", "PRESETS", "Family", "instrument",
    "Instrument", "DeepCache", "ToMe", "AdaptiveCache", "StepCache", "TextCache", "FasterCache", "CfgCache", "PAB", "SlidingTileAttention",
    "MediatorAttention", "__version__",
]

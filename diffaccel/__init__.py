"""diffaccel: training-free acceleration for diffusers pipelines.

    import diffaccel
    pipe = diffaccel.accelerate(pipe)          # family detected, "balanced" preset
    image = pipe(prompt).images[0]
    print(diffaccel.stats(pipe))
    diffaccel.disable(pipe)                    # bit-identical to never accelerated
"""
from diffaccel import methods as _methods  # noqa: F401  (registers the method configs)
from diffaccel.api import accelerate, disable, stats
from diffaccel.methods.base import METHODS, Method
from diffaccel.presets import PRESETS

__version__ = "0.1.0"

__all__ = ["accelerate", "disable", "stats", "METHODS", "Method", "PRESETS", "__version__"]

"""diffaccel: training-free acceleration for diffusers pipelines.

    import diffaccel
    pipe = diffaccel.accelerate(pipe)          # family detected, "balanced" preset
    image = pipe(prompt).images[0]
    print(diffaccel.stats(pipe))
    diffaccel.disable(pipe)                    # bit-identical to never accelerated
"""
from diffaccel import methods as _methods  # noqa: F401  (registers the method configs)
from diffaccel.api import accelerate, disable, stats
from diffaccel.methods import instrument
from diffaccel.methods.base import METHODS, Method
from diffaccel.methods import DeepCache, ToMe
from diffaccel.methods.instrument import Instrument
from diffaccel.methods.adaptive_cache import AdaptiveCache  # noqa: E402
from diffaccel.methods.faster_cache import FasterCache  # noqa: E402
from diffaccel.methods.pab import PAB  # noqa: E402
from diffaccel.methods.sliding_tile import SlidingTileAttention  # noqa: E402
from diffaccel.methods.mediator import MediatorAttention  # noqa: E402
from diffaccel.presets import PRESETS
from diffaccel.bundled.loader import load_bundled

__version__ = "0.1.0"

__all__ = ["accelerate", "disable", "stats", "METHODS", "Method", "PRESETS", "Instrument", "instrument", "DeepCache", "ToMe", "__version__"]
__all__ += ["AdaptiveCache", "FasterCache", "PAB", "load_bundled"]
__all__ += ["SlidingTileAttention", "MediatorAttention"]

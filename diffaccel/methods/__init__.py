"""Acceleration methods, one file each. Importing this package registers them."""
from diffaccel.methods.base import METHODS, Installed, Method, register

__all__ = ["METHODS", "Installed", "Method", "register"]
from diffaccel.methods.instrument import Instrument, record

__all__ += ["Instrument", "record"]
from diffaccel.methods.deepcache import DeepCache  # noqa: E402
__all__ += ["DeepCache"]
from diffaccel.methods.tome import ToMe  # noqa: E402
__all__ += ["ToMe"]
from diffaccel.methods.adaptive_cache import AdaptiveCache  # noqa: E402
__all__ += ["AdaptiveCache"]
from diffaccel.methods.pab import PAB  # noqa: E402
from diffaccel.methods.faster_cache import FasterCache  # noqa: E402
__all__ += ["PAB", "FasterCache"]
from diffaccel.methods.sliding_tile import SlidingTileAttention  # noqa: E402
from diffaccel.methods.mediator import MediatorAttention  # noqa: E402
__all__ += ["SlidingTileAttention", "MediatorAttention"]

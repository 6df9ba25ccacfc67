"""Acceleration methods, one file each. Importing this package registers them."""
from diffaccel.methods.base import METHODS, Installed, Method, register
from diffaccel.methods.instrument import Instrument, Recording, record
from diffaccel.methods.deepcache import DeepCache
from diffaccel.methods.tome import ToMe
from diffaccel.methods.adaptive_cache import AdaptiveCache
from diffaccel.methods.step_cache import StepCache
from diffaccel.methods.text_cache import TextCache
from diffaccel.methods.pab import PAB
from diffaccel.methods.faster_cache import FasterCache
from diffaccel.methods.cfg_cache import CfgCache
from diffaccel.methods.sliding_tile import SlidingTileAttention
from diffaccel.methods.mediator import MediatorAttention

__all__ = [
    "METHODS", "Installed", "Method", "register", "Instrument", "Recording", "record", "DeepCache", "ToMe",
    "AdaptiveCache", "StepCache", "TextCache", "PAB", "FasterCache", "CfgCache", "SlidingTileAttention", "MediatorAttention",
]

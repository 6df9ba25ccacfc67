"""Acceleration methods, one file each. Importing this package registers them."""
from diffaccel.methods.base import METHODS, Installed, Method, register

__all__ = ["METHODS", "Installed", "Method", "register"]

"""Small trained pipelines shipped with diffaccel (tiny-sd, tiny-dit, tiny-video), their
synthetic captioned dataset and the pixel analyser that measures their prompt-following."""

from .loader import BUNDLED_MODELS, bundled_dir, default_call_kwargs, load_bundled

__all__ = ["BUNDLED_MODELS", "bundled_dir", "default_call_kwargs", "load_bundled"]

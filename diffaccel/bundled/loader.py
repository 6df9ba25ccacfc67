"""Load a bundled trained pipeline (tiny-sd, tiny-dit, tiny-video) offline.

>>> pipe = load_bundled("tiny-dit")                             # doctest: +SKIP
>>> image = pipe("a red circle in the center on a black background").images[0]  # doctest: +SKIP

The pipelines are ordinary diffusers folders (model_index.json + safetensors), loaded
with their real pipeline class's from_pretrained. The big models' call defaults do not fit
them (50 steps, 512-1024 pixels, 81 frames, PixArt's resolution binning), so a loaded
bundled pipeline calls with the arguments it was trained and measured with
(default_call_kwargs) wherever the caller gives none.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BundledModel:
    pipeline_class: str  # diffusers class whose from_pretrained loads the folder
    folder: str  # under bundled_dir()
    steps: int  # default num_inference_steps
    guidance_scale: float
    height: int = 32
    width: int = 32
    num_frames: int | None = None  # video models only
    extra_call_kwargs: dict = field(default_factory=dict)  # what the class's defaults get wrong here


BUNDLED_MODELS = {
    "tiny-sd": BundledModel("StableDiffusionPipeline", "tiny-sd", steps=20, guidance_scale=5.0),
    "tiny-dit": BundledModel(
        "PixArtAlphaPipeline", "tiny-dit", steps=20, guidance_scale=4.5,
        # Binning only knows 256/512/1024-pixel models; captions need no cleaning (and bs4).
        extra_call_kwargs={"use_resolution_binning": False, "clean_caption": False}),
    "tiny-video": BundledModel("WanPipeline", "tiny-video", steps=20, guidance_scale=5.0,
                               num_frames=9),
}


def bundled_dir() -> Path:
    """Where the bundled pipeline folders live: the repository's assets/ (editable
    install or a checkout on PYTHONPATH), or assets/ packaged inside diffaccel."""
    package = Path(__file__).resolve().parent.parent  # .../diffaccel
    candidates = [package / "assets", package.parent / "assets"]
    for candidate in candidates:
        if any((candidate / model.folder).is_dir() for model in BUNDLED_MODELS.values()):
            return candidate
    return candidates[-1]


def check_name(name: str) -> BundledModel:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; the bundled models are: "
                         f"{', '.join(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name]


def default_call_kwargs(name: str) -> dict:
    """Pipeline call arguments the bundled model was trained and measured with."""
    model = check_name(name)
    kwargs = {"num_inference_steps": model.steps, "guidance_scale": model.guidance_scale,
              "height": model.height, "width": model.width, **model.extra_call_kwargs}
    if model.num_frames is not None:
        kwargs["num_frames"] = model.num_frames
    return kwargs


@functools.cache
def bundled_class(cls: type, name: str) -> type:
    """A subclass of the pipeline class ``cls`` whose call fills in bundled model ``name``'s
    default call arguments where the caller gives none.

    Special methods are looked up on the type, so per-instance defaults need a subclass; it
    keeps the original name (``save_pretrained`` writes it into model_index.json and adapters
    recognise it), and ``diffaccel.accelerate`` subclasses it in turn.
    """
    defaults = default_call_kwargs(name)
    signature = inspect.signature(cls.__call__)

    @functools.wraps(cls.__call__)
    def __call__(self, *args, **kwargs):
        try:
            given = signature.bind_partial(self, *args, **kwargs).arguments
        except TypeError:  # a wrong argument: let the pipeline's own call say so
            return super(called, self).__call__(*args, **kwargs)
        kwargs.update({key: value for key, value in defaults.items() if key not in given})
        return super(called, self).__call__(*args, **kwargs)

    called = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                         "bundled_model": name, "bundled_call_defaults": dict(defaults)})
    return called


@contextlib.contextmanager
def _quiet_loading_bars():
    """Hide the libraries' loading bars: loading a bundled model takes a fraction of a second."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in enabled:
            if was:
                lib.enable_progress_bar()


def load_bundled(name: str, device=None, dtype=None):
    """The bundled pipeline ``name``, loaded offline from bundled_dir()/<name>.

    Called with just a prompt it produces what the model was trained for: its size, frame
    count, steps and guidance (:func:`default_call_kwargs`); any argument given wins.
    """
    import diffusers

    from diffaccel.compat import dtype_kwargs

    model = check_name(name)
    folder = bundled_dir() / model.folder
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} is missing: no {folder / 'model_index.json'}. "
            f"Reproduce it with `python eval/train_bundled.py --model {name} --out {bundled_dir()}`.")
    pipeline_class = getattr(diffusers, model.pipeline_class)
    with _quiet_loading_bars():
        pipe = pipeline_class.from_pretrained(str(folder), local_files_only=True, **dtype_kwargs(dtype))
    pipe.__class__ = bundled_class(type(pipe), name)
    if device is not None:
        pipe = pipe.to(device)
    return pipe

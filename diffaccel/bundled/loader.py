"""Load a bundled trained pipeline (tiny-sd, tiny-dit, tiny-video) offline.

>>> pipe = load_bundled("tiny-sd")                              # doctest: +SKIP
>>> image = pipe("a red circle in the center on a black background",
...              **default_call_kwargs("tiny-sd")).images[0]   # doctest: +SKIP

The pipelines are ordinary diffusers folders (model_index.json + safetensors), loaded
with their real pipeline class's from_pretrained. Their default call arguments differ
from the big models' (32x32 pixels, 9 frames, no PixArt resolution binning), so
default_call_kwargs gives the ones each was trained and measured with.
"""

from __future__ import annotations

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


def load_bundled(name: str, device=None, dtype=None):
    """The bundled pipeline `name`, loaded offline from bundled_dir()/<name>."""
    import diffusers

    from diffaccel.compat import dtype_kwargs

    model = check_name(name)
    folder = bundled_dir() / model.folder
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} is missing: no {folder / 'model_index.json'}. "
            f"Reproduce it with `python eval/train_bundled.py --model {name} --out {bundled_dir()}`.")
    pipeline_class = getattr(diffusers, model.pipeline_class)
    pipe = pipeline_class.from_pretrained(str(folder), local_files_only=True, **dtype_kwargs(dtype))
    if device is not None:
        pipe = pipe.to(device)
    return pipe

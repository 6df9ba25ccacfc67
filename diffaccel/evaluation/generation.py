"""Prompts, call arguments, and one saved output per (config, seed).

Each sample is written as ``<out>/samples/<config>/seed0003.png`` (image) or ``.mp4`` (video,
via imageio-ffmpeg from the eval extra; an animated ``.gif`` without it), plus ``seed0003.npy``: the raw float32 output in [0, 1] that every metric
reads, so metrics never see PNG/MP4 quantisation. The ``.npy`` is written last and atomically:
its presence means the sample is finished, and a finished sample is never generated again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

GENERIC_PROMPTS = [  # for hub / local models that have no caption set of their own
    "a photograph of an astronaut riding a horse",
    "a red bicycle leaning against a brick wall",
    "a bowl of fruit on a wooden table, studio lighting",
    "a lighthouse on a cliff at sunset",
    "a cat sleeping on a windowsill",
    "a city street in the rain at night",
    "a watercolor painting of a mountain lake",
    "a close-up of a sunflower with a bee",
]


BUILTIN_SETS = ("bundled", "heldout", "generic")


def builtin_prompts(name: str, video: bool) -> list[str]:
    """``bundled`` / ``heldout``: the synthetic captions (train / held-out colour-shape pairs),
    in a fixed shuffled order so consecutive seeds see different captions; ``generic``."""
    from diffaccel.bundled.dataset import all_image_captions, all_video_captions

    if name == "generic":
        return list(GENERIC_PROMPTS)
    if name not in ("bundled", "heldout"):
        raise ValueError(f"Unknown built-in prompt set {name!r}; use bundled, heldout, generic or a file path.")
    captions = (all_video_captions if video else all_image_captions)("train" if name == "bundled" else "heldout")
    order = np.random.default_rng(0).permutation(len(captions))
    return [captions[i] for i in order]


def read_prompts(source: str, model: str, video: bool) -> list[str]:
    """Prompts from a file (one per line) or a built-in set name."""
    if source in BUILTIN_SETS:
        return builtin_prompts(source, video)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Prompts file {source!r} does not exist. Give a file with one prompt per line, "
                                "or a built-in set: bundled, heldout, generic.")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"Prompts file {source!r} holds no prompts (one per line).")
    return prompts


def is_video_pipeline(pipe) -> bool:
    from diffaccel.families import Capability, has_capability
    from diffaccel.pipelines import detect

    return has_capability(detect(pipe).family, Capability.VIDEO)


@dataclass
class CallSettings:
    """What every pipeline call of a run shares (the prompt and seed vary)."""

    kwargs: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: str, steps: int | None, resolution: int | None, frames: int | None,
                  video: bool) -> "CallSettings":
        from diffaccel.bundled.loader import BUNDLED_MODELS, default_call_kwargs

        kwargs = default_call_kwargs(model) if model in BUNDLED_MODELS else {"num_inference_steps": 20}
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        if resolution is not None:
            kwargs["height"] = kwargs["width"] = resolution
        if frames is not None:
            if not video:
                raise ValueError("--frames applies to video models only.")
            kwargs["num_frames"] = frames
        return cls(kwargs)


def generate(pipe, prompt: str, seed: int, settings: CallSettings) -> np.ndarray:
    """One output as float32 in [0, 1]: (H, W, 3) for an image, (T, H, W, 3) for a video."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = pipe(prompt, generator=generator, output_type="np", **settings.kwargs)
    array = out.frames if hasattr(out, "frames") else out.images
    array = array[0] if isinstance(array, (list, tuple)) else array[0]
    return np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0)


def sample_paths(out: Path, config: str, seed: int, video: bool) -> tuple[Path, Path]:
    """(viewable file, raw .npy) of one sample."""
    folder = out / "samples" / config
    stem = f"seed{seed:04d}"
    return folder / (stem + (video_suffix() if video else ".png")), folder / (stem + ".npy")


def video_suffix() -> str:
    from diffaccel.metrics import available

    return ".mp4" if available("imageio") and available("imageio_ffmpeg") else ".gif"


def to_uint8(array: np.ndarray) -> np.ndarray:
    return np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8)


def save_sample(array: np.ndarray, viewable: Path, raw: Path, fps: int = 8) -> None:
    viewable.parent.mkdir(parents=True, exist_ok=True)
    tmp_view = viewable.with_name(viewable.stem + ".partial" + viewable.suffix)
    if array.ndim == 4 and viewable.suffix == ".mp4":
        import imageio.v2 as imageio

        imageio.mimwrite(tmp_view, list(to_uint8(array)), fps=fps, codec="libx264", macro_block_size=1)
    elif array.ndim == 4:
        from PIL import Image

        frames = [Image.fromarray(frame) for frame in to_uint8(array)]
        frames[0].save(tmp_view, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    else:
        from PIL import Image

        Image.fromarray(to_uint8(array)).save(tmp_view)
    os.replace(tmp_view, viewable)
    tmp_raw = raw.with_name(raw.stem + ".partial.npy")
    np.save(tmp_raw, array)
    os.replace(tmp_raw, raw)  # last: marks the sample finished


def load_sample(raw: Path) -> np.ndarray:
    return np.load(raw)

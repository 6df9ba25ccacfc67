"""Share of a denoiser call's FLOPs that TextCache reuses, at real sizes (random weights, meta device).

    python eval/text_cache_share.py

Builds each public config in eval/configs/ on the meta device (no memory, no weights), counts one
denoiser call with CFG batched (batch 2) with diffaccel's FLOPs counter, and sums the modules
TextCache hooks (the adapter's ``text_modules``): what it saves at every step after the first.
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import diffusers
import torch

from diffaccel.flops import count_flops
from diffaccel.pipelines import detect

CONFIGS = Path(__file__).resolve().parent / "configs"

# (label, pipeline class, model class, config file, denoiser keyword arguments for one call)
CASES = [
    ("SD1.5 512 px, 77 text tokens", "StableDiffusionPipeline", "UNet2DConditionModel", "sd15_unet.json",
     lambda: dict(sample=torch.empty(2, 4, 64, 64), timestep=torch.tensor(500), encoder_hidden_states=torch.empty(2, 77, 768))),
    ("PixArt-alpha 1024 px, 120 text tokens", "PixArtAlphaPipeline", "PixArtTransformer2DModel",
     "pixart_alpha_1024_transformer.json",
     lambda: dict(hidden_states=torch.empty(2, 4, 128, 128), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.empty(2, 120, 4096),
                  added_cond_kwargs={"resolution": torch.empty(2, 2), "aspect_ratio": torch.empty(2, 1)})),
    ("Wan2.1-1.3B 480x832, 81 frames, 512 text tokens", "WanPipeline", "WanTransformer3DModel",
     "wan21_t2v_1.3b_transformer.json",
     lambda: dict(hidden_states=torch.empty(2, 16, 21, 60, 104), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.empty(2, 512, 4096))),
]


def share(pipeline: str, model: str, config: str, call_kwargs) -> tuple[float, int, float]:
    cfg = json.loads((CONFIGS / config).read_text())
    with torch.device("meta"):
        denoiser = getattr(diffusers, model).from_config(cfg).eval()
        kwargs = call_kwargs()
    cls = getattr(diffusers, pipeline)
    components = {name: None for name in inspect.signature(cls.__init__).parameters if name != "self"}
    components["unet" if "UNet" in model else "transformer"] = denoiser
    components["scheduler"] = diffusers.DDIMScheduler(steps_offset=1, clip_sample=False)
    if "requires_safety_checker" in components:
        components["requires_safety_checker"] = False
    adapter = detect(cls(**components))
    total, per_module = count_flops(lambda: denoiser(**kwargs, return_dict=False))
    paths = adapter.text_modules()
    grid = adapter.grid_from_call((), kwargs)
    return sum(per_module.get(p, 0) for p in paths) / total, len(paths), grid.text_tokens / grid.num_visual


def main() -> int:
    print("| denoiser call (CFG batched) | text-only modules | share of the call's FLOPs TextCache reuses "
          "| text / visual tokens | presets cache (ratio >= 0.125) |")
    print("| --- | --- | --- | --- | --- |")
    for label, pipeline, model, config, kwargs in CASES:
        fraction, n, ratio = share(pipeline, model, config, kwargs)
        print(f"| {label} | {n} | {100 * fraction:.2f}% | {ratio:.3f} | {'yes' if ratio >= 0.125 else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

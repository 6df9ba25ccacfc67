"""Image DiT family: PixArt-alpha/sigma, DiT, Stable Diffusion 3, Flux."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffaccel.families import Family

from .base import Adapter, TokenGrid, call_arg


def _text_len(args, kwargs, position=1) -> int:
    text = call_arg(args, kwargs, "encoder_hidden_states", position)
    return int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0


@dataclass
class _PatchDiT(Adapter):
    """DiTs that take an image latent (B, C, H, W) and patchify it with ``patch_size``."""

    family = Family.IMAGE_DIT

    def blocks(self):
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(self.denoiser.transformer_blocks)]

    def grid_from_call(self, args, kwargs):
        x = call_arg(args, kwargs, "hidden_states", 0)
        p = int(self.denoiser.config.patch_size)
        return TokenGrid(1, int(x.shape[-2]) // p, int(x.shape[-1]) // p, _text_len(args, kwargs))


@dataclass
class PixArtAdapter(_PatchDiT):
    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    text_projections = ("caption_projection",)
    attention_rules = ((r"transformer_blocks\.\d+\.attn1", "spatial"), (r"transformer_blocks\.\d+\.attn2", "cross"))


@dataclass
class DiTAdapter(_PatchDiT):
    pipelines = ("DiTPipeline",)
    batched_cfg_order = ("cond", "uncond")  # class labels are cat([labels, null])
    attention_rules = ((r"transformer_blocks\.\d+\.attn1", "spatial"),)

    def grid_from_call(self, args, kwargs):
        x = call_arg(args, kwargs, "hidden_states", 0)
        p = int(self.denoiser.config.patch_size)
        return TokenGrid(1, int(x.shape[-2]) // p, int(x.shape[-1]) // p, 0)


@dataclass
class SD3Adapter(_PatchDiT):
    pipelines = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
    # JointAttnProcessor concatenates the text after the image tokens; SD3.5's attn2 is image-only.
    attention_rules = ((r"transformer_blocks\.\d+\.attn", "joint"), (r"transformer_blocks\.\d+\.attn2", "spatial"))
    text_position = "last"
    block_outputs = ("encoder_hidden_states", "hidden_states")
    text_projections = ("context_embedder",)


@dataclass
class FluxAdapter(Adapter):
    family = Family.IMAGE_DIT
    pipelines = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    cfg_mode: str = "separate"  # true CFG runs the negative prompt as a second call
    timestep_scale = 1.0  # the pipeline passes sigma (t / 1000) as the timestep
    block_outputs = ("encoder_hidden_states", "hidden_states")
    text_projections = ("context_embedder",)
    attention_rules = (
        (r"transformer_blocks\.\d+\.attn", "joint"),
        (r"single_transformer_blocks\.\d+\.attn", "joint"),
    )

    def blocks(self):
        tr = self.denoiser
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(tr.transformer_blocks)] + [
            (f"single_transformer_blocks.{i}", b) for i, b in enumerate(tr.single_transformer_blocks)
        ]

    def grid_from_call(self, args, kwargs):
        ids = kwargs.get("img_ids")
        x = call_arg(args, kwargs, "hidden_states", 0)
        if isinstance(ids, torch.Tensor) and ids.shape[0] == x.shape[1]:
            # Packed latents carry their (0, row, col) coordinates in img_ids.
            h, w = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
        else:
            h, w = 1, int(x.shape[1])
        return TokenGrid(1, h, w, _text_len(args, kwargs))

"""U-Net family: Stable Diffusion 1.x/2.x and SDXL, text-to-image, img2img and inpaint."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from diffaccel.families import Family

from .base import Adapter, AttentionInfo, SkipBranch, TokenGrid, call_arg


@dataclass
class UNetAdapter(Adapter):
    family = Family.UNET
    pipelines = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    denoiser_attr: str = "unet"

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    def blocks(self):
        unet = self.unet
        out = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            out.append(("mid_block", unet.mid_block))
        out += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
        return out

    def level_downsample(self) -> dict[str, int]:
        """Spatial reduction (vs the latent) of the features each block works on."""
        factors, factor = {}, 1
        for i, block in enumerate(self.unet.down_blocks):
            factors[f"down_blocks.{i}"] = factor
            if getattr(block, "downsamplers", None):
                factor *= 2
        factors["mid_block"] = factor
        for i, block in enumerate(self.unet.up_blocks):
            factors[f"up_blocks.{i}"] = factor
            if getattr(block, "upsamplers", None):
                factor //= 2
        return factors

    def _classify_attention(self):
        levels = self.level_downsample()
        block_index = {name: i for i, (name, _) in enumerate(self.blocks())}
        out = []
        for name, module in self.unet.named_modules():
            if not _is_attention(module):
                continue
            block = ".".join(name.split(".")[:2]) if not name.startswith("mid_block") else "mid_block"
            kind = "cross" if module.is_cross_attention else "spatial"
            out.append(AttentionInfo(name, module, kind, block_index[block], levels[block]))
        return out

    def skip_branches(self):
        # DeepCache numbering: skip branch b -> down block b // 3, layer b % 3, where layers are the
        # block's resnets followed by its downsampler.
        branches = []
        n_up = len(self.unet.up_blocks)
        for i, block in enumerate(self.unet.down_blocks):
            layers = len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)
            for layer in range(min(layers, 3)):
                up = self.unet.up_blocks[n_up - 1 - i]
                up_layer = len(up.resnets) - 1 - layer
                branches.append(SkipBranch(i * 3 + layer, i, layer, n_up - 1 - i, max(up_layer, 0)))
        return branches

    def grid_from_call(self, args, kwargs):
        sample = call_arg(args, kwargs, "sample", 0)
        text = call_arg(args, kwargs, "encoder_hidden_states", 2)
        n_text = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.dim() == 3 else 0
        return TokenGrid(1, int(sample.shape[-2]), int(sample.shape[-1]), n_text)


def _is_attention(module: torch.nn.Module) -> bool:
    # diffusers' Attention and the newer AttentionModuleMixin classes all carry a processor.
    return hasattr(module, "processor") and hasattr(module, "to_q") and hasattr(module, "is_cross_attention")

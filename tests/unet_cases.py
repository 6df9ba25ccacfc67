"""A slightly deeper tiny SD pipeline than tiny_pipes' (3 levels, 2 layers per block), so
every DeepCache branch kind (resnet layer, downsampler, whole block) and tomesd's
max_downsample levels exist; and explicit per-item inputs for batch-vs-alone checks."""
from __future__ import annotations

import diffusers as D
import torch

from tiny_pipes import build

LATENT = 16  # the tiny VAE does not downsample: 16x16 pixels -> 16x16 latent tokens at level 0


def deep_sd(scheduler=None, dtype=torch.float32):
    torch.manual_seed(0)
    unet = D.UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=2, sample_size=LATENT, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    pipe = build("sd")
    pipe.register_modules(unet=unet.eval())
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    return pipe.to(dtype)


def item_inputs(seed: int, dtype=torch.float32) -> dict:
    """Latents and prompt embeddings of one image, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 4, LATENT, LATENT, generator=g).to(dtype),
            "prompt_embeds": torch.randn(1, 8, 16, generator=g).to(dtype),
            "negative_prompt_embeds": torch.randn(1, 8, 16, generator=g).to(dtype)}


def call(pipe, items: list[dict], steps: int = 6, guidance: float = 4.0) -> torch.Tensor:
    """Generate all ``items`` in one batched call (latents out)."""
    batched = {k: torch.cat([it[k] for it in items]) for k in items[0]}
    return pipe(**batched, num_inference_steps=steps, guidance_scale=guidance, height=LATENT, width=LATENT,
                output_type="latent").images

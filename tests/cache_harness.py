"""A PixArt denoising loop that runs CFG either batched or as two separate calls.

The caching methods promise the same result for both forms (Wan, Flux true-CFG and
HunyuanVideo call the denoiser once per branch; PixArt, SD3 and CogVideoX batch the branches).
Real pipelines of the two kinds are different models, so the tests drive one tiny PixArt
transformer both ways inside a diffaccel call scope, with fixed latents and embeddings.
"""
from __future__ import annotations

import torch
import diffusers as D

import tiny_pipes
from diffaccel.api import session_of


def pipe_for_harness():
    pipe = tiny_pipes.build("pixart")
    pipe.scheduler = D.DDIMScheduler()  # deterministic, one model call per step
    return pipe


def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    cond = torch.randn(batch, tiny_pipes.TXT, 16, generator=g)
    uncond = torch.randn(batch, tiny_pipes.TXT, 16, generator=g)
    return latents, cond, uncond


def denoise(pipe, latents, cond, uncond, separate: bool, steps: int = 10, guidance: float = 4.0, record=None):
    """Run ``steps`` DDIM steps with CFG; returns the final latents.

    ``record`` (a list) receives (uncond prediction, cond prediction) of every step.
    """
    session = session_of(pipe)
    if session is not None:
        session.adapter.cfg_mode = "separate" if separate else "batched"
    scheduler, transformer = pipe.scheduler, pipe.transformer
    extra = dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)
    scope = session.pipeline_call() if session is not None else _nothing()
    with torch.no_grad(), scope:
        scheduler.set_timesteps(steps)
        x = latents.clone()
        for t in scheduler.timesteps:
            tt = t.expand(x.shape[0])
            if separate:  # Wan order: conditional call first, then unconditional
                c = transformer(x, encoder_hidden_states=cond, timestep=tt, **extra)[0][:, :4]
                u = transformer(x, encoder_hidden_states=uncond, timestep=tt, **extra)[0][:, :4]
            else:
                both = transformer(torch.cat([x, x]), encoder_hidden_states=torch.cat([uncond, cond]),
                                   timestep=torch.cat([tt, tt]), **extra)[0][:, :4]
                u, c = both.chunk(2)
            if record is not None:
                record.append((u, c))
            x = scheduler.step(u + guidance * (c - u), t, x).prev_sample
    return x


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

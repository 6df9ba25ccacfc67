"""FasterCache: attention reuse with extrapolation, and CFG-Cache for the unconditional half.

Two savings (Lv et al., "FasterCache", 2024):

* **Attention reuse.** Self-attention outputs (spatial, temporal, joint) are computed every
  ``attention_interval`` steps inside ``attention_range``; in between, the output is extended
  from the last two computed ones, ``A_t = A_1 + w (t - s_1)/(s_1 - s_2) (A_1 - A_2)``, per CFG
  half, so attention is reused whether or not the unconditional half runs.
* **CFG-Cache.** Inside ``cfg_range`` the unconditional half runs only every ``cfg_interval``
  steps. On a full step the difference ``D = uncond - cond`` of the denoiser outputs is split
  into low and high spatial frequencies (circular low-pass of radius min(H, W) // 5 in fft2
  space). On the other steps only the conditional half runs and
  ``uncond = cond + a_lo D_lo + a_hi D_hi``, with a_lo = ``alpha_low`` inside
  ``low_freq_range`` (early) and a_hi = ``alpha_high`` inside ``high_freq_range`` (late), 1
  elsewhere. Because the fft is linear this equals the paper's rebuild
  ``ifft(a_lo dLF + LF_c + a_hi dHF + HF_c)`` but needs no fft on the skipped steps. The stored
  difference is weighted once per use, never compounded. Pipelines that run CFG as separate
  calls (Wan, Flux true-CFG, HunyuanVideo) get their unconditional call answered from the
  conditional one.

Ranges are normalised times (1 = noise), the same for every step count and for sigma-based
schedules.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.FasterCache(attention_interval=2, cfg_interval=5)])
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffaccel.families import Capability
from diffaccel.methods.base import Installed, Method, hook_forward, register
from diffaccel.methods.cache_common import AttentionReuse, CfgHalves
from diffaccel.validate import fraction, positive_int, time_range

SELF_ATTENTION_KINDS = ("spatial", "temporal", "joint")


@register
@dataclass(frozen=True)
class FasterCache(Method):
    """FasterCache for image and video DiTs.

    Attributes:
        attention_interval: compute self-attention every N steps inside ``attention_range``
            (1 = no attention reuse).
        attention_range: (low, high) normalised times where attention may be reused.
        extrapolation: w in [0, 1], the share of the linear trend of the last two computed
            attention outputs added when reusing (0 = plain reuse).
        cfg_interval: compute the unconditional half every N steps inside ``cfg_range``
            (1 = CFG-Cache off).
        cfg_range: (low, high) normalised times where the unconditional half may be rebuilt.
        alpha_low / alpha_high: weights of the low / high frequency part of the stored
            uncond - cond difference, applied inside ``low_freq_range`` / ``high_freq_range``.
    """

    name: ClassVar[str] = "faster_cache"
    requires: ClassVar[Capability] = Capability.ATTENTION_REUSE

    attention_interval: int = 2
    attention_range: tuple[float, float] = (0.0, 0.7)
    extrapolation: float = 0.5
    cfg_interval: int = 5
    cfg_range: tuple[float, float] = (0.0, 0.65)
    alpha_low: float = 1.1
    alpha_high: float = 1.1
    low_freq_range: tuple[float, float] = (0.1, 0.9)
    high_freq_range: tuple[float, float] = (0.0, 0.3)

    def validate(self) -> None:
        positive_int(self.attention_interval, "FasterCache(attention_interval=...)", "Use 1 to turn attention reuse off.")
        positive_int(self.cfg_interval, "FasterCache(cfg_interval=...)", "Use 1 to turn CFG-Cache off.")
        fraction(self.extrapolation, "FasterCache(extrapolation=...)", hint="0 repeats the last attention output, 0.5 is the usual.")
        for what in ("attention_range", "cfg_range", "low_freq_range", "high_freq_range"):
            time_range(getattr(self, what), f"FasterCache({what}=...)")
        for what in ("alpha_low", "alpha_high"):
            fraction(getattr(self, what), f"FasterCache({what}=...)", 0.0, 4.0, hint="1 keeps the stored difference as is; 1.1 is the usual.")

    def apply(self, session) -> Installed:
        self.validate()
        self.check_family(session.adapter.family)
        return FasterCacheInstalled(self, session)


class FasterCacheInstalled(Installed):
    """Attention-reuse hooks, and a hook on the whole denoiser for CFG-Cache."""

    def __init__(self, config: FasterCache, session):
        super().__init__(config, session)
        self.hooks = []
        if config.attention_interval > 1:
            self.hooks = [
                AttentionReuse(self, info, config.attention_interval, tuple(config.attention_range), config.extrapolation)
                for info in session.adapter.attention_modules()
                if info.kind in SELF_ATTENTION_KINDS
            ]
        self.cfg = CfgHalves(self)
        if config.cfg_interval > 1:
            hook_forward(self, session.adapter.denoiser, self._denoiser_forward, "diffaccel_faster_cache_cfg")
        self.reset_cache()

    def reset_cache(self) -> None:
        for hook in getattr(self, "hooks", []):
            hook.reset()
        self.delta: tuple[torch.Tensor, torch.Tensor] | None = None  # (low, high) parts of uncond - cond
        self.uncond_step: int | None = None  # step of the last computed unconditional output
        self.cfg.reset()

    # ---- CFG-Cache at the denoiser -----------------------------------------------------
    def _denoiser_forward(self, original, *args, **kwargs):
        mode = self._cfg_mode()
        if mode == "rebuild":  # separate CFG: answer the unconditional call without running it
            return self.cfg.answer(self._rebuilt_uncond)
        if mode == "cond_only":  # batched CFG: run the conditional half only
            return self.cfg.run_cond_only(original, args, kwargs, self._rebuilt_uncond)
        out = original(*args, **kwargs)
        self._after_full(out)
        return out

    @torch.compiler.disable
    def _cfg_mode(self) -> str:
        config, ctx = self.config, self.session.ctx
        if not ctx.active:
            return "run"
        lo, hi = config.cfg_range
        may_skip = (
            ctx.t_norm is not None
            and lo < ctx.t_norm < hi
            and self.delta is not None
            and self.uncond_step is not None
            and ctx.step - self.uncond_step < config.cfg_interval
        )
        if ctx.cfg.batched:
            return "cond_only" if may_skip else "run"
        if may_skip and self.cfg.can_answer(ctx):
            return "rebuild"
        return "run"

    def _weights(self) -> tuple[float, float]:
        t, config = self.session.ctx.t_norm, self.config
        a_lo = config.alpha_low if config.low_freq_range[0] < t < config.low_freq_range[1] else 1.0
        a_hi = config.alpha_high if config.high_freq_range[0] < t < config.high_freq_range[1] else 1.0
        return a_lo, a_hi

    def _rebuilt_uncond(self, cond: torch.Tensor) -> torch.Tensor:
        a_lo, a_hi = self._weights()
        low, high = self.delta
        self.count("cfg_reused")
        return cond + (a_lo * low + a_hi * high).to(cond.dtype)

    @torch.compiler.disable
    def _after_full(self, out) -> None:
        self.cfg.after_run(out, self._store_delta)

    def _store_delta(self, uncond: torch.Tensor, cond: torch.Tensor) -> None:
        delta = (uncond - cond).float()
        low = _low_pass(delta, self.session.ctx.grid)
        self.delta = (low, delta - low)
        self.uncond_step = self.session.ctx.step
        self.count("cfg_computed")


def _low_pass(x: torch.Tensor, grid) -> torch.Tensor:
    """The low spatial frequencies of a denoiser output (circular mask, radius min(H, W) // 5).

    Outputs laid out with (H, W) last (image and most video DiTs) are filtered directly; packed
    token outputs (B, N, C) (Flux, LTX) are unpacked with the call's patch grid first. If the
    layout cannot be recovered the whole difference counts as low frequency.
    """
    unpack = None
    if x.dim() == 3 and grid is not None and grid.num_visual == x.shape[1]:
        b, _, c = x.shape
        x = x.reshape(b, grid.frames, grid.height, grid.width, c).permute(0, 4, 1, 2, 3)
        unpack = (b, c)
    elif x.dim() < 4:
        return x
    h, w = x.shape[-2:]
    low = torch.fft.ifft2(torch.fft.fft2(x) * _mask(h, w, str(x.device))).real
    if unpack is not None:
        b, c = unpack
        low = low.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
    return low


@functools.lru_cache(maxsize=16)
def _mask(h: int, w: int, device: str) -> torch.Tensor:
    # Signed frequency indices equal fftshift'ed positions minus the centre, so this is the
    # centred disc of the paper without shifting the spectrum back and forth.
    fy = torch.fft.fftfreq(h) * h
    fx = torch.fft.fftfreq(w) * w
    radius = min(h, w) // 5
    return ((fy[:, None] ** 2 + fx[None, :] ** 2) <= radius**2).to(device)

"""CfgCache: run the unconditional half of classifier-free guidance on some steps only.

With CFG every step runs the denoiser on two halves, conditional and unconditional. Their
difference ``D = uncond - cond`` changes slowly along the trajectory (FasterCache's observation),
so on most steps only the conditional half runs and the unconditional output is rebuilt as
``cond + D`` with ``D`` from the last step that ran both. Which steps run both follows DeepCache's
full-step rule (every ``interval`` steps, and wherever one difference would otherwise stand for
more than ``max_span`` of the trajectory), or with ``follow_full_steps`` the full steps of a DeepCache
in the same list: then both refresh at the same steps and DeepCache's cached steps run the shallow
path of the conditional rows alone (a half DeepCache finds without deep features of the last full
step is computed in full, so any other combination stays correct, only slower).
Below normalised time ``min_time`` the unconditional half does not run again.

Pipelines that batch CFG (SD, SDXL, PixArt) run the conditional rows alone; pipelines that call
the denoiser once per half (Wan, HunyuanVideo) get the unconditional call answered without
running it, when it comes after the conditional one. Without CFG (guidance_scale <= 1, a
guidance-distilled model) there is nothing to skip; ``stats`` says so.

Example::

    pipe = diffaccel.accelerate(pipe, methods=[diffaccel.DeepCache(interval=4), diffaccel.CfgCache(follow_full_steps=True)])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffaccel.methods.base import Installed, Method, hook_forward, register
from diffaccel.methods.cache_common import CfgHalves
from diffaccel.methods.deepcache import DeepCache, FullStepRule
from diffaccel.validate import fraction, positive_int

HOOK_NAME = "diffaccel_cfg_cache"


@register
@dataclass(frozen=True)
class CfgCache(Method):
    """Reuse the CFG difference ``uncond - cond`` between the steps that run both halves.

    Attributes:
        interval: both halves run every N steps (1: every step, the output is the pipeline's own).
        max_span: both halves also run where the difference of the last such step would stand for
            more than this share of the trajectory (normalised time, as ``DeepCache.max_span``).
        min_time: below this normalised time (1 = noise) the unconditional half no longer runs.
        follow_full_steps: run both halves exactly where a DeepCache in the same method list computes a
            full step, whatever its schedule (uniform, non-uniform, listed, planned per call); ``interval``
            and ``max_span`` are then unused.
    """

    name: ClassVar[str] = "cfg_cache"

    interval: int = 2
    max_span: float = 1.0
    min_time: float = 0.0
    follow_full_steps: bool = False

    def validate(self) -> None:
        positive_int(self.interval, "CfgCache(interval=...)", "Use 1 to run both CFG halves at every step.")
        fraction(self.max_span, "CfgCache(max_span=...)", hint="1 puts no bound on the span.")
        fraction(self.min_time, "CfgCache(min_time=...)", hint="0 runs the unconditional half to the end.")
        if not isinstance(self.follow_full_steps, bool):
            raise ValueError(f"CfgCache(follow_full_steps={self.follow_full_steps!r}) must be True or False.")

    def apply(self, session) -> "CfgCacheInstalled":
        self.validate()
        self.check_family(session.adapter.family)
        return CfgCacheInstalled(self, session)


class CfgCacheInstalled(Installed):
    """A hook on the whole denoiser: run both halves, the conditional one alone, or answer the call."""

    def __init__(self, config: CfgCache, session):
        super().__init__(config, session)
        self.cfg = CfgHalves(self)
        hook_forward(self, session.adapter.denoiser, self._denoiser_forward, HOOK_NAME)
        self.reset_cache()

    def reset_cache(self) -> None:
        self.delta: torch.Tensor | None = None  # uncond - cond of the last step that ran both
        self.both: dict[int, bool] = {}  # step -> both halves run, so every call of a step agrees
        self.rule: FullStepRule | None = None
        self.cfg.reset()

    def _denoiser_forward(self, original, *args, **kwargs):
        mode = self._mode()
        if mode == "answer":
            return self.cfg.answer(self._rebuilt)
        if mode == "cond_only":
            return self.cfg.run_cond_only(original, args, kwargs, self._rebuilt)
        out = original(*args, **kwargs)
        self.cfg.after_run(out, self._keep)
        return out

    @torch.compiler.disable
    def _mode(self) -> str:
        ctx = self.session.ctx
        if not ctx.active:
            return "run"
        self.count("calls")
        if self._runs_both(ctx) or self.delta is None:
            return "run"
        mode = "cond_only" if ctx.cfg.batched else "answer" if self.cfg.can_answer(ctx) else "run"
        if mode != "run":
            self.count("uncond_skipped")
        return mode

    def _runs_both(self, ctx) -> bool:
        if ctx.step not in self.both:
            config = self.call_config()
            late = ctx.t_norm is not None and ctx.t_norm < config.min_time and self.delta is not None
            self.both[ctx.step] = self._scheduled(ctx, config) and not late
        return self.both[ctx.step]

    def _scheduled(self, ctx, config: CfgCache) -> bool:
        """Whether the schedule (DeepCache's full steps, or CfgCache's own rule) runs both halves now."""
        if config.follow_full_steps:
            if ctx.full_step is None:
                raise ValueError("CfgCache(follow_full_steps=True) found no DeepCache deciding the full steps of this "
                                 "call: add DeepCache to the methods, or give CfgCache an interval instead.")
            return ctx.full_step
        if self.rule is None:  # DeepCache's rule, so that equal settings give equal steps
            self.rule = FullStepRule(DeepCache(interval=config.interval, max_span=config.max_span),
                                     int(ctx.num_steps or 0) or None)
        return self.rule.full(ctx.step, ctx.t_norm)

    def _rebuilt(self, cond: torch.Tensor) -> torch.Tensor:
        return cond + self.delta.to(cond.dtype)

    def _keep(self, uncond: torch.Tensor, cond: torch.Tensor) -> None:
        self.delta = (uncond - cond).float()
        self.count("both_run")

    def stats(self) -> dict:
        out = dict(self.counters)
        out["skipped_modules"] = dict(out.get("skipped_modules", {}))
        if out.get("calls") and not out.get("both_run"):
            out["why"] = "the pipeline ran without classifier-free guidance (guidance_scale <= 1?): nothing to skip"
        return out

"""Per-call state: which step and branch each denoiser call belongs to.

A :class:`Session` lives on an accelerated pipeline. At the start of every pipeline call it
resets itself and every installed method, so no state crosses calls. During the call it
follows the denoising loop:

* **step** — index of the loop iteration, counted by wrapping ``scheduler.step``: every
  denoiser call between two scheduler steps belongs to the same step. Schedulers with
  repeated timesteps (Heun, DPM2) simply have more loop iterations, each its own step.
* **branch** — index of the denoiser call *within* its step. Pipelines that batch CFG make
  one call per step (branch 0 holds both halves); pipelines that run CFG as separate calls
  (Wan, Flux true-CFG, HunyuanVideo) make calls 0 and 1. Methods keep state per branch, so a
  cached conditional output never replaces an unconditional one.
  With batched CFG the batch is [unconditional, conditional] halves (diffusers' order);
  ``cfg_active(pipe)`` in :mod:`diffaccel.state` says whether CFG is on for this call.
* **t_norm** — the call's timestep normalised to [0, 1] (1 = pure noise): t / 1000 for
  DDPM-style and flow-matching pipelines that pass t in [0, 1000], sigma for Flux.

Outside a pipeline call (a user calling ``pipe.unet`` directly), ``ctx.active`` is False and
methods must compute normally.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.pipelines.base import Adapter, TokenGrid


@dataclass
class CallContext:
    active: bool = False
    step: int = 0
    branch: int = 0
    calls_in_step: int = 0
    denoiser_calls: int = 0
    timestep: float | None = None
    t_norm: float | None = None
    num_steps: int | None = None
    grid: TokenGrid | None = None
    batch_size: int = 0
    # Denoiser calls made in the previous step: 2 means CFG runs as separate calls
    # (branch 0 = conditional, branch 1 = unconditional in Wan, Flux, HunyuanVideo).
    prev_calls_in_step: int = 0
    # (step, branch, t_norm) of every denoiser call, for stats and tests.
    trace: list[tuple[int, int, float | None]] = field(default_factory=list)


def _timestep_value(t: Any) -> float | None:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0].item()) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class Session:
    """The acceleration attached to one pipeline: adapter, installed methods, call state."""

    def __init__(self, pipe, adapter: Adapter):
        self.pipe = pipe
        self.adapter = adapter
        self.installed: list = []  # Installed handles, in application order
        self.ctx = CallContext()
        self.last_stats: dict | None = None
        self._probe: tuple[tuple, dict] | None = None  # inputs of the last call's first denoiser call
        self._costs: dict[tuple, dict[str, int]] = {}  # input signature -> FLOPs per module path
        self._hook = adapter.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)

    # ---- pipeline call ---------------------------------------------------------------
    @contextlib.contextmanager
    def pipeline_call(self):
        """Wraps one pipeline ``__call__``: fresh state, scheduler steps counted."""
        self.ctx = CallContext(active=True)
        for handle in self.installed:
            handle.reset()
        scheduler = self.pipe.scheduler
        had_own_step = "step" in vars(scheduler)
        original_step = scheduler.step

        def counted_step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            self.ctx.step += 1
            self.ctx.prev_calls_in_step = self.ctx.calls_in_step
            self.ctx.calls_in_step = 0
            return out

        scheduler.step = counted_step
        try:
            yield self.ctx
        finally:
            if had_own_step:
                scheduler.step = original_step
            else:
                del scheduler.step
            self.ctx.active = False
            self.last_stats = self._collect_stats()
            # Cached activations are useless after the call; free them now.
            for handle in self.installed:
                handle.reset()

    def _on_denoiser_call(self, module, args, kwargs):
        ctx = self.ctx
        if not ctx.active:
            return None
        ctx.branch = ctx.calls_in_step
        ctx.calls_in_step += 1
        ctx.denoiser_calls += 1
        ctx.timestep = _timestep_value(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        ctx.t_norm = None if ctx.timestep is None else self.adapter.normalised_time(ctx.timestep)
        if ctx.num_steps is None:
            timesteps = getattr(self.pipe.scheduler, "timesteps", None)
            ctx.num_steps = getattr(self.pipe, "_num_timesteps", None) or (len(timesteps) if timesteps is not None else None)
        try:
            ctx.grid = self.adapter.grid_from_call(args, kwargs)
        except Exception:  # layout is only needed by attention methods; never break a call for it
            ctx.grid = None
        sample = args[0] if args else next(iter(kwargs.values()), None)
        ctx.batch_size = int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0
        ctx.trace.append((ctx.step, ctx.branch, ctx.t_norm))
        if ctx.denoiser_calls == 1:
            self._probe = (args, dict(kwargs))
        return None

    def module_costs(self) -> dict[str, int] | None:
        """FLOPs per denoiser module path for the last call's input shapes (one counted forward)."""
        from diffaccel.flops import count_flops

        if self._probe is None:
            return None
        args, kwargs = self._probe
        key = _signature((args, kwargs))
        if key not in self._costs:
            was_active, self.ctx.active = self.ctx.active, False  # methods pass through: full cost
            try:
                _, per_module = count_flops(self.adapter.denoiser, *args, **kwargs)
            finally:
                self.ctx.active = was_active
            self._costs[key] = per_module
        return self._costs[key]

    # ---- lifecycle -------------------------------------------------------------------
    def remove(self) -> None:
        for handle in reversed(self.installed):
            handle.remove()
        self.installed = []
        self._hook.remove()

    def _collect_stats(self) -> dict:
        ctx = self.ctx
        return {
            "pipeline": self.adapter.name,
            "family": self.adapter.family,
            "denoiser_calls": ctx.denoiser_calls,
            "steps": ctx.step,
            "branches_per_step": max((b for _, b, _ in ctx.trace), default=-1) + 1,
            "methods": {h.config.name: h.stats() for h in self.installed},
        }


def _signature(obj) -> tuple:
    """Hashable summary of the shapes/dtypes in nested call arguments."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), str(obj.dtype), obj.device.type)
    if isinstance(obj, (list, tuple)):
        return tuple(_signature(o) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in sorted(obj.items()))
    return (type(obj).__name__,)


def cfg_active(pipe) -> bool | None:
    """Whether the running pipeline call uses classifier-free guidance (None if it cannot tell)."""
    value = getattr(type(pipe), "do_classifier_free_guidance", None)
    if value is None:
        return None
    try:
        return bool(pipe.do_classifier_free_guidance)
    except Exception:  # property reads an attribute set only inside __call__
        return None

"""The session on an accelerated pipeline, and the per-call context every method reads.

A :class:`Session` lives on an accelerated pipeline (:func:`attach` / :func:`detach`). At the
start of every pipeline call it resets itself and every installed handle, so no state crosses
calls. During the call it follows the denoising loop in a :class:`CallContext`:

* **step**: index of the loop iteration, counted by wrapping ``scheduler.step``: every
  denoiser call between two scheduler steps belongs to the same step. Schedulers with
  repeated timesteps (Heun, DPM2) simply have more loop iterations, each its own step.
* **call_index**: index of the denoiser call *within* its step. Pipelines that batch CFG make
  one call per step; pipelines that run CFG as separate calls (Wan, Flux true-CFG,
  HunyuanVideo) make calls 0 (conditional) and 1 (unconditional).
* **cfg**: the :class:`CfgLayout` of the call: which CFG halves ("cond", "uncond") its rows
  hold, in row order. Methods keep their caches per CFG half, never per call, so batched and
  separate CFG give the same result and a half's cache never stands in for the other's.
* **t_norm**: the call's timestep normalised to [0, 1] (1 = pure noise): t / 1000 for
  DDPM-style and flow-matching pipelines that pass t in [0, 1000], sigma for Flux.

The session sets all of these once per denoiser call, in a forward pre-hook registered before
any method's. Outside a pipeline call (a user calling ``pipe.unet`` directly), ``ctx.active``
is False and methods must compute normally.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from diffaccel import compat
from diffaccel.distributed import check_context_parallel
from diffaccel.flops import count_flops, flops_saved_fraction
from diffaccel.pipelines.base import Adapter, TokenGrid

if TYPE_CHECKING:
    from diffaccel.hooks import Installed, ScheduleProvider
    from diffaccel.methods.base import Method

CFG_HALVES = ("cond", "uncond")


@dataclass(frozen=True)
class CfgLayout:
    """Which CFG halves a denoiser call holds.

    ``halves`` lists them in row order: both (``adapter.batched_cfg_order``) when the call batches
    CFG, else the one half the call stands for. ``batched`` says the pipeline batches CFG in this
    call, so a half is half of the rows (it stays True while CFG-Cache runs the conditional rows
    alone: the skipped half is still half of a full call's cost).
    """

    halves: tuple[str, ...]
    batched: bool = False
    uncond_dropped: bool = False

    @property
    def row_share(self) -> float:
        """Fraction of a full denoiser call one half stands for (FLOP statistics)."""
        return 0.5 if self.batched else 1.0


@dataclass
class CallContext:
    """State of the running pipeline call; the session updates it at every denoiser call."""

    active: bool = False
    step: int = 0
    call_index: int = 0
    calls_in_step: int = 0
    denoiser_calls: int = 0
    timestep: float | None = None
    t_norm: float | None = None
    num_steps: int | None = None
    grid: TokenGrid | None = None
    batch_size: int = 0
    cfg: CfgLayout = CfgLayout(("cond",))
    # Denoiser calls made in the previous step: 2 means CFG runs as separate calls.
    prev_calls_in_step: int = 0
    # (step, call_index, t_norm) of every denoiser call, for stats and tests.
    trace: list[tuple[int, int, float | None]] = field(default_factory=list)

    @contextlib.contextmanager
    def uncond_dropped(self) -> Iterator[None]:
        """Scope in which the running denoiser call holds its conditional rows only (CFG-Cache
        runs them alone and rebuilds the unconditional half)."""
        full = self.cfg
        self.cfg = dataclasses.replace(full, halves=("cond",), uncond_dropped=True)
        try:
            yield
        finally:
            self.cfg = full


@dataclass
class DenoiserInputs:
    """The arguments of one denoiser call."""

    args: tuple
    kwargs: dict[str, Any]


def _timestep_value(t: Any) -> float | None:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0].item()) if t.numel() else None
    if isinstance(t, (int, float)):
        return float(t)
    return None


class Session:
    """The acceleration attached to one pipeline: adapter, installed handles, call state."""

    def __init__(self, pipe, adapter: Adapter):
        self.pipe = pipe
        self.adapter = adapter
        self.installed: list[Installed] = []  # in application order
        self.providers: dict[str, ScheduleProvider] = {}  # method name -> per-call settings
        self.ctx = CallContext()
        self.last_stats: dict | None = None
        self.first_call: DenoiserInputs | None = None  # the running (or last) pipeline call's first denoiser call
        self._cfg_guess: bool | None = None  # per pipeline call, see _batched_cfg
        self._costs: dict[tuple, dict[str, int]] = {}  # input signature -> FLOPs per module path
        self._hook = adapter.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)

    # ---- pipeline call -----------------------------------------------------------------------
    @contextlib.contextmanager
    def pipeline_call(self) -> Iterator[CallContext]:
        """Wraps one pipeline ``__call__``: fresh state, scheduler steps counted."""
        check_context_parallel(self)  # diffusers' parallelism may have been enabled after accelerate
        self.ctx = CallContext(active=True)
        self._cfg_guess = None
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
        ctx.call_index = ctx.calls_in_step
        ctx.calls_in_step += 1
        ctx.denoiser_calls += 1
        ctx.timestep = _timestep_value(kwargs.get("timestep", args[1] if len(args) > 1 else None))
        ctx.t_norm = None if ctx.timestep is None else self.adapter.normalised_time(ctx.timestep)
        if ctx.num_steps is None:
            timesteps = getattr(self.pipe.scheduler, "timesteps", None)
            ctx.num_steps = compat.num_timesteps(self.pipe) or (len(timesteps) if timesteps is not None else None)
        try:
            ctx.grid = self.adapter.grid_from_call(args, kwargs)
        except Exception:  # layout is only needed by attention methods; never break a call for it
            ctx.grid = None
        sample = args[0] if args else next(iter(kwargs.values()), None)
        ctx.batch_size = int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0
        ctx.trace.append((ctx.step, ctx.call_index, ctx.t_norm))
        if ctx.denoiser_calls == 1:
            self.first_call = DenoiserInputs(args, dict(kwargs))
        ctx.cfg = self._cfg_layout()
        return None

    def _cfg_layout(self) -> CfgLayout:
        if self._batched_cfg():
            return CfgLayout(tuple(self.adapter.batched_cfg_order), batched=True)
        index = self.ctx.call_index
        return CfgLayout((CFG_HALVES[index] if index < len(CFG_HALVES) else f"call{index}",))

    def _batched_cfg(self) -> bool:
        """Whether the running denoiser call batches CFG as two halves."""
        if self.adapter.cfg_mode != "batched":
            return False
        known = cfg_active(self.pipe)
        if known is not None:
            return known
        # PixArt, CogVideoX and DiT decide CFG in a local variable. Their batched-CFG input is
        # torch.cat([latents] * 2): identical halves, which samples of one batch never are.
        if self._cfg_guess is None:
            self._cfg_guess = _identical_halves(self.first_call)
        return self._cfg_guess

    def module_costs(self) -> dict[str, int] | None:
        """FLOPs per denoiser module path for the last call's input shapes (one counted forward)."""
        if self.first_call is None:
            return None
        args, kwargs = self.first_call.args, self.first_call.kwargs
        key = _signature((args, kwargs))
        if key not in self._costs:
            was_active, self.ctx.active = self.ctx.active, False  # methods pass through: full cost
            try:
                _, per_module = count_flops(self.adapter.denoiser, *args, **kwargs)
            finally:
                self.ctx.active = was_active
            self._costs[key] = per_module
        return self._costs[key]

    # ---- lifecycle ---------------------------------------------------------------------------
    def install(self, configs: Iterable["Method"]) -> None:
        """Apply ``configs`` in order; on failure everything applied so far is removed."""
        try:
            for config in configs:
                self.installed.append(config.apply(self))
            check_context_parallel(self)
        except Exception:
            self.remove()
            raise
        finally:
            compat.invalidate_hook_caches(self.adapter.denoiser)

    def remove(self) -> None:
        for handle in reversed(self.installed):
            handle.remove()
        self.installed = []
        self.providers = {}
        self._hook.remove()
        compat.invalidate_hook_caches(self.adapter.denoiser)

    def stats(self) -> dict:
        """What the last pipeline call computed and reused (see ``diffaccel.stats``)."""
        if self.last_stats is None:
            return {"pipeline": self.adapter.name, "family": str(self.adapter.family), "denoiser_calls": 0,
                    "methods": {h.config.name: {} for h in self.installed}, "flops_saved_fraction": None,
                    "note": "no pipeline call yet"}
        if "flops_saved_fraction" not in self.last_stats:
            self.last_stats["flops_saved_fraction"] = flops_saved_fraction(self, self.last_stats["methods"])
        return dict(self.last_stats)

    def _collect_stats(self) -> dict:
        ctx = self.ctx
        return {
            "pipeline": self.adapter.name,
            "family": str(self.adapter.family),
            "denoiser_calls": ctx.denoiser_calls,
            "steps": ctx.step,
            "branches_per_step": max((i for _, i, _ in ctx.trace), default=-1) + 1,
            "methods": {h.config.name: h.stats() for h in self.installed},
        }


def _identical_halves(inputs: DenoiserInputs | None) -> bool:
    if inputs is None:
        return False
    x = inputs.kwargs.get("hidden_states", inputs.args[0] if inputs.args else None)
    if not isinstance(x, torch.Tensor) or x.shape[0] % 2:
        return False
    half = x.shape[0] // 2
    return bool(torch.equal(x[:half], x[half:]))


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


# ---- attaching a session to a pipeline ---------------------------------------------------------
_ATTR = "_diffaccel_session"


@functools.cache
def _accelerated_class(cls: type) -> type:
    """A subclass of the pipeline class whose ``__call__`` runs inside the session's call scope.

    Python looks special methods up on the type, so wrapping ``__call__`` needs a subclass; the
    instance's ``__class__`` is swapped to it and back. It keeps the original name so
    ``save_pretrained`` writes the original class into model_index.json.
    """

    def __call__(self, *args, **kwargs):
        session: Session | None = getattr(self, _ATTR, None)
        if session is None:
            return cls.__call__(self, *args, **kwargs)
        with session.pipeline_call():
            return cls.__call__(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "_diffaccel_base": cls})


def attach(pipe, adapter: Adapter, configs: Iterable["Method"]) -> Session:
    """Install ``configs`` (validated already) on ``pipe``, replacing any previous session."""
    detach(pipe)  # replace, never stack
    session = Session(pipe, adapter)
    session.install(configs)
    setattr(pipe, _ATTR, session)
    pipe.__class__ = _accelerated_class(type(pipe))
    return session


def detach(pipe) -> None:
    """Remove the session from ``pipe``, restoring its class and modules exactly."""
    session: Session | None = getattr(pipe, _ATTR, None)
    if session is not None:
        session.remove()
        delattr(pipe, _ATTR)
    base = getattr(type(pipe), "_diffaccel_base", None)
    if base is not None and type(pipe).__dict__.get("_diffaccel_base") is base:
        pipe.__class__ = base


def session_of(pipe) -> Session | None:
    """The session on an accelerated ``pipe`` (None when it is not accelerated)."""
    return getattr(pipe, _ATTR, None)

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
is False and methods must compute normally; it is also False in every thread other than the one
running the pipeline call, so a denoiser call from another thread never sees the call's state.

Threads: calls of one accelerated pipeline are serialised by a per-pipeline lock (a second
thread waits until the first call returns), so every call starts from clean state and equals the
same call made alone. Different pipelines (with their own denoisers) run in parallel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

from diffaccel import compat
from diffaccel.compat import check_no_foreign_cache, foreign_cache_hooks, not_picklable_message
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

    running: bool = False
    owner: int | None = None  # thread running the call: ``active`` is False in every other thread
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
    scheduler: Any = None  # the scheduler whose steps this call counts
    # Whether a step-level cache (DeepCache) computes this denoiser call's step in full; None: none decides.
    full_step: bool | None = None
    # (step, call_index, t_norm) of every denoiser call, for stats and tests.
    trace: list[tuple[int, int, float | None]] = field(default_factory=list)

    def step_done(self) -> None:
        self.step += 1
        self.prev_calls_in_step = self.calls_in_step
        self.calls_in_step = 0

    @property
    def active(self) -> bool:
        """True inside a pipeline call, in the thread that runs it."""
        return self.running and (self.owner is None or self.owner == threading.get_ident())

    @active.setter
    def active(self, value: bool) -> None:
        self.running = bool(value)

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
    """The acceleration attached to one pipeline: adapter, installed handles, call state.

    Nothing is hooked until :meth:`install`; ``configs`` are the method configs it installed (a
    copy of the pipeline or a later ``accelerate`` re-installs them)."""

    def __init__(self, pipe, adapter: Adapter):
        self.pipe = pipe
        self.denoiser = adapter.denoiser  # the module accelerated (adapter.denoiser reads the pipeline live)
        self.adapter = adapter
        self.configs: list[Method] = []
        self.installed: list[Installed] = []  # in application order
        self.providers: dict[str, ScheduleProvider] = {}  # method name -> per-call settings
        self.ctx = CallContext()
        self.last_stats: dict | None = None
        self.first_call: DenoiserInputs | None = None  # the running (or last) pipeline call's first denoiser call
        self._cfg_guess: bool | None = None  # per pipeline call, see _batched_cfg
        self._costs: dict[tuple, dict[str, int]] = {}  # input signature -> FLOPs per module path
        self._hook = None
        # Ranks whose decisions must agree (accelerate(process_group=...)); see diffaccel.distributed
        self.process_group = None
        # One call at a time: the handles keep the running call's caches (RLock: stats() may be
        # asked from a step callback inside the call).
        self.lock = threading.RLock()

    # ---- pickling and copying: the hooks hold this session -----------------------------------
    def __reduce_ex__(self, protocol):
        raise TypeError(not_picklable_message())

    def __deepcopy__(self, memo):
        raise TypeError(compat.not_copyable_message())

    def call_times(self) -> list[float]:
        """Normalised times (1 = noise) of the running call's denoising steps, from the scheduler's
        timesteps (the last ``num_steps`` of them: img2img starts part-way)."""
        timesteps = [float(t) for t in getattr(self.pipe.scheduler, "timesteps", [])]
        n = int(self.ctx.num_steps or len(timesteps))
        return [self.adapter.normalised_time(t) for t in timesteps[len(timesteps) - n:]]

    # ---- pipeline call -----------------------------------------------------------------------
    @contextlib.contextmanager
    def pipeline_call(self) -> Iterator[CallContext]:
        """Wraps one pipeline ``__call__``: fresh state, scheduler steps counted."""
        with self.lock:
            if self.ctx.active:
                raise RuntimeError("diffaccel: this accelerated pipeline was called from inside its own call (a step "
                                   "callback?); nested calls of one pipeline are not supported.")
            check_no_foreign_cache(self.adapter.denoiser, when="call")
            check_context_parallel(self)  # diffusers' parallelism may have been enabled after accelerate
            self.ctx = CallContext(running=True, owner=threading.get_ident())
            self._cfg_guess = None
            scheduler = self.pipe.scheduler
            try:
                for handle in self.installed:
                    handle.reset()
                with counting_steps(scheduler, self.ctx):
                    yield self.ctx
            finally:
                self.ctx.running = False
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
        ctx.full_step = None
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
        """FLOPs per denoiser module path for the last call's input shapes (one counted forward).

        None when they cannot be counted: the counting forward runs the denoiser outside any
        pipeline call, which other libraries' hooks on it may refuse; stats must never fail."""
        if self.first_call is None:
            return None
        args, kwargs = self.first_call.args, self.first_call.kwargs
        key = _signature((args, kwargs))
        if key not in self._costs:
            if foreign_cache_hooks(self.adapter.denoiser):
                return None
            was_active, self.ctx.active = self.ctx.active, False  # methods pass through: full cost
            try:
                _, per_module = count_flops(self.adapter.denoiser, *args, **kwargs)
            except Exception:  # noqa: BLE001 - an estimate only; stats says it is unknown
                return None
            finally:
                self.ctx.active = was_active
            self._costs[key] = per_module
        return self._costs[key]

    # ---- lifecycle ---------------------------------------------------------------------------
    def track(self, handle: "Installed") -> None:
        """Called by every handle before it changes the model, so a failed install undoes it too."""
        if handle not in self.installed:
            self.installed.append(handle)

    def install(self, configs: Iterable["Method"]) -> None:
        """Apply ``configs`` in order, all or nothing: on any failure, KeyboardInterrupt included,
        everything applied so far (the failing handle's own partial changes too) is removed."""
        denoiser = self.adapter.denoiser
        try:
            owner = getattr(denoiser, _ATTR, None)
            if owner is not None and owner is not self:
                raise ValueError(
                    f"This {type(denoiser).__name__} is already accelerated by another pipeline (pipelines made with "
                    "type(pipe)(**pipe.components) share their denoiser). Call diffaccel.disable() on that pipeline "
                    "first, or give this one its own denoiser (copy.deepcopy(pipe) makes an independent copy)."
                )
            check_no_foreign_cache(denoiser, when="accelerate")
            object.__setattr__(denoiser, _ATTR, self)
            self._hook = denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
            for config in configs:
                self.track(config.apply(self))
                self.configs.append(config)
            check_context_parallel(self)
        except BaseException:
            self.remove()
            raise
        finally:
            compat.invalidate_hook_caches(denoiser)

    def reinstall(self, configs: list["Method"]) -> None:
        """Install ``configs`` again after :meth:`remove` (the session object stays the same)."""
        self.configs = []
        self.install(configs)

    def remove(self) -> None:
        """Undo everything installed; every undo runs even if one fails (the first error is raised)."""
        errors = []
        for handle in reversed(self.installed):
            try:
                handle.remove()
            except BaseException as err:  # noqa: BLE001 - keep removing, then report
                errors.append(err)
        self.installed = []
        self.providers = {}
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        denoiser = self.adapter.denoiser
        if vars(denoiser).get(_ATTR) is self:
            object.__delattr__(denoiser, _ATTR)
        compat.invalidate_hook_caches(denoiser)
        if errors:
            raise errors[0]

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


# ---- counting scheduler steps ------------------------------------------------------------------
_THREAD = threading.local()  # .calls: the pipeline calls running in this thread, innermost last
_STEP_LOCK = threading.Lock()


class _CountedStep:
    """``scheduler.step`` while accelerated pipeline calls use the scheduler: after each step it
    advances the step of the call running in the calling thread (other threads' steps, e.g. a
    plain pipeline sharing the scheduler, are not counted). Installed once per scheduler however
    many calls use it, removed when the last one ends."""

    def __init__(self, scheduler, original, had_own: bool):
        self.scheduler, self.original, self.had_own, self.users = scheduler, original, had_own, 0

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        for ctx in reversed(getattr(_THREAD, "calls", ())):
            if ctx.scheduler is self.scheduler:
                ctx.step_done()
                break
        return out


@contextlib.contextmanager
def counting_steps(scheduler, ctx: CallContext) -> Iterator[None]:
    """Count ``scheduler``'s steps into ``ctx`` while the ``with`` block runs in this thread."""
    ctx.scheduler = scheduler
    with _STEP_LOCK:
        wrapper = vars(scheduler).get("step")
        if not isinstance(wrapper, _CountedStep):
            wrapper = _CountedStep(scheduler, scheduler.step, "step" in vars(scheduler))
            scheduler.step = wrapper
        wrapper.users += 1
    calls = _THREAD.__dict__.setdefault("calls", [])
    calls.append(ctx)
    try:
        yield
    finally:
        calls.remove(ctx)
        with _STEP_LOCK:
            wrapper.users -= 1
            if wrapper.users == 0 and vars(scheduler).get("step") is wrapper:
                if wrapper.had_own:
                    scheduler.step = wrapper.original
                else:
                    del scheduler.step


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


def denoiser_replaced(session: Session) -> str | None:
    """Why the acceleration no longer applies, when ``pipe.unet`` / ``pipe.transformer`` was
    replaced after accelerate (its hooks stay on the old module); None while it applies. A
    torch.compile wrapper of the accelerated module still runs its hooks, so it counts as it."""
    attr = session.adapter.denoiser_attr
    current = getattr(session.pipe, attr, None)
    if current is session.denoiser or getattr(current, "_orig_mod", None) is session.denoiser:
        return None
    return (f"diffaccel: pipe.{attr} was replaced after diffaccel.accelerate(pipe), so the acceleration no longer "
            f"applies to it: call diffaccel.accelerate(pipe, ...) again for the new {type(current).__name__}, or "
            "diffaccel.disable(pipe) to run it plain.")


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
    ``save_pretrained`` writes the original class into model_index.json. ``copy.deepcopy`` gives
    an independent accelerated copy; pickling is refused with a line saying to disable first.
    """

    def __call__(self, *args, **kwargs):
        session: Session | None = session_of(self)
        if session is None:
            return cls.__call__(self, *args, **kwargs)
        replaced = denoiser_replaced(session)
        if replaced:
            raise RuntimeError(replaced)
        with session.pipeline_call():
            return cls.__call__(self, *args, **kwargs)

    def __deepcopy__(self, memo):
        return _deepcopy_accelerated(self, cls, memo)

    def __reduce_ex__(self, protocol):
        if session_of(self) is not None:
            raise TypeError(not_picklable_message())
        reduced = cls.__reduce_ex__(self, protocol)  # a plain pipeline (e.g. type(pipe)(**components)): as its class
        if isinstance(reduced, tuple) and len(reduced) > 1 and reduced[1] and reduced[1][0] is type(self):
            reduced = (reduced[0], (cls, *reduced[1][1:]), *reduced[2:])
        return reduced

    return type(cls.__name__, (cls,), {"__call__": __call__, "__deepcopy__": __deepcopy__, "__reduce_ex__": __reduce_ex__,
                                       "__module__": cls.__module__, "_diffaccel_base": cls})


def _deepcopy_accelerated(pipe, base: type, memo: dict):
    """``copy.deepcopy`` of an accelerated pipeline: the original is copied plain (its hooks lifted
    for the copy and put back, under the session lock) and the copy accelerated with the same
    configs, so both are independent: no hook, cache or session is shared."""
    import copy

    from diffaccel.pipelines import detect

    session = session_of(pipe)
    accelerated = type(pipe)
    if session is None:
        pipe.__class__ = base
        try:
            return copy.deepcopy(pipe, memo)
        finally:
            pipe.__class__ = accelerated
    with session.lock:
        if session.ctx.active:
            raise RuntimeError("diffaccel: an accelerated pipeline cannot be copied from inside its own call.")
        configs = list(session.configs)
        session.remove()
        vars(pipe).pop(_ATTR, None)
        pipe.__class__ = base
        try:
            clone = copy.deepcopy(pipe, memo)
        finally:
            session.reinstall(configs)
            setattr(pipe, _ATTR, session)
            pipe.__class__ = accelerated
    attach(clone, detect(clone), configs)
    return clone


def attach(pipe, adapter: Adapter, configs: Iterable["Method"]) -> Session:
    """Install ``configs`` (validated already) on ``pipe``, replacing any previous session.

    All or nothing: if installing fails (any exception, KeyboardInterrupt included), ``pipe`` is
    left plain, with no hook of diffaccel on it."""
    detach(pipe)  # replace, never stack
    session = Session(pipe, adapter)
    try:
        session.install(configs)
        setattr(pipe, _ATTR, session)
        pipe.__class__ = _accelerated_class(type(pipe))
    except BaseException:
        session.remove()
        vars(pipe).pop(_ATTR, None)
        _restore_class(pipe)
        raise
    return session


def detach(pipe) -> None:
    """Remove the session from ``pipe``, restoring its class and modules exactly (waits for a call
    running in another thread to finish)."""
    session: Session | None = getattr(pipe, _ATTR, None)
    if session is not None:
        with session.lock:
            try:
                session.remove()
            finally:
                vars(pipe).pop(_ATTR, None)
    _restore_class(pipe)


def _restore_class(pipe) -> None:
    base = getattr(type(pipe), "_diffaccel_base", None)
    if base is not None and type(pipe).__dict__.get("_diffaccel_base") is base:
        pipe.__class__ = base


def session_of(pipe) -> Session | None:
    """The session on an accelerated ``pipe`` (None when it is not accelerated)."""
    session = vars(pipe).get(_ATTR) if hasattr(pipe, "__dict__") else None
    return session if isinstance(session, Session) else None

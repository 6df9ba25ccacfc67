"""Public API: ``accelerate``, ``disable``, ``stats``."""
from __future__ import annotations

import contextlib
from typing import Iterable

from diffaccel.distributed import check_process_group
from diffaccel.methods.base import METHODS, Method
from diffaccel.pipelines import detect
from diffaccel.presets import PRESETS, preset_methods
from diffaccel.state import attach, denoiser_replaced, detach, session_of
from diffaccel.validate import at_least


def _resolve_methods(methods, family: str) -> list[Method]:
    resolved = []
    for m in methods:
        if isinstance(m, type) and issubclass(m, Method):
            raise TypeError(f"methods holds the class {m.__name__}; give a config made from it, e.g. "
                            f"diffaccel.{m.__name__}() (or its name {m.name!r}).")
        if isinstance(m, str):
            if m not in METHODS:
                raise ValueError(f"Unknown method {m!r}. Known methods: {', '.join(sorted(METHODS)) or 'none'}.")
            m = METHODS[m]()
        if not isinstance(m, Method):
            raise TypeError(
                f"methods must hold method configs such as diffaccel.DeepCache(interval=3) or their names "
                f"({', '.join(sorted(METHODS))}), got {type(m).__name__}."
            )
        m.validate()
        m.check_family(family)
        resolved.append(m)
    names = [m.name for m in resolved]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"Each method may be given once; repeated: {', '.join(sorted(duplicates))}.")
    return resolved


def accelerate(pipe, preset: str | None = None, methods: Iterable | None = None, profile=None, target_speedup: float | None = None,
               process_group=None):
    """Accelerate ``pipe`` in place and return it.

    Args:
        pipe: a diffusers pipeline of a supported family (see ``diffaccel.pipelines.supported_pipelines()``).
        preset: ``"quality"``, ``"balanced"`` (default) or ``"fast"``: methods chosen for the family.
        methods: explicit method configs (e.g. ``[diffaccel.DeepCache(interval=3)]``) or names,
            at least one; instead of ``preset``.
        profile: a redundancy profile (path or ``Profile``) from ``diffaccel profile``; with
            ``target_speedup`` the schedule is picked from it; with a preset or methods that hold
            ``StepCache(min_psnr=...)`` (the DiT presets do), its step graph and verified schedules
            (``--step-graph N --verify M``) plan that PSNR at every call instead of a shipped profile.
        target_speedup: wanted speed-up; uses ``profile`` or the profile shipped for the model.
        process_group: a ``torch.distributed`` process group (or ``"world"``) whose ranks must take
            the same data-dependent decisions (one all-reduce per decision). Not needed under
            diffusers' context parallelism (its group is used automatically); without either,
            diffaccel never talks to other ranks.

    Calling ``accelerate`` again replaces the previous acceleration, whatever it was (a quick
    calibration for ``target_speedup`` measures the unaccelerated model). All or nothing: if it
    fails (bad input, an exception or KeyboardInterrupt while installing), ``pipe`` is left as it
    was before the call. Example::

        pipe = diffaccel.accelerate(pipe, preset="fast")
        image = pipe("a red circle").images[0]
        print(diffaccel.stats(pipe))
    """
    methods = _check_arguments(preset, methods, profile, target_speedup)
    adapter = detect(pipe)
    check_process_group(process_group)
    previous = session_of(pipe)
    with previous.lock if previous is not None else contextlib.nullcontext():
        # The previous acceleration comes off first (planning may measure the plain model) and goes
        # back on if anything below fails.
        before = list(previous.configs) if previous is not None else None
        detach(pipe)
        try:
            session = attach(pipe, adapter, _choose(pipe, adapter, preset, methods, profile, target_speedup))
            session.process_group = process_group
        except BaseException:
            if before is not None:
                _restore(pipe, adapter, before, previous.process_group)
            raise
    return pipe


def _choose(pipe, adapter, preset, methods, profile, target_speedup) -> list[Method]:
    if methods is not None:
        if isinstance(methods, (str, Method)):
            methods = [methods]
        chosen = _resolve_methods(list(methods), adapter.family)
    elif target_speedup is not None:
        from diffaccel.profiler.schedule import methods_for_target

        return _resolve_methods(methods_for_target(pipe, adapter, profile, target_speedup), adapter.family)
    else:
        chosen = _resolve_methods(preset_methods(preset or "balanced", adapter.family), adapter.family)
    psnr_planned = any(getattr(m, "min_psnr", None) is not None for m in chosen)  # StepCache / DeepCache planned per call
    if profile is not None and not psnr_planned:
        raise ValueError(
            "profile= needs target_speedup= (e.g. accelerate(pipe, profile='p.json', target_speedup=2.0)) or a "
            "StepCache(min_psnr=...) or DeepCache(min_psnr=...) among the methods, which the presets have; it cannot go "
            "with methods= that have none.")
    if psnr_planned:
        from diffaccel.profiler.deepcache_psnr import with_deepcache_psnr_schedule
        from diffaccel.profiler.plan_step_cache import with_psnr_schedules

        loaded = _load(profile, adapter)
        chosen = with_deepcache_psnr_schedule(adapter, with_psnr_schedules(adapter, chosen, loaded), loaded)
    return chosen


def _load(profile, adapter):
    """A given profile read and checked against the model (None stays None: the shipped one is used)."""
    if profile is None:
        return None
    from diffaccel.profiler.profile import load_profile

    return load_profile(profile, adapter)


def _restore(pipe, adapter, configs, process_group) -> None:
    """Put a replaced acceleration back after a failed ``accelerate`` (best effort: the failure
    being reported matters more than a second one here)."""
    try:
        attach(pipe, adapter, configs).process_group = process_group
    except Exception:  # noqa: BLE001 - attach leaves the pipeline plain when it fails
        pass


def _check_arguments(preset, methods, profile, target_speedup):
    """Refuse bad arguments before any work (a quick calibration can take a minute); returns
    ``methods`` as a list (or None), so a generator is read once. (A pipeline whose denoiser is
    replaced after accelerate raises at its next call: see ``diffaccel.state.denoiser_replaced``.)"""
    given = [name for name, value in (("methods=", methods), ("preset=", preset), ("target_speedup=", target_speedup))
             if value is not None]
    if len(given) > 1:
        raise ValueError(f"Give either methods=, preset= or target_speedup=, not several (got {' and '.join(given)}): "
                         "they all choose the methods.")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ValueError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESETS)} (or leave preset out for balanced).")
    if methods is not None:
        if isinstance(methods, dict) or not isinstance(methods, (str, Method, Iterable)):
            raise TypeError(f"methods must be a list of method configs or names, e.g. [diffaccel.DeepCache(interval=3)] or "
                            f"['deepcache'], got {type(methods).__name__}.")
        methods = [methods] if isinstance(methods, (str, Method)) else list(methods)
        if not methods:
            raise ValueError("methods= is empty, so nothing would be accelerated: give at least one method (e.g. "
                             "[diffaccel.DeepCache()]), a preset=, or call diffaccel.disable(pipe) to run it plain.")
    if profile is not None:
        import os

        from diffaccel.profiler.profile import Profile

        if not isinstance(profile, (str, os.PathLike, Profile)):
            raise TypeError(f"profile must be a path to a profile JSON (from `diffaccel profile MODEL --out p.json`) or a "
                            f"diffaccel Profile, got {type(profile).__name__} {profile!r}.")
    if target_speedup is not None:
        at_least(target_speedup, "target_speedup", 1.0, "e.g. accelerate(pipe, target_speedup=2.0) for twice as fast.")
    return methods


def disable(pipe):
    """Remove diffaccel from ``pipe``: its outputs are bit-identical to a never-accelerated pipeline."""
    detach(pipe)
    return pipe


def stats(pipe) -> dict:
    """What the last call of an accelerated ``pipe`` computed and reused.

    Returns a plain dict: ``denoiser_calls``, ``steps``, per method its counters (``computed``,
    ``reused``, ...), and ``flops_saved_fraction``, the estimated share of denoiser FLOPs saved
    (the first request for a new input shape runs one extra denoiser forward to count FLOPs; if
    that forward cannot run, the fraction is None and stats still returns).
    """
    session = session_of(pipe)
    if session is None:
        raise ValueError("This pipeline is not accelerated: call diffaccel.accelerate(pipe) first.")
    replaced = denoiser_replaced(session)
    if replaced:
        raise RuntimeError(replaced)
    with session.lock:  # a call running in another thread finishes first
        return session.stats()


__all__ = ["accelerate", "disable", "stats", "session_of", "PRESETS"]

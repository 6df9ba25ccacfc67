"""Public API: ``accelerate``, ``disable``, ``stats``."""
from __future__ import annotations

from typing import Iterable

from diffaccel.methods.base import METHODS, Method
from diffaccel.pipelines import detect
from diffaccel.presets import PRESETS, preset_methods
from diffaccel.state import attach, detach, session_of


def _resolve_methods(methods, family: str) -> list[Method]:
    resolved = []
    for m in methods:
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


def accelerate(pipe, preset: str | None = None, methods: Iterable | None = None, profile=None, target_speedup: float | None = None):
    """Accelerate ``pipe`` in place and return it.

    Args:
        pipe: a diffusers pipeline of a supported family (see ``diffaccel.pipelines.supported_pipelines()``).
        preset: ``"quality"``, ``"balanced"`` (default) or ``"fast"``: methods chosen for the family.
        methods: explicit method configs (e.g. ``[diffaccel.DeepCache(interval=3)]``) or names;
            overrides ``preset``.
        profile: a redundancy profile (path or ``Profile``) from ``diffaccel profile``; with
            ``target_speedup`` the schedule is picked from it.
        target_speedup: wanted speed-up; uses ``profile`` or the profile shipped for the model.

    Calling ``accelerate`` again replaces the previous acceleration. Example::

        pipe = diffaccel.accelerate(pipe, preset="fast")
        image = pipe("a red circle").images[0]
        print(diffaccel.stats(pipe))
    """
    adapter = detect(pipe)
    if methods is not None and (preset is not None or target_speedup is not None):
        raise ValueError("Give either methods=, preset= or target_speedup=, not several: they all choose the methods.")
    if methods is not None:
        if isinstance(methods, (str, Method)):
            methods = [methods]
        chosen = _resolve_methods(list(methods), adapter.family)
    elif target_speedup is not None or profile is not None:
        if target_speedup is None:
            raise ValueError("profile= needs target_speedup= (e.g. accelerate(pipe, profile='p.json', target_speedup=2.0)).")
        from diffaccel.profiler.schedule import methods_for_target

        chosen = _resolve_methods(methods_for_target(pipe, adapter, profile, target_speedup), adapter.family)
    else:
        chosen = _resolve_methods(preset_methods(preset or "balanced", adapter.family), adapter.family)
    if any(getattr(m, "min_psnr", None) is not None for m in chosen):  # StepCache planned for a PSNR per call
        from diffaccel.profiler.plan_step_cache import with_psnr_schedules

        chosen = with_psnr_schedules(adapter, chosen)
    attach(pipe, adapter, chosen)
    return pipe


def disable(pipe):
    """Remove diffaccel from ``pipe``: its outputs are bit-identical to a never-accelerated pipeline."""
    detach(pipe)
    return pipe


def stats(pipe) -> dict:
    """What the last call of an accelerated ``pipe`` computed and reused.

    Returns a plain dict: ``denoiser_calls``, ``steps``, per method its counters (``computed``,
    ``reused``, ...), and ``flops_saved_fraction``, the estimated share of denoiser FLOPs saved
    (the first request for a new input shape runs one extra denoiser forward to count FLOPs).
    """
    session = session_of(pipe)
    if session is None:
        raise ValueError("This pipeline is not accelerated: call diffaccel.accelerate(pipe) first.")
    return session.stats()


__all__ = ["accelerate", "disable", "stats", "session_of", "PRESETS"]

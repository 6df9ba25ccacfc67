"""Public API: ``accelerate``, ``disable``, ``stats``."""
from __future__ import annotations

import functools
from typing import Iterable

from diffaccel.methods.base import METHODS, Method
from diffaccel.pipelines import detect
from diffaccel.presets import PRESETS, preset_methods
from diffaccel.state import Session

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

    disable(pipe)  # replace, never stack
    session = Session(pipe, adapter)
    try:
        for config in chosen:
            session.installed.append(config.apply(session))
    except Exception:
        session.remove()
        raise
    setattr(pipe, _ATTR, session)
    pipe.__class__ = _accelerated_class(type(pipe))
    return pipe


def disable(pipe):
    """Remove diffaccel from ``pipe``: its outputs are bit-identical to a never-accelerated pipeline."""
    session: Session | None = getattr(pipe, _ATTR, None)
    if session is not None:
        session.remove()
        delattr(pipe, _ATTR)
    base = getattr(type(pipe), "_diffaccel_base", None)
    if base is not None and type(pipe).__dict__.get("_diffaccel_base") is base:
        pipe.__class__ = base
    return pipe


def session_of(pipe) -> Session | None:
    return getattr(pipe, _ATTR, None)


def stats(pipe) -> dict:
    """What the last call of an accelerated ``pipe`` computed and reused.

    Returns a plain dict: ``denoiser_calls``, ``steps``, per method its counters (``computed``,
    ``reused``, ...), and ``flops_saved_fraction``, the estimated share of denoiser FLOPs saved
    (the first request for a new input shape runs one extra denoiser forward to count FLOPs).
    """
    session = session_of(pipe)
    if session is None:
        raise ValueError("This pipeline is not accelerated: call diffaccel.accelerate(pipe) first.")
    if session.last_stats is None:
        return {"pipeline": session.adapter.name, "family": session.adapter.family, "denoiser_calls": 0,
                "methods": {h.config.name: {} for h in session.installed}, "flops_saved_fraction": None,
                "note": "no pipeline call yet"}
    if "flops_saved_fraction" not in session.last_stats:
        from diffaccel.flops import flops_saved_fraction

        session.last_stats["flops_saved_fraction"] = flops_saved_fraction(session, session.last_stats["methods"])
    return dict(session.last_stats)


__all__ = ["accelerate", "disable", "stats", "PRESETS"]

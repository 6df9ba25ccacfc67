"""``DeepCache(min_psnr=...)``: at a call's timesteps, the fastest verified DeepCache run keeping a PSNR.

A U-Net profile verified with ``diffaccel profile MODEL --verify M --validate K``
(:mod:`diffaccel.profiler.verify_deepcache`) holds real runs of DeepCache's schedules, alone and composed
with CfgCache, each with its lowest pooled PSNR over the seed sets. At a call whose timesteps are those
the runs were verified at, a ``DeepCache(min_psnr=X)`` runs the fastest of them keeping X; elsewhere its
own settings, which the U-Net presets measured at other step counts and schedulers, run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffaccel.hooks import Installed
from diffaccel.methods.base import Method
from diffaccel.methods.cfg_cache import CfgCache
from diffaccel.methods.deepcache import DeepCache
from diffaccel.profiler.plan_common import FORECASTS, planning_profile
from diffaccel.profiler.plan_deepcache import chosen_run, step_speedup
from diffaccel.profiler.profile import Profile
from diffaccel.profiler.verify_deepcache import FORECAST_KEY, verified_times as forecast_times


def fastest_verified(profile: Profile, min_psnr: float, composed: bool, skip_branch: int = 0) -> tuple[DeepCache, dict] | None:
    """(DeepCache config, info) of the fastest verified schedule keeping ``min_psnr``: for each number of full
    steps the run a plan takes (:func:`chosen_run`: the planned schedule unless another measured ``MARGIN_DB``
    better, with its chosen forecast), composed with CfgCache when ``composed``, else alone (the method list
    decides which ran). None: the profile has no such runs, or none keeps ``min_psnr``."""
    entry = (profile.calibration or {}).get(FORECAST_KEY) or {}
    if entry.get("skip_branch") != skip_branch:
        return None
    part = "cfg" if composed else None
    runs = entry.get("runs", ())
    for k in sorted({len(r["full_steps"]) for r in runs}):  # fewest full steps first: the fastest
        run = chosen_run(runs, k, part)
        measured = run[part] if run is not None and part else run
        if measured is None or measured["psnr"][measured["best"]] < min_psnr:
            continue
        order, guard = FORECASTS[measured["best"]]
        full, saved = float(profile.costs["call"]), float(profile.costs["deepcache_saved"][str(skip_branch)])
        # exactly the run that was measured: its full steps, its forecast, no span bounds of the config's own rule
        config = DeepCache(skip_branch=skip_branch, schedule=list(run["full_steps"]), forecast_order=order, guard=guard)
        return config, {"planned": True, "measured_psnr": measured["psnr"][measured["best"]],
                        "predicted_speedup": round(step_speedup(full, saved, int(entry["steps"]), k, composed), 3),
                        "schedule": f"{run['schedule']}, {measured['best']}" + (" + CfgCache" if composed else "")}
    return None


@dataclass(frozen=True)
class DeepCachePsnrSchedule(Method):
    """Schedule provider for ``DeepCache(min_psnr=...)``: at a call whose timesteps are those the profile's
    DeepCache runs were verified at, the fastest verified run keeping ``min_psnr`` (:func:`fastest_verified`);
    at other calls the DeepCache config as given (its own settings were measured at other step counts and
    schedulers; a verified run was not)."""

    name: ClassVar[str] = "deepcache_psnr_schedule"
    profile: Profile | None = None
    composed: bool = False  # a CfgCache(follow_full_steps=True) is installed beside the DeepCache

    def apply(self, session) -> Installed:
        return _PsnrScheduleInstalled(self, session)


class _PsnrScheduleInstalled(Installed):
    def __init__(self, config: DeepCachePsnrSchedule, session):
        super().__init__(config, session)
        self.plans: dict[tuple, tuple[DeepCache, dict]] = {}
        self.info: dict = {}
        session.providers[DeepCache.name] = self
        self.on_remove(lambda: session.providers.pop(DeepCache.name, None))

    def config_for_call(self, config: DeepCache, session) -> DeepCache:
        times = session.call_times()
        key = (config.min_psnr, config.skip_branch, tuple(round(t, 6) for t in times))
        if key not in self.plans:
            self.plans[key] = self._plan(config, times)
        planned, self.info = self.plans[key]
        return planned

    def _plan(self, config: DeepCache, times: list[float]) -> tuple[DeepCache, dict]:
        profile = self.config.profile
        verified_at = forecast_times(profile, len(times))
        if config.min_psnr is None or verified_at is None or any(abs(a - b) > 1e-4 for a, b in zip(verified_at, times)):
            return config, {"planned": False, "why": "no run was verified at this call's timesteps: the settings as given ran"}
        chosen = fastest_verified(profile, config.min_psnr, self.config.composed, config.skip_branch)
        if chosen is None:
            kind = "composed with CfgCache " if self.config.composed else ""
            return config, {"planned": False, "why": f"no verified run {kind}of skip branch {config.skip_branch} keeps "
                                                      f"min_psnr={config.min_psnr:g}: the settings as given ran"}
        return chosen

    def stats(self) -> dict:
        return dict(self.info)


def with_deepcache_psnr_schedule(adapter, methods: list[Method], profile: Profile | None = None) -> list[Method]:
    """``methods`` plus the schedule provider a ``DeepCache(min_psnr=...)`` among them needs, from ``profile``
    or the one shipped for the model; nothing is added without verified DeepCache runs in either (the
    config's own settings run)."""
    if not any(isinstance(m, DeepCache) and m.min_psnr is not None for m in methods):
        return methods
    if any(isinstance(m, DeepCachePsnrSchedule) for m in methods):  # already planned (a resolved config list)
        return methods
    profile = planning_profile(
        adapter, profile, lambda p: (p.calibration or {}).get(FORECAST_KEY),
        "This profile has no verified DeepCache runs, so DeepCache(min_psnr=...) cannot be planned from it: re-create it "
        "with `diffaccel profile MODEL --out p.json --verify 16 --validate 16`.")
    if profile is None:
        return methods
    composed = any(isinstance(m, CfgCache) and m.follow_full_steps for m in methods)
    return [*methods, DeepCachePsnrSchedule(profile=profile, composed=composed)]

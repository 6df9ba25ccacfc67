"""What every planner shares: the Plan record, the unreachable-target error, the step-time axis,
and the FLOPs / wall-clock speed-up arithmetic (see diffaccel/profiler/schedule.py for the models)."""
from __future__ import annotations

from dataclasses import dataclass, field

from diffaccel.methods.base import Method
from diffaccel.profiler.profile import Cumulative, Profile
from diffaccel.validate import at_least, is_real, positive_int


# Forecasts of reused features that verification runs compare (DeepCache's deep features, AdaptiveCache's
# residuals): label -> (forecast_order, guard); "order 0" first: it wins ties (plain reuse).
FORECASTS = {"order 0": (0, 2.0), "order 1": (1, 2.0), "order 1, guard 0.15": (1, 0.15)}
# A forecast, or DeepCache's evenly spread schedule, replaces plain reuse only when it measured at least
# this much better: on tiny-sd, options 0.4 dB apart on 48 seeds swapped places on other seed sets
# (eval/results/step_cache.md), so smaller differences are noise, not a choice.
MARGIN_DB = 0.5


def best_label(psnr: dict[str, float]) -> str:
    """The forecast to run: the best measured one if it beats plain reuse by ``MARGIN_DB``, else plain reuse."""
    best = max(psnr, key=psnr.get)
    return best if psnr[best] >= psnr["order 0"] + MARGIN_DB else "order 0"


class UnreachableTarget(ValueError):
    """The target speed-up is beyond what any applicable method can reach for this model."""


@dataclass
class Plan:
    method: str
    config: Method
    speedup: float  # predicted, denoiser FLOPs
    wall_speedup: float  # predicted, whole generation
    error: float  # predicted staleness (see module docstring)
    computed: list[bool] = field(default_factory=list)  # per step: full (True) or reusing
    note: str = ""
    with_methods: tuple[Method, ...] = ()  # installed beside ``config``; the predictions count on them
    psnr: float | None = None  # measured by running the schedule (a verified one), dB

    def describe(self) -> dict:
        return {"method": self.method, "config": self.config.to_dict(), "predicted_speedup": round(self.speedup, 4),
                "predicted_wall_speedup": round(self.wall_speedup, 4), "predicted_error": round(self.error, 6),
                "computed_steps": [i for i, c in enumerate(self.computed) if c], "note": self.note,
                **({"with": [m.to_dict() for m in self.with_methods]} if self.with_methods else {}),
                **({"measured_psnr": round(self.psnr, 3)} if self.psnr is not None else {})}


# ---- shared helpers --------------------------------------------------------------------
def planning_profile(adapter, profile: Profile | None, holds, missing: str) -> Profile | None:
    """``profile``, or the one shipped for the model, when it ``holds`` what a per-call planner needs; None
    when no profile was given and the shipped one (if any) does not; a given profile without it raises
    ``ValueError(missing)``."""
    given = profile is not None
    if profile is None:
        from diffaccel.profiler.schedule import shipped_profile

        profile = shipped_profile(adapter)
    if profile is not None and holds(profile):
        return profile
    if given:
        raise ValueError(missing)
    return None


def check_target(target) -> None:
    """A wanted speed-up: a finite number >= 1 (None: a planner only evaluates a given schedule)."""
    if target is not None:
        at_least(target, "target_speedup", 1.0, "e.g. 2.0 asks for twice as fast; 1 for no speed-up.")


def check_step_times(times) -> None:
    """The normalised times (1 = noise) of the steps to plan for: finite, in [0, 1], never increasing.

    Planners read change between consecutive times off the profile; a time running the wrong way
    would make them reuse where the trajectory changes most, silently.
    """
    ok = isinstance(times, (list, tuple)) and len(times) >= 1 and all(is_real(t) and 0.0 <= t <= 1.0 for t in times)
    if not ok or any(b > a for a, b in zip(times, times[1:])):
        shown = list(times)[:6] if isinstance(times, (list, tuple)) else times
        raise ValueError(f"step times must be a non-empty list of normalised times in [0, 1] that never increase "
                         f"(1 = pure noise, first step first), got {shown!r}{'...' if ok and len(times) > 6 else ''}. "
                         "Take them from diffaccel.profiler.schedule.step_times(profile, steps).")


def step_times(profile: Profile, steps: int | None = None) -> list[float]:
    """The profiled step times, or ``steps`` times spread over the same range the same way."""
    times = profile.times
    if steps is not None:
        positive_int(steps, "steps", "It is the number of denoising steps to plan for, e.g. 20.")
    if steps is None or steps == len(times):
        return list(times)
    out = []
    for i in range(steps):
        x = i * (len(times) - 1) / max(1, steps - 1)
        j = min(int(x), len(times) - 2)
        out.append(times[j] + (x - j) * (times[j + 1] - times[j]))
    return out


def wall_speedup(profile: Profile, flops_speedup: float, skipped=()) -> float:
    """Whole-generation speed-up for a denoiser FLOPs speed-up.

    ``skipped``: the modules whose work the method saves. With the profile's per-module wall
    seconds, the FLOPs saving is scaled by those modules' share of the call's time over their
    share of its FLOPs (on small models a block's time is not proportional to its FLOPs);
    without them (old profiles) time is assumed proportional to FLOPs.
    """
    costs = profile.costs
    share = float(costs.get("denoiser_share", 1.0))
    saved = 1.0 - 1.0 / flops_speedup  # share of the denoiser's FLOPs not computed
    seconds, call_seconds = costs.get("module_seconds"), costs.get("call_seconds")
    if skipped and seconds and call_seconds:
        flops = sum(costs["modules"].get(m, 0) for m in skipped) / float(costs["call"])
        wall = sum(seconds.get(m, 0.0) for m in skipped) / float(call_seconds)
        if flops > 0 and wall > 0:
            saved = min(0.99, saved * wall / flops)
    return 1.0 / ((1.0 - share) + share * (1.0 - saved))


def wall_speedup_per_step(profile: Profile, time_saved: list[float]) -> float:
    """Whole-generation speed-up when step i saves ``time_saved[i]`` of a denoiser step's wall time."""
    share = float(profile.costs.get("denoiser_share", 1.0))
    kept = 1.0 - sum(time_saved) / max(1, len(time_saved))
    return 1.0 / ((1.0 - share) + share * kept)


def skipped_time_share(profile: Profile, skipped) -> float | None:
    """Measured share of a denoiser call's wall time spent in ``skipped`` (None: not measured)."""
    seconds, call_seconds = profile.costs.get("module_seconds"), profile.costs.get("call_seconds")
    if not (seconds and call_seconds):
        return None
    return min(0.99, sum(seconds.get(m, 0.0) for m in skipped) / float(call_seconds))


def _flops_speedup(full: float, costs: list[float]) -> float:
    return full * len(costs) / sum(costs)


def _increments(curve: Cumulative, times: list[float]) -> list[float]:
    cum = curve.on(times)
    return [0.0] + [max(0.0, cum[i] - cum[i - 1]) for i in range(1, len(cum))]



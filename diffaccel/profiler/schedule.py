"""Pick, from a redundancy Profile, the caching schedule that meets a speed-up with the least error.

Cost model: one denoiser call costs F FLOPs (counted when profiling); a step where a method
reuses saves the FLOPs of the modules it skips. Predicted speed-up = full cost / expected cost,
in denoiser FLOPs; the wall-clock prediction adds the part of a generation no method touches
(text encoder, VAE), measured as the denoiser's share of wall time.

Error model: a reused quantity is stale by the change its source module accumulated since it
was last computed, read from the profile's cumulative change curve at the *actual* step times
(so a 50-step DDIM profile plans 20 DPM-Solver++ steps). Each method's planner
(:mod:`diffaccel.profiler.planner`) turns that into the predicted error of its schedules -- a
proxy, comparable between schedules and (roughly) between methods -- and plans for a target;
this module asks every planner that applies to the profile's family and keeps the best plan:
methods' errors are in different units, so which method wins is a measured preference (:func:`choice_key`).

``methods_for_target`` returns the configs for ``diffaccel.accelerate``; for methods whose
planner re-plans per call, a ``ProfileSchedule`` provides their settings at each call for the
call's actual timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from diffaccel.hooks import Installed
from diffaccel.methods.base import Method
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, check_step_times, check_target, step_times
from diffaccel.profiler.planner import planner_for, planners_for
from diffaccel.profiler.profile import Profile, ProfileError, load_profile
from diffaccel.validate import at_least

__all__ = ["Plan", "UnreachableTarget", "step_times", "planning_times", "choice_key", "speed_key", "plan_method", "plan_all",
           "plan_for_max_error", "max_reachable", "max_reachable_for", "summary", "ProfileSchedule", "methods_for_target",
           "shipped_profile", "calibrate"]


def plan_method(method: str, profile: Profile, times: list[float], target: float, like: Method | None = None) -> Plan:
    """Plan ``method``; ``like`` is a config whose fixed settings (skip branch, warm-up, head blocks) are kept."""
    check_target(target)
    check_step_times(times)
    return planner_for(method).plan(profile, times, target, like)


def summary(plan: Plan) -> str:
    """One line describing ``plan``'s schedule."""
    return planner_for(plan.method).summary(plan)


def planning_times(profile: Profile, steps: int | None = None) -> list[float]:
    """The step times to plan for: the real scheduler's where a planner's verified schedules ran at that
    many steps (a call of that length runs them, so the plan shown for it should too), else the
    profiled times spread over ``steps`` (default: the profiled count)."""
    times = step_times(profile, steps)
    verified = (planner.verified_times(profile, len(times)) for planner in planners_for(profile.family))
    return next((v for v in verified if v), times)


def choice_key(plan: Plan) -> tuple:
    """How plans of different methods rank (larger is better): the method's measured preference
    (:attr:`~diffaccel.profiler.planner.Planner.preference`), then the least predicted error. Errors
    of different methods are in different units (a staleness proxy, a summed output MSE), and the
    profile's PSNR calibration (2 prompts) mis-ranked methods that real runs separate by 4-11 dB
    (eval/results/schedules.md), so errors are compared only between plans of equal preference."""
    return planner_for(plan.method).preference, -plan.error, plan.speedup


def speed_key(plan: Plan) -> tuple:
    """How plans that all meet a quality bound (a PSNR, an error) rank: the method's measured
    preference first (its quality numbers are the more trustworthy), then speed."""
    return planner_for(plan.method).preference, plan.speedup


def plan_all(profile: Profile, target: float, steps: int | None = None) -> tuple[Plan, list[Plan]]:
    """(chosen plan, every applicable method's plan) for ``target``; the best by :func:`choice_key` wins."""
    check_target(target)
    times = planning_times(profile, steps)
    plans, reasons = [], []
    for planner in planners_for(profile.family):
        try:
            plans.append(plan_method(planner.name, profile, times, target))
        except UnreachableTarget as err:
            reasons.append(str(err))
    if not plans:
        raise UnreachableTarget(
            f"A {target:g}x speed-up is out of reach for {profile.model} at {len(times)} steps: "
            f"{'; '.join(reasons) or 'no planner for family ' + profile.family}. Ask for a lower target "
            f"(reachable: up to {max_reachable(profile, times):.2f}x in denoiser FLOPs)."
        )
    return max(plans, key=choice_key), plans


def max_reachable(profile: Profile, times: list[float]) -> float:
    return max([1.0] + [max_reachable_for(p.name, profile, times) for p in planners_for(profile.family)])


def plan_for_max_error(profile: Profile, max_error: float, steps: int | None = None) -> tuple[Plan, list[Plan]]:
    """The fastest plan whose predicted error stays within ``max_error``, of the most preferred method
    that has one (:func:`choice_key`)."""
    at_least(max_error, "max_error", 0.0, "It is in the profile's error units; `diffaccel schedule` prints them per plan.")
    times = planning_times(profile, steps)
    best = None
    for planner in planners_for(profile.family):
        lo, hi, found = 1.0, max_reachable_for(planner.name, profile, times), None
        for _ in range(25):
            mid = (lo + hi) / 2
            try:
                plan = plan_method(planner.name, profile, times, mid)
            except UnreachableTarget:  # e.g. TextCache where it is not counted: it plans nothing here
                hi = mid
                continue
            if plan.error <= max_error and plan.speedup > 1.0 + 1e-9:  # one that saves nothing is no schedule
                lo, found = mid, plan
            else:
                hi = mid
        # Each method's error is in its own units, so ``max_error`` bounds each one in its own.
        if found is not None and (best is None or speed_key(found) > speed_key(best)):
            best = found
    if best is None:
        raise UnreachableTarget(f"No schedule keeps the predicted error within {max_error:g}; raise --max-error.")
    return best, [best]


def max_reachable_for(method: str, profile: Profile, times: list[float], like: Method | None = None) -> float:
    """Highest target ``method`` can plan for (bisection: reachability is monotone in the target)."""
    lo, hi = 1.0, 1000.0
    for _ in range(30):
        mid = (lo + hi) / 2
        try:
            plan_method(method, profile, times, mid, like)
            lo = mid
        except UnreachableTarget:
            hi = mid
    return lo


# ---- the per-call re-planner ------------------------------------------------------------
@dataclass(frozen=True)
class ProfileSchedule(Method):
    """Re-plans the settings of the method ``controlled`` names at every call, from a profile, for
    the call's timesteps.

    Its handle is the method's schedule provider (:class:`~diffaccel.hooks.ScheduleProvider`):
    the controlled method's handle asks it for the call's config (DeepCache's full steps,
    AdaptiveCache's threshold and cap) when the call first needs it. The controlled config itself
    never changes, and the order in which the two are installed does not matter.
    """

    name: ClassVar[str] = "profile_schedule"
    profile: Profile | None = None
    target_speedup: float = 2.0
    controlled: Method | None = None

    def validate(self) -> None:
        if self.profile is None or self.controlled is None:
            raise ValueError("ProfileSchedule needs a profile and the method config it controls.")
        check_target(self.target_speedup)

    def apply(self, session) -> Installed:
        return ProfileScheduleInstalled(self, session)


class ProfileScheduleInstalled(Installed):
    """Schedule provider for the controlled method; ``stats()`` reports the last call's plan."""

    def __init__(self, config: ProfileSchedule, session):
        super().__init__(config, session)
        self.info: dict = {}
        # Plans by step times: planning AdaptiveCache for 3x takes ~20 ms, a real share of a small
        # model's generation, and the same schedule of timesteps always gives the same plan.
        self.plans: dict[tuple, tuple[Plan, str]] = {}
        method = config.controlled.name
        session.providers[method] = self
        self.on_remove(lambda: session.providers.pop(method, None))

    def config_for_call(self, config: Method, session) -> Method:
        schedule: ProfileSchedule = self.config
        times = session.call_times() or schedule.profile.times
        n = len(times)
        key = (config.name, schedule.target_speedup, tuple(round(t, 6) for t in times))
        if key not in self.plans:
            self.plans[key] = self._plan(config, times, n)
        plan, note = self.plans[key]
        chosen = planner_for(config.name).call_config(config, plan)
        self.info = {"method": config.name, "steps": n, "planned": _jsonable_config(chosen),
                     "predicted_speedup": round(plan.speedup, 3), "predicted_wall_speedup": round(plan.wall_speedup, 3),
                     **({"note": note} if note else {})}
        return chosen

    def _plan(self, config: Method, times: list[float], n: int) -> tuple[Plan, str]:
        schedule: ProfileSchedule = self.config
        try:
            return plan_method(config.name, schedule.profile, times, schedule.target_speedup, config), ""
        except UnreachableTarget as err:  # never fail a running call: use the most the method reaches
            reach = max_reachable_for(config.name, schedule.profile, times, config)
            plan = plan_method(config.name, schedule.profile, times, reach, config)
            return plan, f"target {schedule.target_speedup:g}x unreachable at {n} steps ({err}); used {plan.speedup:.2f}x"

    def stats(self) -> dict:
        return {**self.counters, **self.info}


def _jsonable_config(config: Method) -> dict:
    """The settings the re-planner chose, for stats (DeepCache's full steps, AdaptiveCache's threshold)."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, list))}


# ---- entry point used by diffaccel.accelerate ------------------------------------------------
def methods_for_target(pipe, adapter, profile, target_speedup: float) -> list[Method]:
    """Method configs meeting ``target_speedup`` on ``pipe``, planned from ``profile``.

    ``profile`` is a path or Profile; None uses a profile shipped for the model (matched by
    architecture fingerprint) or, failing that, a quick built-in calibration.
    """
    if profile is None:
        profile = shipped_profile(adapter) or calibrate(pipe, adapter)
    profile = load_profile(profile, adapter)
    chosen, _ = plan_all(profile, target_speedup)
    if planner_for(chosen.method).replans_per_call:
        schedule = ProfileSchedule(profile=profile, target_speedup=float(target_speedup), controlled=chosen.config)
        return [*chosen.with_methods, schedule, chosen.config]
    return [*chosen.with_methods, chosen.config]


def shipped_profile(adapter) -> Profile | None:
    """A profile in the bundled assets whose fingerprint matches ``adapter``'s model."""
    from diffaccel.bundled.loader import bundled_dir

    for path in sorted(bundled_dir().glob("*/profile.json")):
        try:
            profile = load_profile(path)
            profile.check_matches(adapter)
            return profile
        except ProfileError:
            continue
    return None


def calibrate(pipe, adapter, prompts=("a photo", "a drawing"), steps: int = 20) -> Profile:
    """Quick built-in calibration for a model with no profile: two short generations."""
    from diffaccel.profiler.measure import measure

    try:
        profile = measure(pipe, list(prompts), {"num_inference_steps": steps}, model=adapter.name, progress=False,
                          describe={"calibration": "built-in quick calibration"})
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"No profile is shipped for this {adapter.name} and the quick calibration could not call it with a plain "
            f"prompt ({type(err).__name__}: {err}). Profile it with `diffaccel profile MODEL --out p.json` and pass "
            "profile='p.json'."
        ) from None
    # Whether TextCache is counted reads module timings; timed now, they would make the schedule (and so
    # the output) depend on this machine's load. Only a saved profile may decide that.
    profile.costs.pop("text_modules", None)
    return profile

"""Pick, from a redundancy Profile, the caching schedule that meets a speed-up with the least error.

Cost model: one denoiser call costs F FLOPs (counted when profiling); a step where a method
reuses saves the FLOPs of the modules it skips. Predicted speed-up = full cost / expected cost,
in denoiser FLOPs; the wall-clock prediction adds the part of a generation no method touches
(text encoder, VAE), measured as the denoiser's share of wall time.

Error model: a reused quantity is stale by the change its source module accumulated since it
was last computed, read from the profile's cumulative change curve at the *actual* step times
(so a 50-step DDIM profile plans 20 DPM-Solver++ steps). The predicted error of a schedule is
the sum over reused (step, module) of that staleness, weighted by the module's share of the
FLOPs -- a proxy, comparable between schedules and (roughly) between methods.

* DeepCache: the number of full steps follows from the target; which steps are full is chosen
  by dynamic programming to minimise the summed staleness of the deep features.
* AdaptiveCache: its accumulate-and-reset rule is simulated on the profiled first-block residual
  change; the smallest threshold (and cap on consecutive reuses) that meets the target is taken.
* PAB: per attention kind, the interval and time range with the best error per saved FLOP.

``methods_for_target`` returns the configs for ``diffaccel.accelerate``; a ``ProfileSchedule``
entry re-plans DeepCache / AdaptiveCache at each call for the call's actual timesteps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

from diffaccel.methods.base import Installed, Method
from diffaccel.profiler.plan_adaptive import plan_adaptive
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, step_times, wall_speedup
from diffaccel.profiler.plan_deepcache import plan_deepcache
from diffaccel.profiler.profile import Cumulative, Profile, ProfileError, load_profile

ATTENTION_KINDS = ("spatial", "temporal", "cross", "joint")


# ---- PAB -----------------------------------------------------------------------------------
def simulate_pab(times: list[float], interval: int, t_range: tuple[float, float]) -> list[bool]:
    computed, last = [], None
    for i, t in enumerate(times):
        reuse = last is not None and t_range[0] < t < t_range[1] and i - last < interval
        if not reuse:
            last = i
        computed.append(not reuse)
    return computed


def plan_pab(profile: Profile, times: list[float], target: float) -> Plan:
    from diffaccel.methods.pab import PAB

    full, n = float(profile.costs["call"]), len(times)
    need = n * full * (1.0 - 1.0 / target)  # FLOPs to save
    groups: dict[str, list[str]] = {}
    for m in profile.modules:
        if m["kind"] in ATTENTION_KINDS:
            groups.setdefault("spatial" if m["kind"] == "joint" else m["kind"], []).append(m["name"])
    options: dict[str, list[tuple[float, float, int, tuple]]] = {}
    for kind, names in groups.items():
        flops = sum(profile.costs["modules"].get(x, 0) for x in names)
        series = [None if s == 0 else sum(profile.series(x)[s] or 0.0 for x in names) / len(names) for s in range(len(profile.times))]
        cum = Cumulative(profile.times, series).on(times)
        opts = [(0.0, 0.0, 1, (0.0, 1.0))]
        for interval in range(2, 7):
            for lo in (0.05, 0.1, 0.2, 0.3):
                for hi in (0.6, 0.7, 0.8, 0.9, 0.95):
                    computed = simulate_pab(times, interval, (lo, hi))
                    err, last = 0.0, 0
                    for i, c in enumerate(computed):
                        last = i if c else last
                        err += 0.0 if c else (cum[i] - cum[last]) * flops / full
                    opts.append((flops * computed.count(False), err, interval, (lo, hi)))
        options[kind] = _pareto(opts)
    best = None
    for combo in _combinations(list(options.values())):
        saved, err = sum(o[0] for o in combo), sum(o[1] for o in combo)
        if saved >= need - 1e-6 * full and (best is None or err < best[1]):
            best = (saved, err, combo)
    if best is None:
        top = sum(max(o[0] for o in opts) for opts in options.values())
        raise UnreachableTarget(f"PAB reaches at most {n * full / (n * full - top):.2f}x here")
    saved, err, combo = best
    kw, skipped = {}, []
    for kind, (_, _, interval, t_range) in zip(options, combo):
        kw[f"{kind}_interval"], kw[f"{kind}_range"] = interval, t_range
        skipped += groups[kind] if interval > 1 else []
    speedup = n * full / (n * full - saved)
    return Plan("pab", PAB(**kw), speedup, wall_speedup(profile, speedup, skipped), err, [True] * n)


def _pareto(opts):
    """Options not beaten in both saving (higher) and error (lower)."""
    opts = sorted(opts, key=lambda o: (-o[0], o[1]))
    front, best_err = [], math.inf
    for o in opts:
        if o[1] < best_err:
            front.append(o)
            best_err = o[1]
    return front


def _combinations(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for rest in _combinations(lists[1:]):
            yield (head, *rest)


# ---- choosing a method -------------------------------------------------------------------
PLANNERS = {"unet": ("deepcache",), "image_dit": ("adaptive_cache", "pab"), "video_dit": ("adaptive_cache", "pab")}


def plan_method(method: str, profile: Profile, times: list[float], target: float, like: Method | None = None) -> Plan:
    """Plan ``method``; ``like`` is a config whose fixed settings (branch, warm-up, head blocks) are kept."""
    if method == "deepcache":
        return plan_deepcache(profile, times, target, branch=getattr(like, "branch", 0))
    if method == "adaptive_cache":
        return plan_adaptive(profile, times, target, head_blocks=getattr(like, "head_blocks", 1), warmup=getattr(like, "warmup", 2))
    if method == "pab":
        return plan_pab(profile, times, target)
    raise ValueError(f"No planner for method {method!r}; planners exist for deepcache, adaptive_cache, pab.")


def plan_all(profile: Profile, target: float, steps: int | None = None) -> tuple[Plan, list[Plan]]:
    """(chosen plan, every applicable method's plan) for ``target``; the least predicted error wins."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target >= 1.0 or math.isinf(target):
        raise ValueError(f"target speed-up must be a number >= 1 (e.g. 2.0), got {target!r}.")
    times = step_times(profile, steps)
    plans, reasons = [], []
    for method in PLANNERS.get(profile.family, ()):
        try:
            plans.append(plan_method(method, profile, times, target))
        except UnreachableTarget as err:
            reasons.append(str(err))
    if not plans:
        raise UnreachableTarget(
            f"A {target:g}x speed-up is out of reach for {profile.model} at {len(times)} steps: "
            f"{'; '.join(reasons) or 'no planner for family ' + profile.family}. Ask for a lower target "
            f"(reachable: up to {max_reachable(profile, times):.2f}x in denoiser FLOPs)."
        )
    return min(plans, key=lambda p: p.error), plans


def max_reachable(profile: Profile, times: list[float]) -> float:
    return max([1.0] + [max_reachable_for(m, profile, times) for m in PLANNERS.get(profile.family, ())])


def plan_for_max_error(profile: Profile, max_error: float, steps: int | None = None) -> tuple[Plan, list[Plan]]:
    """The fastest plan whose predicted error stays within ``max_error``."""
    times = step_times(profile, steps)
    best = None
    for method in PLANNERS.get(profile.family, ()):
        lo, hi, found = 1.0, max_reachable_for(method, profile, times), None
        for _ in range(25):
            mid = (lo + hi) / 2
            plan = plan_method(method, profile, times, mid)
            if plan.error <= max_error:
                lo, found = mid, plan
            else:
                hi = mid
        if found is not None and (best is None or found.speedup > best.speedup):
            best = found
    if best is None:
        raise UnreachableTarget(f"No schedule keeps the predicted error within {max_error:g}; raise --max-error.")
    return best, [best]


# ---- the per-call re-planner ------------------------------------------------------------
@dataclass
class ProfileSchedule(Method):
    """Re-plans another method's schedule at every call from a profile, for the call's timesteps.

    Put it before the method it controls; it sets DeepCache's full steps or AdaptiveCache's
    threshold / max_consecutive when step 0's first denoiser call arrives.
    """

    name: ClassVar[str] = "profile_schedule"
    profile: Profile | None = None
    target_speedup: float = 2.0
    controlled: Method | None = None

    def validate(self) -> None:
        if self.profile is None or self.controlled is None:
            raise ValueError("ProfileSchedule needs a profile and the method config it controls.")

    def apply(self, session) -> Installed:
        return _ReplanInstalled(self, session)


class _ReplanInstalled(Installed):
    def __init__(self, config: ProfileSchedule, session):
        super().__init__(config, session)
        handle = session.adapter.denoiser.register_forward_pre_hook(self._on_call, with_kwargs=True)
        self.on_remove(handle.remove)
        self.info: dict = {}
        # Plans by step times: planning AdaptiveCache for 3x takes ~20 ms, a real share of a small
        # model's generation, and the same schedule of timesteps always gives the same plan.
        self.plans: dict[tuple, tuple] = {}

    def reset_cache(self) -> None:
        self.planned = False

    def _on_call(self, module, args, kwargs):
        ctx = self.session.ctx
        if not ctx.active or self.planned:
            return None
        self.planned = True
        cfg: ProfileSchedule = self.config
        timesteps = [float(t) for t in getattr(self.session.pipe.scheduler, "timesteps", [])]
        n = int(ctx.num_steps or len(timesteps))
        times = [self.session.adapter.normalised_time(t) for t in timesteps[len(timesteps) - n:]] or cfg.profile.times
        method = cfg.controlled.name
        key = (method, cfg.target_speedup, tuple(round(t, 6) for t in times))
        if key not in self.plans:
            self.plans[key] = self._plan(method, times, n)
        plan, note = self.plans[key]
        if method == "deepcache":
            cfg.controlled.schedule = [i for i, c in enumerate(plan.computed) if c]
        elif method == "adaptive_cache":
            cfg.controlled.threshold, cfg.controlled.max_consecutive = plan.config.threshold, plan.config.max_consecutive
        self.info = {"method": method, "steps": n, "planned": _jsonable_config(cfg.controlled), "predicted_speedup": round(plan.speedup, 3),
                     "predicted_wall_speedup": round(plan.wall_speedup, 3), **({"note": note} if note else {})}
        return None

    def _plan(self, method: str, times: list[float], n: int):
        cfg: ProfileSchedule = self.config
        try:
            return plan_method(method, cfg.profile, times, cfg.target_speedup, cfg.controlled), ""
        except UnreachableTarget as err:  # never fail a running call: use the most the method reaches
            reach = max_reachable_for(method, cfg.profile, times, cfg.controlled)
            plan = plan_method(method, cfg.profile, times, reach, cfg.controlled)
            return plan, f"target {cfg.target_speedup:g}x unreachable at {n} steps ({err}); used {plan.speedup:.2f}x"

    def stats(self) -> dict:
        return {**self.counters, **self.info}


def _jsonable_config(config: Method) -> dict:
    """The settings the re-planner chose, for stats (DeepCache's full steps, AdaptiveCache's threshold)."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool, list))}


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
    controlled = chosen.config
    if chosen.method in ("deepcache", "adaptive_cache"):
        controlled = replace(controlled)  # a fresh config the re-planner may tune
        return [ProfileSchedule(profile=profile, target_speedup=float(target_speedup), controlled=controlled), controlled]
    return [controlled]


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
        return measure(pipe, list(prompts), {"num_inference_steps": steps}, model=adapter.name, progress=False,
                       describe={"calibration": "built-in quick calibration"})
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"No profile is shipped for this {adapter.name} and the quick calibration could not call it with a plain "
            f"prompt ({type(err).__name__}: {err}). Profile it with `diffaccel profile MODEL --out p.json` and pass "
            "profile='p.json'."
        ) from None

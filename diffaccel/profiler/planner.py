"""The planner protocol: how the profiler measures for, plans and simulates a method it does not know.

A plannable method has a planner next to its method file: ``diffaccel/profiler/plan_<x>.py``
defines a :class:`Planner` subclass for the method and decorates it with
:func:`register_planner`. The profiler imports every ``plan_*`` module of this package, so a new
plannable method is its method file plus its planner file; nothing in the profiler names it.

A planner says

* what it needs measured when a model is profiled: the modules whose wall time it reads
  (``timed_modules``), its entries of the profile's ``costs`` (``costs``), and an optional
  measurement riding along each profiled generation (``probe`` / ``probe_result`` /
  ``reuse_error``);
* how it plans: the config meeting a speed-up target with the least predicted error (``plan``);
  targets in predicted error or PSNR are searched over ``plan`` by the profiler;
* how it simulates: the predicted speed-up and error of a given config (``simulate``);
* how a plan becomes the config a call runs with (``call_config``) and whether it is re-planned
  at every call for that call's timesteps (``replans_per_call``).
* at which timesteps the profile ran its schedules for real, if it did (``verified_times``): plans
  for that step count are made at them.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from diffaccel.methods.base import Method

if TYPE_CHECKING:
    from diffaccel.pipelines import Adapter
    from diffaccel.profiler.plan_common import Plan
    from diffaccel.profiler.profile import Profile


class Planner:
    """Plans the schedule of one method (``method``) from a redundancy profile."""

    method: ClassVar[type[Method]]
    # Plan again at every pipeline call, for the call's actual timesteps (ProfileSchedule).
    replans_per_call: ClassVar[bool] = False
    # Which method a plan takes when several qualify (higher first; then the least error for a speed-up
    # target, the most speed for a PSNR or error bound: diffaccel.profiler.schedule).
    # Methods' errors are in different units, so this is set from real runs, not from the errors.
    preference: ClassVar[int] = 0
    # The PSNR calibration also runs each probe plan with each forecast of the reused features
    # (diffaccel.profiler.calibrate_psnr), for a method whose config has forecast_order and guard.
    forecast_calibrated: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.method.name

    def applies_to(self, family: str) -> bool:
        return family in self.method.supported_families()

    # ---- what profiling measures for this method ---------------------------------------------
    def timed_modules(self, adapter: "Adapter") -> set[str]:
        """Denoiser modules (paths) whose wall seconds per call the plan needs, beyond the blocks."""
        return set()

    def costs(self, adapter: "Adapter", module_flops: dict[str, int]) -> dict[str, Any]:
        """This method's entries of ``profile.costs``, from the FLOPs of each module path."""
        return {}

    @contextlib.contextmanager
    def probe(self, pipe, adapter: "Adapter") -> Iterator[Any]:
        """A measurement running along one profiled generation (None: nothing to measure)."""
        yield None

    def probe_result(self, probe: Any) -> Any:
        """The JSON-able result of one generation's probe."""
        return None

    def reuse_error(self, pipe, results: list) -> dict[str, Any]:
        """This method's entries of ``profile.reuse_error``, from every prompt's probe result."""
        return {}

    def verified_times(self, profile: "Profile", steps: int | None = None) -> list[float] | None:
        """The scheduler timesteps at which the profile ran this method's schedules for real (with
        ``steps`` of them, when given): a plan for that step count should be made at them."""
        return None

    # ---- planning ----------------------------------------------------------------------------
    def plan(self, profile: "Profile", times: list[float], target: float, like: Method | None = None) -> "Plan":
        """The plan meeting ``target`` (denoiser-FLOPs speed-up) at ``times`` with the least predicted
        error; ``like``'s fixed settings (a skip branch, warm-up steps) are kept. Raises
        :class:`~diffaccel.profiler.plan_common.UnreachableTarget` when no plan meets it."""
        raise NotImplementedError

    def simulate(self, profile: "Profile", times: list[float], config: Method) -> "Plan":
        """Predicted speed-up and error of running ``config`` at ``times``."""
        raise NotImplementedError

    def call_config(self, config: Method, plan: "Plan") -> Method:
        """``config`` with the settings ``plan`` chose, at the step count it was planned for."""
        return plan.config

    def summary(self, plan: "Plan") -> str:
        """One line describing the plan's schedule (CLI)."""
        return ", ".join(f"{k} {v}" for k, v in plan.config.to_dict().items() if k != "method")


PLANNERS: dict[str, Planner] = {}  # method name -> planner, in registration order
_discovered = False


def register_planner(cls: type[Planner]) -> type[Planner]:
    """Class decorator: make ``cls`` the planner of ``cls.method``."""
    PLANNERS[cls.method.name] = cls()
    return cls


def _discover() -> None:
    """Import every ``plan_*`` module of this package once (their planners register themselves),
    in name order, so the order planners are tried in is fixed."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module(__package__)
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("plan_")):
        importlib.import_module(f"{__package__}.{module}")
    _discovered = True


def planners_for(family: str) -> list[Planner]:
    """The planners of the methods that run on ``family``."""
    _discover()
    return [planner for planner in PLANNERS.values() if planner.applies_to(family)]


def planner_for(method: str) -> Planner:
    _discover()
    if method not in PLANNERS:
        raise ValueError(f"No planner for method {method!r}; planners exist for {', '.join(PLANNERS)}.")
    return PLANNERS[method]

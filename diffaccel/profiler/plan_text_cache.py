"""TextCache's planner: what computing the text-only modules once per call saves, from the profile.

TextCache is lossless, so its plan has no error: it meets a target alone where its saving is
enough (e.g. 1.2x on a model whose captions are long against its latents), and the step planner
composes it under its own schedules (:mod:`~diffaccel.profiler.plan_step_cache`). Both count it only
where it caches at the profile's call shape: text tokens at least ``TEXT_CACHE_MIN_RATIO`` of the
visual ones, as in the presets (at 512-1024 px it saves under 0.5% of a step; eval/results/text_cache.md).

Saving model: the first denoiser call of a generation computes the text-only modules (per CFG half
in the same call, so once), every later call reuses them; on a step whose blocks are skipped the
modules inside the blocks were not run anyway, so only those outside (the text projection) count.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffaccel.families import TEXT_CACHE_MIN_RATIO
from diffaccel.methods.text_cache import TextCache
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, wall_speedup
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.profile import Profile


@dataclass(frozen=True)
class TextSaving:
    """FLOPs per denoiser call of the text-only modules outside and inside the blocks."""

    outside: float
    inside: float
    modules: tuple[str, ...]


def text_saving(profile: Profile) -> TextSaving | None:
    """What TextCache saves per call at the profile's shape (None: it would cache nothing there, or
    the profile predates text-module costs)."""
    costs = profile.costs
    flops, tokens = costs.get("text_modules"), costs.get("tokens")
    if not flops or not tokens or tokens["visual"] <= 0 or tokens["text"] < TEXT_CACHE_MIN_RATIO * tokens["visual"]:
        return None
    inside_blocks = tuple(b + "." for b in costs.get("blocks", []))
    inside = sum(f for p, f in flops.items() if p.startswith(inside_blocks))
    return TextSaving(float(sum(flops.values()) - inside), float(inside), tuple(flops))


def step_costs(profile: Profile, computed: list[bool], block_flops: float, text: TextSaving | None) -> list[float]:
    """FLOPs of each step's denoiser call: full where computed, without the blocks where skipped, and
    without the text-only modules from the second step on when ``text`` is composed."""
    full = float(profile.costs["call"])
    out = []
    for i, c in enumerate(computed):
        cost = full if c else full - block_flops
        if text is not None and i > 0:
            cost -= text.outside + (text.inside if c else 0.0)
        out.append(cost)
    return out


def composed() -> TextCache:
    """The TextCache a plan that counts on it installs (the presets' one)."""
    return TextCache(required=False, min_text_ratio=TEXT_CACHE_MIN_RATIO)


@register_planner
class TextCachePlanner(Planner):
    """TextCache alone: a fixed, lossless saving."""

    method = TextCache

    def timed_modules(self, adapter) -> set[str]:
        return set(adapter.text_modules())

    def costs(self, adapter, module_flops: dict[str, int]) -> dict:
        return {"text_modules": {p: module_flops.get(p, 0) for p in adapter.text_modules()}}

    def plan(self, profile, times, target, like=None) -> Plan:
        plan = self.simulate(profile, times, like or composed())
        if plan.speedup < target - 1e-9:
            reason = "it caches nothing at the profile's shape" if plan.speedup == 1.0 else f"it reaches {plan.speedup:.2f}x"
            raise UnreachableTarget(f"TextCache alone cannot reach {target:g}x ({reason})")
        return plan

    def simulate(self, profile, times, config) -> Plan:
        text = text_saving(profile)
        costs = step_costs(profile, [True] * len(times), 0.0, text)
        speed = float(profile.costs["call"]) * len(costs) / sum(costs)
        skipped = text.modules if text is not None else ()
        return Plan("text_cache", config, speed, wall_speedup(profile, speed, skipped), 0.0, [True] * len(times),
                    "lossless" if text is not None else "caches nothing at the profile's shape")

    def summary(self, plan) -> str:
        return "text-only modules computed once per call (lossless)"

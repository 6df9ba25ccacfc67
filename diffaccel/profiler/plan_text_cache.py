"""TextCache's planner: what computing the text-only modules once per call saves, from the profile.

TextCache is lossless, so its plan has no error: it meets a target alone where its saving is
enough (e.g. 1.2x on a model whose captions are long against its latents), and the step planner
composes it under its own schedules (:mod:`~diffaccel.profiler.plan_step_cache`). Both count it only
where it caches at the profile's call shape: text tokens at least ``TEXT_CACHE_MIN_RATIO`` of the
visual ones, as in the presets (at 512-1024 px it saves under 0.5% of a step; eval/results/text_cache.md).

Saving model: the first denoiser call of a generation computes the text-only modules (per CFG half
in the same call, so once), every later call reuses them; on a step whose blocks are skipped the
modules inside the blocks were not run anyway, so only those outside (the text projection) count.

A speed-up target is planned in FLOPs, which stands for wall time only where the saved work's time
follows its FLOPs. So TextCache is counted only where its modules' measured share of a call's time is
at least ``WALL_EFFICIENCY`` of their FLOPs share, relative to the blocks' (whose skipping the step
plans are made of). On the bundled 32-pixel models it is not (0.50 / 0.44 against the blocks' 0.93 /
0.95: small projections are dominated by fixed per-op costs); counting it there made ``target_speedup=3``
on tiny-video meet 3.24x in FLOPs at 41 dB but only 2.0x in denoiser wall, where the schedule alone
gives 3.1x (eval/results/frontier.md). Add it yourself there: ``methods=[TextCache(), StepCache(...)]``.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffaccel.families import TEXT_CACHE_MIN_RATIO
from diffaccel.methods.text_cache import TextCache
from diffaccel.profiler.plan_common import Plan, UnreachableTarget, wall_speedup, wall_speedup_per_step
from diffaccel.profiler.planner import Planner, register_planner
from diffaccel.profiler.profile import Profile

WALL_EFFICIENCY = 0.9  # least share of the blocks' time per FLOP the text modules must show to be counted


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


def wall_efficiency(profile: Profile, text: TextSaving) -> float | None:
    """The text modules' share of a call's measured time over their FLOPs share, relative to the same
    ratio of the blocks (None: no module timings in the profile)."""
    costs = profile.costs
    seconds, call = costs.get("module_seconds"), costs.get("call_seconds")
    blocks = costs.get("blocks", [])
    if not seconds or not call or not all(m in seconds for m in (*text.modules, *blocks)):
        return None

    def ratio(names, flops):
        return (sum(seconds[m] for m in names) / float(call)) / (flops / float(costs["call"])) if flops > 0 else 0.0

    block_ratio = ratio(blocks, sum(costs["modules"].get(b, 0) for b in blocks))
    return ratio(text.modules, text.outside + text.inside) / block_ratio if block_ratio > 0 else None


def counted(profile: Profile) -> TextSaving | None:
    """The saving a speed-up plan may count: TextCache caches at the profile's shape and its time
    follows its FLOPs (see the module doc)."""
    text = text_saving(profile)
    if text is None:
        return None
    efficiency = wall_efficiency(profile, text)
    return text if efficiency is None or efficiency >= WALL_EFFICIENCY else None


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


def step_time_saved(profile: Profile, computed: list[bool], blocks: list[str], text: TextSaving | None) -> list[float] | None:
    """Per step, the measured share of a denoiser call's wall time not run (None: the profile has no
    module timings). Per step rather than one FLOPs-to-time ratio: the text modules' time per FLOP is
    far from the blocks' on small models (their wall gain is half their FLOPs gain on the bundled ones)."""
    seconds, call = profile.costs.get("module_seconds"), profile.costs.get("call_seconds")
    if not seconds or not call:
        return None

    def share(names) -> float:
        return sum(seconds.get(m, 0.0) for m in names) / float(call)

    inside = [m for m in (text.modules if text else ()) if m.startswith(tuple(b + "." for b in blocks))]
    outside = [m for m in (text.modules if text else ()) if m not in inside]
    out = []
    for i, c in enumerate(computed):
        saved = 0.0 if c else share(blocks)
        if text is not None and i > 0:
            saved += share(outside) + (share(inside) if c else 0.0)
        out.append(min(saved, 0.99))
    return out


def composed() -> TextCache:
    """The TextCache a plan that counts on it installs (the presets' one)."""
    return TextCache(required=False, min_text_ratio=TEXT_CACHE_MIN_RATIO)


@register_planner
class TextCachePlanner(Planner):
    """TextCache alone: a fixed, lossless saving."""

    method = TextCache
    preference = 2  # lossless: where its saving alone meets a target, nothing beats it

    def timed_modules(self, adapter) -> set[str]:
        return set(adapter.text_modules())

    def costs(self, adapter, module_flops: dict[str, int]) -> dict:
        return {"text_modules": {p: module_flops.get(p, 0) for p in adapter.text_modules()}}

    def plan(self, profile, times, target, like=None) -> Plan:
        text = text_saving(profile)
        if text is None:
            raise UnreachableTarget("TextCache caches nothing at the profile's shape")
        if counted(profile) is None:
            raise UnreachableTarget(f"TextCache's measured time gain is {wall_efficiency(profile, text):.0%} of the "
                                    "blocks' per FLOP: a FLOPs target would overstate its speed-up")
        plan = self.simulate(profile, times, like or composed())
        if plan.speedup < target - 1e-9:
            raise UnreachableTarget(f"TextCache alone reaches {plan.speedup:.2f}x, not {target:g}x")
        return plan

    def simulate(self, profile, times, config) -> Plan:
        text = text_saving(profile)
        costs = step_costs(profile, [True] * len(times), 0.0, text)
        speed = float(profile.costs["call"]) * len(costs) / sum(costs)
        saved = step_time_saved(profile, [True] * len(times), profile.costs.get("blocks", []), text)
        wall = wall_speedup_per_step(profile, saved) if saved is not None else wall_speedup(profile, speed)
        return Plan("text_cache", config, speed, wall, 0.0, [True] * len(times),
                    "lossless" if text is not None else "caches nothing at the profile's shape")

    def summary(self, plan) -> str:
        return "text-only modules computed once per call (lossless)"

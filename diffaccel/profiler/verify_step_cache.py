"""Verified StepCache schedules: the planned schedules run for real, their Pareto front kept in the profile.

The step graph predicts a schedule's error as the sum of its edges' errors, which mispredicts long
runs of skips. So the graph's candidates (every step count's shortest path, both forecast orders,
the evenly spread schedules) are run as real generations on calibration prompts and scored by the
pooled PSNR (of the mean MSE over the seeds) against the unaccelerated output; the Pareto front of
(FLOPs speed-up, PSNR) goes into ``profile.calibration["step_cache_verified"]``, and the planner
chooses among it (:func:`~diffaccel.profiler.plan_step_cache.verified`): ``StepCache(min_psnr=...)``
and the presets built on it then run the fastest schedule that *measured* that PSNR.

Validation re-runs every schedule on the front on further seed sets and keeps its lowest PSNR (a
schedule tuned to one set of seeds loses its place); seeds whose unaccelerated output changes under
a 1e-4 perturbation of the initial noise (chaotic ones) are left out there, since no schedule can
match them. A stress set (:meth:`SeedSet.stress`) is the most fragile seeds of a screened pool, those
one skipped step turns into another image. ``refine`` rounds of local search try every schedule that skips one step more, or one fewer,
than one on the front; without validation they overfit the verification seeds, and even with it a
schedule they find can be the luckiest of many (``confirm``: it must also beat the one it replaces on
seeds the search never used).

``diffaccel profile MODEL --step-graph N --verify M --validate K`` runs all of this;
eval/add_step_graph.py does it for the bundled models.
"""
from __future__ import annotations

import math

from diffaccel.pipelines import detect
from diffaccel.profiler.plan_step_cache import VERIFIED, graph_candidates, one_fewer_skip, one_more_skip, plan_of_mask
from diffaccel.profiler.profile import Profile
from diffaccel.profiler.reuse_error import noise_sensitivity, skip_fragility, verify_step_schedules

CHAOTIC_DB = 60.0  # ordinary seeds measure 87-104 dB under a 1e-4 perturbation, chaotic ones ~33
STATISTIC = "pooled PSNR (dB, of the mean MSE) over the calibration prompts vs the unaccelerated output"


def pareto(runs: list[dict]) -> list[dict]:
    """The runs no other run beats in both FLOPs speed-up (or ties) and PSNR, slowest first."""
    return sorted((r for r in runs if not any(o["speedup"] >= r["speedup"] and o["psnr"] > r["psnr"] and o is not r
                                              for o in runs)), key=lambda r: r["speedup"])


def distinct(plans: list) -> list:
    """One plan per schedule (mask and forecast orders): running a schedule twice measures nothing new."""
    return list({p.config.mask + tuple(p.config.forecast_orders or ()): p for p in plans}.values())


def run_plans(pipe, profile: Profile, plans: list, prompts: list, seeds: list[int], call_kwargs: dict,
              progress: bool = False) -> list[dict]:
    """Each plan run on ``prompts`` / ``seeds``: mask, orders, pooled / mean / worst PSNR and its FLOPs speed-up."""
    runs = verify_step_schedules(pipe, detect(pipe), prompts, seeds, call_kwargs, [p.config for p in plans], progress=progress)
    for run, plan in zip(runs, plans):
        run["speedup"] = round(plan.speedup, 4)
    return runs


class SeedSet:
    """A validation set: ``check(runs)`` re-runs schedules on it and lowers their PSNR to what holds there."""

    def __init__(self, pipe, profile: Profile, prompts: list, seeds: list[int], call_kwargs: dict, name: str,
                 progress: bool = False, keep: int | None = None):
        sensitivity = noise_sensitivity(pipe, prompts, seeds, call_kwargs)
        self.chaotic = [s for s, db in zip(seeds, sensitivity) if db < CHAOTIC_DB]
        self.kept = [(p, s) for p, s in zip(prompts, seeds) if s not in self.chaotic][:keep]
        if not self.kept:
            raise ValueError(f"Every validation seed of {name} is chaotic (its output changes under a 1e-4 noise "
                             "perturbation); validate on other seeds.")
        self.pipe, self.profile, self.call_kwargs, self.spec, self.progress = pipe, profile, call_kwargs, name, progress
        self.info = {name: {"seeds": [s for _, s in self.kept], "left_out_chaotic": self.chaotic}}
        self.share: float | None = None  # a stress set: the share of the screened pool its seeds stand for

    @classmethod
    def stress(cls, pipe, profile: Profile, prompts: list, seeds: list[int], call_kwargs: dict, keep: int,
               progress: bool = False) -> "SeedSet":
        """The ``keep`` (prompt, seed) pairs of a screened pool whose output one skipped step changes most
        (:func:`~diffaccel.profiler.reuse_error.skip_fragility`; chaotic ones left out), as a validation set.

        Why: on tiny-dit a rare seed (2 of 256 training seeds, besides 2 chaotic ones; 1-8 in held-out sets
        of 64-128) turns into another image when one step is skipped (14.5-17.5 dB for the ones screened). Seed sets of 12-24
        without one rewarded plans that skip early steps, and on the held-out sets with one the quality and
        balanced presets' pooled-PSNR promises broke (eval/results/step_cache.md). Validating on the pool's
        most fragile seeds alone would keep only schedules that leave every one of them whole, which on
        tiny-dit took most of the speed (quality: no skip left). So the set stands for its share
        ``keep / len(seeds)`` of the pool (:func:`stratified_psnr`): a schedule's PSNR then estimates the
        pooled PSNR over a population in which fragile seeds are as frequent as in the pool."""
        fragility = skip_fragility(pipe, detect(pipe), prompts, seeds, call_kwargs, progress=progress)
        order = sorted(range(len(seeds)), key=lambda k: (fragility[k], seeds[k]))[:2 * keep]
        name = f"stress {seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else "stress"
        out = cls(pipe, profile, [prompts[k] for k in order], [seeds[k] for k in order], call_kwargs, name, progress, keep)
        lowest = dict(zip(seeds, fragility))
        out.share = keep / len(seeds)
        out.info[name].update(screened=len(seeds), share=out.share,
                              single_skip_psnr=[round(lowest[s], 2) for _, s in out.kept])  # per kept seed
        return out

    def __call__(self, runs: list[dict]) -> None:
        for r, value in zip(runs, self.measure(runs)):
            r.setdefault("psnr_sets", {"verification": r["psnr"]})[self.spec] = value
            if self.share is not None:
                r.setdefault("stress_shares", {})[self.spec] = self.share
            r["psnr"] = stratified_psnr(r["psnr_sets"], r.get("stress_shares", {}))

    def measure(self, runs: list[dict]) -> list[float]:
        """The pooled PSNR of each run's schedule on this set's seeds."""
        if not runs:
            return []
        plans = [plan_of_mask(self.profile, r["mask"], r["orders"], math.inf, "validation") for r in runs]
        measured = run_plans(self.pipe, self.profile, plans, [p for p, _ in self.kept], [s for _, s in self.kept],
                             self.call_kwargs, self.progress)
        return [round(m["psnr"], 3) for m in measured]


def stratified_psnr(psnr_sets: dict[str, float], shares: dict[str, float]) -> float:
    """A schedule's PSNR from its seed sets: the lowest over the ordinary sets, each stress set (its seeds
    the most fragile ``share`` of a screened pool, ``shares``) then weighed in at its share of the pool:
    ``-10 log10(share * MSE_stress + (1 - share) * MSE_ordinary)``, the pooled MSE of a seed population in
    which fragile seeds are as frequent as in the pool (the lowest over stress sets where there are several)."""
    ordinary = min(v for k, v in psnr_sets.items() if k not in shares)
    out = ordinary
    for name, share in shares.items():
        mse = share * 10.0 ** (-psnr_sets[name] / 10.0) + (1.0 - share) * 10.0 ** (-ordinary / 10.0)
        out = min(out, -10.0 * math.log10(mse))
    return out


def validate_front(checks: list, runs: list[dict]) -> list[dict]:
    """The front of ``runs`` once every schedule on it is validated on every seed set (only those pay for
    validation; one that was dominated by a schedule whose PSNR validation lowered may surface, so repeat)."""
    while True:
        todo = [(c, [r for r in pareto(runs) if c.spec not in r.get("psnr_sets", {})]) for c in checks]
        if not any(rs for _, rs in todo):
            return pareto(runs)
        for check, rs in todo:
            check(rs)


def store_front(profile: Profile, times: list[float], seeds: list[int], runs: list[dict], validation: dict | None = None) -> dict:
    """Put the Pareto front of ``runs`` into ``profile.calibration`` (kept validation info included); return it."""
    old = (profile.calibration or {}).get(VERIFIED, {})
    validation = {**old.get("validation", {}), **(validation or {})}
    entry = {"times": list(times), "seeds": list(seeds), "runs": pareto(runs), "statistic": STATISTIC}
    if validation:
        entry["validation"] = validation
        entry["statistic"] += "; psnr = the lowest over psnr_sets (verification and validation seeds)"
        if any("share" in v for v in validation.values()):
            entry["statistic"] += (", a stress set weighed in at its share of the screened pool "
                                   "(diffaccel.profiler.verify_step_cache.stratified_psnr)")
    profile.calibration[VERIFIED] = entry
    return entry


def refine_front(pipe, profile: Profile, runs: list[dict], prompts: list, seeds: list[int], call_kwargs: dict,
                 checks=(), rounds: int = 0, speedups: tuple[float, float] = (1.2, 3.0), progress: bool = False,
                 confirm: SeedSet | None = None) -> list[dict]:
    """``runs`` validated by ``checks`` (:class:`SeedSet`), then ``rounds`` of local search around the front
    (schedules of FLOPs speed-up within ``speedups``: one skip more and one fewer than a front schedule),
    each new schedule run on ``prompts`` / ``seeds``; with ``confirm``, see :func:`confirm_changes`."""
    runs = validate_front(list(checks), runs)
    before = pareto(runs)
    tried = {tuple(r["mask"]) + tuple(r["orders"]) for r in runs}
    for _ in range(rounds):
        todo = {}
        for r in pareto(runs):
            if speedups[0] <= r["speedup"] <= speedups[1]:
                for mask, orders in one_more_skip(r["mask"], r["orders"]) + one_fewer_skip(r["mask"], r["orders"]):
                    key = tuple(int(c) for c in mask) + tuple(orders)
                    if key not in tried:
                        todo[key] = plan_of_mask(profile, mask, orders, math.inf, "local search")
        tried |= set(todo)
        if not todo:
            break
        new = run_plans(pipe, profile, list(todo.values()), prompts, seeds, call_kwargs, progress)
        runs = validate_front(list(checks), runs + new)
    return runs if confirm is None else confirm_changes(confirm, before, runs, list(checks))


def _key(run: dict) -> tuple:
    return tuple(int(c) for c in run["mask"]) + tuple(run["orders"])


def confirm_changes(confirm: SeedSet, before: list[dict], runs: list[dict], checks: list) -> list[dict]:
    """The front of ``runs`` where every schedule the search put there beats, on ``confirm`` (a seed set
    the search never measured), the schedule of the front ``before`` it that a PSNR target would have
    taken at its cost (the slowest one at least as fast); a new schedule that does not is dropped.

    Why: the search keeps the best of hundreds of schedules measured on the same seeds, so a winner's
    PSNR there is biased up. On tiny-dit two rounds over the whole range raised the front by up to 2 dB
    on the training seeds and lost up to 4 dB at one cost on held-out ones (eval/results/step_cache.md)."""
    known = {_key(r) for r in before}
    runs = runs + [b for b in before if _key(b) not in {_key(r) for r in runs}]  # the search keeps only its front
    score: dict[tuple, float] = {}
    while True:
        front = validate_front(checks, runs)
        todo = []
        for r in front:
            if _key(r) in known or "psnr_confirm" in r:
                continue
            old = min((o for o in before if o["speedup"] >= r["speedup"] - 1e-9), key=lambda o: o["speedup"], default=None)
            todo.append((r, old))
        if not todo:
            return front
        pending = {_key(x): x for pair in todo for x in pair if x is not None and _key(x) not in score}
        score.update(zip(pending, confirm.measure(list(pending.values()))))
        dropped = set()
        for r, old in todo:
            r["psnr_confirm"] = score[_key(r)]
            if old is not None and score[_key(r)] < score[_key(old)]:
                dropped.add(_key(r))
        runs = [r for r in runs if _key(r) not in dropped]


def verify_step_cache(pipe, profile: Profile, prompts: list, seeds: list[int], call_kwargs: dict, *,
                      validation: list[tuple[list, list[int]]] = (), refine: int = 0,
                      refine_range: tuple[float, float] = (1.2, 3.0), progress: bool = False,
                      confirm: tuple[list, list[int]] | None = None,
                      stress: tuple[list, list[int], int] | None = None) -> dict:
    """Verify the step graph's candidate schedules on ``prompts`` / ``seeds``, validate the front on each
    (prompts, seeds) set of ``validation`` and on the ``keep`` most fragile of ``stress`` = (prompts, seeds,
    keep) (:meth:`SeedSet.stress`), refine it ``refine`` rounds (what they change confirmed on the
    (prompts, seeds) of ``confirm``, :func:`confirm_changes`); store the front in ``profile`` and return its entry."""
    graph = (profile.reuse_error or {}).get("step_cache")
    if not graph:
        raise ValueError("Verifying StepCache schedules needs the profile's measured step graph: profile with "
                         "--step-graph N (N prompts, e.g. 2).")
    times = graph["times"]
    plans = distinct(graph_candidates(profile, times))
    runs = run_plans(pipe, profile, plans, prompts, seeds, call_kwargs, progress)
    checks = [SeedSet(pipe, profile, p, s, call_kwargs, f"{s[0]}-{s[-1]}", progress) for p, s in validation]
    if stress:
        checks.append(SeedSet.stress(pipe, profile, *stress[:2], call_kwargs, stress[2], progress))
    check = SeedSet(pipe, profile, *confirm, call_kwargs, f"confirm {confirm[1][0]}-{confirm[1][-1]}", progress) if confirm else None
    runs = refine_front(pipe, profile, runs, prompts, seeds, call_kwargs, checks, refine, refine_range, progress, check)
    info = {k: v for c in [*checks, *([check] if check else [])] for k, v in c.info.items()}
    return store_front(profile, times, seeds, runs, info)

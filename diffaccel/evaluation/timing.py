"""Latency and FLOPs of each config, and how far the latencies can be trusted.

Every config is put on the same pipeline in turn; its FLOPs are counted on one full call
(which also warms it up). Then rounds time every config once each — interleaved, in an order
rotated every round, so slow drift of the machine hits all configs alike — until each config's
median is known to within ``tolerance`` (its distribution-free 95% interval), or the time
budget or the round cap is reached. End-to-end time covers the whole pipeline call (text
encoder, VAE); denoiser time is the sum of the denoiser's forward calls, measured with hooks.

Besides the medians it reports their spread (interquartile range, minimum), the load average
while timing, and why the timings are doubtful, if they are: rounds that disagree, other work
on the machine, medians that never settled. Timings never change an output.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from diffaccel.flops import flop_counter

MIN_STABLE_SAMPLES = 3  # fewer rounds cannot show that a median settled
BUSY_SPREAD = 0.10  # interquartile range above this share of the median: the rounds disagree


@dataclass(frozen=True)
class TimingPlan:
    """How many interleaved rounds to time.

    ``min_rounds`` always run; more follow until every config's median is stable (its 95%
    interval within +-``tolerance`` of it), ``budget_s`` seconds of timing have passed, or
    ``max_rounds`` ran. ``budget_s=0`` times exactly ``min_rounds`` rounds.
    """

    min_rounds: int = 3
    budget_s: float = 60.0
    max_rounds: int = 25
    tolerance: float = 0.05

    def __post_init__(self):
        if self.min_rounds < 1:
            raise ValueError(f"At least one timing round is needed (the latency is a median), got {self.min_rounds}.")
        if not (self.budget_s >= 0 and math.isfinite(self.budget_s)):
            raise ValueError(f"The timing budget must be a number of seconds >= 0, got {self.budget_s}.")


def median_interval(samples: list[float]) -> tuple[float, float]:
    """Distribution-free ~95% interval of the median: order statistics n/2 -+ 0.98 sqrt(n)."""
    ordered, n = sorted(samples), len(samples)
    half = 0.98 * math.sqrt(n)
    low = max(int(math.floor(n / 2 - half)), 0)
    high = min(int(math.ceil(n / 2 + half)), n - 1)
    return ordered[low], ordered[high]


def is_stable(samples: list[float], tolerance: float) -> bool:
    if len(samples) < MIN_STABLE_SAMPLES:
        return False
    low, high = median_interval(samples)
    median = statistics.median(samples)
    return median > 0 and median - low <= tolerance * median and high - median <= tolerance * median


def stop_reason(samples: dict[str, list[float]], elapsed_s: float, plan: TimingPlan) -> str | None:
    """Why timing stops after these rounds ("stable", "time budget", "max rounds"), or None."""
    rounds = min(len(s) for s in samples.values())
    if rounds < plan.min_rounds:
        return None
    if all(is_stable(s, plan.tolerance) for s in samples.values()):
        return "stable"
    if rounds >= plan.max_rounds:
        return "max rounds"
    if elapsed_s >= plan.budget_s:
        return "time budget"
    return None


def spread(samples: list[float]) -> dict:
    """Median, quartiles, interquartile range and minimum of one config's times (seconds); the
    quartiles are None for a single round."""
    if len(samples) < 2:
        return {"median_s": samples[0], "q1_s": None, "q3_s": None, "iqr_s": None, "min_s": samples[0]}
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_s": statistics.median(samples), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": min(samples)}


def busy_reasons(times: dict[str, list[float]], stopped: str, loads: list[float], threads: int, cpus: int,
                 tolerance: float) -> list[str]:
    """Why these timings may not hold on an idle machine (empty when nothing says so)."""
    reasons = []
    for name, samples in times.items():
        s = spread(samples)
        if s["iqr_s"] is not None and s["median_s"] > 0 and s["iqr_s"] > BUSY_SPREAD * s["median_s"]:
            reasons.append(f"{name}: rounds spread over {100 * s['iqr_s'] / s['median_s']:.0f}% of the median (IQR)")
    others = max(loads, default=0.0) - threads  # the load average counts our own busy threads too
    if loads and others > max(0.5, 0.25 * cpus):
        reasons.append(f"load average {max(loads):.1f} on {cpus} cores while timing with {threads} "
                       f"thread{'s' if threads != 1 else ''}")
    if stopped != "stable" and len(next(iter(times.values()))) >= MIN_STABLE_SAMPLES:
        reasons.append(f"medians not within +-{100 * tolerance:g}% after {len(next(iter(times.values())))} rounds "
                       f"({stopped})")
    return reasons


def timing_rounds(configs: list[str], run: Callable[[str], dict[str, float]], plan: TimingPlan,
                  clock: Callable[[], float] = time.perf_counter, before_round: Callable[[int], None] | None = None):
    """Call ``run(config)`` (-> {clock name: seconds}) for every config, round after round in a
    rotated order, until :func:`stop_reason` says stop. Returns ({config: {clock: [seconds]}}, reason)."""
    times: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    start, rounds = clock(), 0
    while True:
        if before_round is not None:
            before_round(rounds)
        shift = rounds % len(configs)
        for config in configs[shift:] + configs[:shift]:
            for key, seconds in run(config).items():
                times[config].setdefault(key, []).append(seconds)
        rounds += 1
        reason = stop_reason({c: t["e2e"] for c, t in times.items()}, clock() - start, plan)
        if reason is not None:
            return times, reason


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class DenoiserClock:
    """Sums the wall time spent inside ``denoiser.forward`` while attached."""

    def __init__(self, denoiser: torch.nn.Module, device):
        self.total = 0.0
        self._start = None
        self._device = device
        self._handles = [denoiser.register_forward_pre_hook(self._enter),
                         denoiser.register_forward_hook(self._leave)]

    def _enter(self, *_):
        _sync(self._device)
        self._start = time.perf_counter()

    def _leave(self, *_):
        _sync(self._device)
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def count_call_flops(pipe, denoiser: torch.nn.Module, call) -> tuple[int, int]:
    """(end-to-end FLOPs, denoiser FLOPs) of one ``call()``."""
    with torch.no_grad(), flop_counter() as counter:
        call()
    per_module = counter.get_flop_counts()
    denoiser_flops = sum(per_module.get(type(denoiser).__name__, {}).values())
    return int(counter.get_total_flops()), int(denoiser_flops)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure(pipe, configs, call, plan: TimingPlan = TimingPlan(), warmup: int = 0, progress=None) -> dict:
    """FLOPs and latencies of every config, with their spread and how trustworthy they are.

    Returns ``{"configs": {name: {flops, denoiser_flops, flops_saved_estimate, e2e_s, denoiser_s,
    e2e: spread, denoiser: spread}}, "rounds", "stopped", "load_average", "threads", "cpus", "busy"}``.
    """
    from diffaccel import stats
    from diffaccel.api import session_of
    from diffaccel.pipelines import detect

    denoiser = detect(pipe).denoiser
    device = pipe.device
    by_name = {config.name: config for config in configs}
    results = {}
    for config in configs:
        config.apply(pipe)
        total, in_denoiser = count_call_flops(pipe, denoiser, call)
        estimate = stats(pipe).get("flops_saved_fraction") if session_of(pipe) is not None else 0.0
        for _ in range(warmup):
            call()
        results[config.name] = {"flops": total, "denoiser_flops": in_denoiser, "flops_saved_estimate": estimate}
        if progress:
            progress.update(1)

    def run(name: str) -> dict[str, float]:
        by_name[name].apply(pipe)
        clock = DenoiserClock(denoiser, device)
        try:
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            elapsed = time.perf_counter() - start
        finally:
            clock.close()
        if progress:
            progress.update(1)
        return {"e2e": elapsed, "denoiser": clock.total}

    loads = []

    def before_round(index: int) -> None:
        loads.append(load_average())
        if progress and index >= plan.min_rounds:
            progress.add_total(len(configs))  # a round beyond the planned ones

    times, stopped = timing_rounds(list(by_name), run, plan, before_round=before_round)
    loads = [x for x in loads + [load_average()] if x is not None]
    import diffaccel

    diffaccel.disable(pipe)
    for name, entry in results.items():
        entry.update(e2e_s=times[name]["e2e"], denoiser_s=times[name]["denoiser"],
                     e2e=spread(times[name]["e2e"]), denoiser=spread(times[name]["denoiser"]))
    threads = 1 if torch.device(device).type == "cuda" else min(torch.get_num_threads(), cpu_count())
    return {"configs": results, "rounds": len(next(iter(times.values()))["e2e"]), "stopped": stopped,
            "load_average": [round(x, 2) for x in loads], "threads": threads, "cpus": cpu_count(),
            "busy": busy_reasons({n: t["e2e"] for n, t in times.items()}, stopped, loads, threads, cpu_count(),
                                 plan.tolerance)}

"""Latency and FLOPs of each config, measured the way DESIGN §5 asks.

Every config is put on the same pipeline in turn; its FLOPs are counted on one full call
(which also warms it up), then ``repeats`` rounds time every config once per round —
interleaved, so slow drift of the machine (other jobs, clocks) hits all configs alike — and
the median is reported. End-to-end time covers the whole pipeline call (text encoder, VAE);
denoiser time is the sum of the denoiser's forward calls, measured with module hooks.
"""
from __future__ import annotations

import statistics
import time

import torch

from diffaccel.flops import flop_counter  # counts attention on CPU, which torch counts as 0 FLOPs


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
    with flop_counter() as counter:
        call()
    per_module = counter.get_flop_counts()
    denoiser_flops = sum(per_module.get(type(denoiser).__name__, {}).values())
    return int(counter.get_total_flops()), int(denoiser_flops)


def measure(pipe, configs, call, repeats: int = 3, warmup: int = 0, progress=None) -> dict[str, dict]:
    """Per config name: FLOPs, diffaccel's own FLOPs-saved estimate, median latencies (s)."""
    from diffaccel import stats
    from diffaccel.api import session_of
    from diffaccel.pipelines import detect

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1 (the latency is a median), got {repeats}.")
    denoiser = detect(pipe).denoiser
    device = pipe.device
    results = {}
    for config in configs:
        config.apply(pipe)
        total, in_denoiser = count_call_flops(pipe, denoiser, call)
        estimate = stats(pipe).get("flops_saved_fraction") if session_of(pipe) is not None else 0.0
        for _ in range(warmup):
            call()
        results[config.name] = {"flops": total, "denoiser_flops": in_denoiser, "flops_saved_estimate": estimate,
                                "e2e_s": [], "denoiser_s": []}
        if progress:
            progress.update(1)
    for _ in range(repeats):
        for config in configs:
            config.apply(pipe)
            clock = DenoiserClock(denoiser, device)
            try:
                _sync(device)
                start = time.perf_counter()
                call()
                _sync(device)
                elapsed = time.perf_counter() - start
            finally:
                clock.close()
            results[config.name]["e2e_s"].append(elapsed)
            results[config.name]["denoiser_s"].append(clock.total)
            if progress:
                progress.update(1)
    for entry in results.values():
        entry["e2e_median_s"] = statistics.median(entry["e2e_s"])
        entry["denoiser_median_s"] = statistics.median(entry["denoiser_s"])
    import diffaccel

    diffaccel.disable(pipe)
    return results

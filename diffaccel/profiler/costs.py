"""What one denoiser call costs, per module: FLOPs (counted) and wall seconds (timed).

The planners predict speed-ups from these: FLOPs for the denoiser-FLOPs prediction, seconds for
the wall-clock one (on small models a block's time is far from proportional to its FLOPs), and
the half-batch time ratio for batched CFG, where a reusing CFG half still leaves the other half
of the batch to run. Each planner adds the modules it needs timed and its own cost entries.
"""
from __future__ import annotations

import statistics
import time

import torch


def generate(pipe, prompt, call_kwargs, seed):
    """One pipeline call with a seeded generator (the prompt omitted for unconditional models)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed)
    kwargs = dict(call_kwargs)
    if prompt is not None:
        kwargs["prompt"] = prompt
    with torch.no_grad():
        return pipe(generator=generator, **kwargs)


def measure_costs(pipe, adapter, prompt: str, call_kwargs: dict, seed: int, planners=()) -> dict:
    """FLOPs and wall seconds of one denoiser call per module, and the denoiser's share of a generation.

    Wall seconds per module matter because a skipped module saves its *time*, and on small
    models the time of a block is not proportional to its FLOPs (fixed per-op costs): the
    wall-clock prediction scales each method's FLOPs saving by its modules' seconds per FLOP.
    ``planners`` (:class:`~diffaccel.profiler.planner.Planner`) add modules to time and entries.
    """
    from diffaccel.flops import count_flops

    denoiser = adapter.denoiser
    keep = {name for name, _ in adapter.blocks()} | {info.name for info in adapter.attention_modules()}
    for planner in planners:
        keep |= planner.timed_modules(adapter)
    first_call: list = []
    busy = {"start": 0.0, "total": 0.0, "calls": 0}
    module_total = dict.fromkeys(keep, 0.0)
    module_start: dict[str, float] = {}
    clock = _clock(denoiser)

    def before(module, args, kwargs):
        if not first_call:
            first_call.append((args, dict(kwargs)))
        busy["start"] = clock()

    def after(module, args, kwargs, output):
        if busy["calls"]:  # the first call pays one-off costs (allocator, lazy init): not timed
            busy["total"] += clock() - busy["start"]
        busy["calls"] += 1

    def timed(name):
        def start(module, args):
            module_start[name] = clock()

        def stop(module, args, output):
            if busy["calls"]:
                module_total[name] += clock() - module_start[name]
        return start, stop

    handles = [denoiser.register_forward_pre_hook(before, with_kwargs=True),
               denoiser.register_forward_hook(after, with_kwargs=True)]
    for name in keep:
        start, stop = timed(name)
        module = denoiser.get_submodule(name)
        handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]
    try:
        kwargs = {k: v for k, v in call_kwargs.items() if k != "output_type"}
        start = clock()
        generate(pipe, prompt, kwargs, seed)
        wall = clock() - start
    finally:
        for h in handles:
            h.remove()
    args, kwargs = first_call[0]
    blocks = [name for name, _ in adapter.blocks()]
    block_inputs = []  # the last block's inputs, caught during the FLOP-counting call
    handle = denoiser.get_submodule(blocks[-1]).register_forward_pre_hook(
        lambda m, a, k: block_inputs.append((a, k)) if not block_inputs else None, with_kwargs=True)
    try:
        call, per_module = count_flops(denoiser, *args, **kwargs)
    finally:
        handle.remove()
    half = half_batch_time_ratio(denoiser.get_submodule(blocks[-1]), *block_inputs[0]) if block_inputs else None
    try:  # text and visual tokens of the profiled call (whether caching text-only work pays, see plan_text_cache)
        grid = adapter.grid_from_call(args, kwargs)
        tokens = {"text": int(grid.text_tokens), "visual": int(grid.num_visual)}
    except Exception:  # noqa: BLE001 - a call the adapter cannot read a grid from: nothing is planned from it
        tokens = None
    timed_calls = max(1, busy["calls"] - 1)
    call_seconds = busy["total"] / timed_calls
    steps = int(call_kwargs.get("num_inference_steps") or 1)
    costs = {
        "call": call,
        "blocks": [name for name, _ in adapter.blocks()],
        "modules": {p: per_module.get(p, 0) for p in sorted({""} | keep)},
        "calls_per_step": max(1, round(busy["calls"] / steps)),
        # The first (untimed) call's share is assumed equal to the others'.
        "denoiser_share": min(1.0, call_seconds * busy["calls"] / wall) if wall > 0 and busy["calls"] > 1 else 1.0,
        "seconds_per_generation": round(wall, 3),
        "call_seconds": call_seconds,
        "module_seconds": {p: module_total[p] / timed_calls for p in sorted(keep)},
        "half_batch_time_ratio": half,
        "tokens": tokens,
    }
    for planner in planners:
        costs.update(planner.costs(adapter, per_module))
    return costs


def _clock(module: torch.nn.Module):
    """A wall clock for ``module``'s work: on an accelerator its queued kernels finish first (without
    that a module's time is the time to launch its kernels, and the wall model reads nonsense)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


def half_batch_time_ratio(block, a, k, repeats: int = 15) -> float | None:
    """Time of ``block`` on half the batch over its time on the whole batch (median of repeats).

    A cache that reuses one CFG half of a batched call still runs the blocks on the other half;
    on small models that costs far more than half (fixed per-op costs). None when the denoiser's
    batch is odd or the block's inputs cannot be halved.
    """
    batch = a[0].shape[0] if a and isinstance(a[0], torch.Tensor) else None
    if not batch or batch % 2:
        return None

    def half(x):
        if isinstance(x, torch.Tensor):
            return x[: batch // 2] if x.ndim and x.shape[0] == batch else x
        if isinstance(x, dict):
            return {key: half(v) for key, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(half(v) for v in x)
        return x

    a2, k2 = half(a), half(k)
    times = {"full": [], "half": []}
    clock = _clock(block)
    try:
        with torch.no_grad():
            for i in range(repeats + 1):  # the first round warms up
                for name, (aa, kk) in (("full", (a, k)), ("half", (a2, k2))):
                    start = clock()
                    block(*aa, **kk)
                    if i:
                        times[name].append(clock() - start)
    except Exception:  # inputs that do not split along the batch: no measurement, FLOPs are used
        return None
    return statistics.median(times["half"]) / statistics.median(times["full"])



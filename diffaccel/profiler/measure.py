"""Measure a redundancy Profile: ordinary generations under the instrumentation hook.

Each prompt (with its own seed) is one instrumented generation; the per-step, per-module change
statistics of all of them are averaged (mean and spread across prompts) into a
:class:`~diffaccel.profiler.profile.Profile`. One extra, uninstrumented generation gives the
cost model (diffaccel/profiler/costs.py): FLOPs and wall seconds per module of one denoiser call,
and the share of wall time the denoiser takes (what a method can speed up at all). The planners
of the model's family add what they need measured (:mod:`diffaccel.profiler.planner`).

Long runs save every finished prompt to ``<out>.partial.json``; a rerun with the same settings
resumes from there.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from diffaccel.methods.instrument import record
from diffaccel.pipelines import detect
from diffaccel.profiler.costs import generate, measure_costs
from diffaccel.profiler.planner import Planner, planners_for
from diffaccel.profiler.profile import METRICS, Profile, ProfileError, write_json_atomic

TARGETS = ("blocks", "attention", "output")


def run_summary(rows: list[dict]) -> dict:
    """Per-step table of one generation: times, modules, and metric[step][module] (calls averaged)."""
    modules: list[tuple[str, str]] = []
    times: dict[int, float] = {}
    sums: dict[tuple[str, int, str], list[float]] = {}
    for r in rows:
        key = (r["module"], r["kind"])
        if key not in modules:
            modules.append(key)
        times.setdefault(r["step"], r["t_norm"])
        for metric in METRICS:
            if r.get(metric) is not None:
                sums.setdefault((metric, r["step"], r["module"]), []).append(r[metric])
        for half, value in r.get("residual_rel_l1_by_half", {}).items():  # AdaptiveCache's per-half signal
            sums.setdefault((half_metric(half), r["step"], r["module"]), []).append(value)
    steps = max(times) + 1 if times else 0
    metrics = list(METRICS) + sorted({key[0] for key in sums} - set(METRICS))
    values = {
        metric: [[_mean(sums.get((metric, s, name))) for name, _ in modules] for s in range(steps)] for metric in metrics
    }
    return {"times": [times.get(s) for s in range(steps)], "modules": [list(m) for m in modules], "values": values}


def half_metric(half: str) -> str:
    """Stats key of the block residual change of one CFG half, e.g. ``residual_rel_l1@cond``."""
    return f"residual_rel_l1@{half}"


def _mean(vals):
    return sum(vals) / len(vals) if vals else None


def aggregate(runs: list[dict]) -> tuple[list[float], list[dict], dict]:
    """Mean and standard deviation across runs, per step and module."""
    first = runs[0]
    for r in runs[1:]:
        if r["modules"] != first["modules"] or len(r["times"]) != len(first["times"]):
            raise ProfileError("Profiled generations disagree on steps or modules; profile with one scheduler and step count.")
    stats = {}
    for metric in [m for m in first["values"] if all(m in r["values"] for r in runs)]:
        mean_rows, std_rows = [], []
        for s in range(len(first["times"])):
            mean_row, std_row = [], []
            for j in range(len(first["modules"])):
                vals = [r["values"][metric][s][j] for r in runs if r["values"][metric][s][j] is not None]
                m = _mean(vals)
                mean_row.append(m)
                std_row.append(None if m is None else (sum((v - m) ** 2 for v in vals) / len(vals)) ** 0.5)
            mean_rows.append(mean_row)
            std_rows.append(std_row)
        if any(v is not None for row in mean_rows for v in row):
            stats[metric] = {"mean": mean_rows, "std": std_rows}
    modules = [{"name": n, "kind": k} for n, k in first["modules"]]
    return first["times"], modules, stats


def measure(pipe, prompts: list[str | None], call_kwargs: dict, *, model: str = "", seeds: list[int] | None = None,
            partial_path=None, progress: bool = True, describe: dict | None = None, ranks=None,
            step_graph: int = 0) -> Profile:
    """Profile ``pipe`` over ``prompts`` (one generation each, seed ``seeds[i]``, default i).

    ``call_kwargs`` are the pipeline call arguments (num_inference_steps, height, ...);
    ``partial_path`` keeps finished generations so an interrupted run resumes. ``ranks`` (an
    object with ``rank``, ``world``, ``gather(list) -> list`` and ``broadcast(value)``, e.g. the
    evaluation's ``Ranks``) spreads the prompts over processes: prompt i runs on rank i mod world,
    rank 0 times the modules, and every rank returns the same profile (the 1-process one, timings
    aside). ``step_graph`` > 0 measures StepCache's step graph on that many of the prompts (image
    and video DiTs).
    """
    if not prompts:
        raise ValueError("No prompts to profile with: give at least one prompt (the prompts file is empty?).")
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    adapter = detect(pipe)
    planners = planners_for(adapter.family)
    call_kwargs = {"output_type": "latent", **call_kwargs}
    signature = _plain({"model": model, "fingerprint": adapter.fingerprint(), "prompts": prompts, "seeds": seeds,
                        "scheduler": type(pipe.scheduler).__name__, "call_kwargs": call_kwargs})
    partial = _load_partial(partial_path, signature)
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    bar = _bar(len(prompts), progress, initial=len(partial["runs"]))
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    if partial.get("costs") is None and rank == 0:
        partial["costs"] = measure_costs(pipe, adapter, prompts[0], call_kwargs, seeds[0], planners)
        _save_partial(partial_path, partial)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        if str(i) in partial["runs"] or i % world != rank:
            continue
        with record(pipe, targets=TARGETS) as rec, contextlib.ExitStack() as stack:
            probes = {p.name: (p, stack.enter_context(p.probe(pipe, adapter))) for p in planners}
            generate(pipe, prompt, call_kwargs, seed)
        results = {name: p.probe_result(probe) for name, (p, probe) in probes.items() if probe is not None}
        partial["runs"][str(i)] = {**run_summary(rec.rows), **({"probes": results} if results else {})}
        partial["seconds"] = partial.get("seconds", 0.0) + time.perf_counter() - started
        started = time.perf_counter()
        _save_partial(partial_path, partial)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:  # every rank's runs (by prompt index), rank 0's module costs, the summed time
        partial["runs"] = dict(ranks.gather(sorted(partial["runs"].items())))
        partial["costs"] = ranks.broadcast(partial["costs"])
        partial["seconds"] = sum(ranks.gather([partial.get("seconds", 0.0)]))
    runs = [partial["runs"][str(i)] for i in range(len(prompts))]
    times, modules, stats = aggregate(runs)
    measured = {
        "prompts": len(prompts), "seeds": seeds, "steps": len(times), "scheduler": type(pipe.scheduler).__name__,
        "seconds": round(partial.get("seconds", 0.0), 2), "targets": list(TARGETS),
        "call_kwargs": {k: v for k, v in _plain(call_kwargs).items() if isinstance(v, (int, float, str, bool))},
        "statistic": "per step: mean over prompts of mean|x_t - x_prev| / mean|x_prev| (rel_l1) and cosine; "
                     "residual_* on block output minus input; CFG branches averaged",
        **(describe or {}),
    }
    profile = Profile(model=model, pipeline=adapter.name, family=str(adapter.family), fingerprint=_plain(adapter.fingerprint()),
                      times=[float(t) for t in times], modules=modules, stats=stats, costs=partial["costs"], measured=measured,
                      reuse_error=_reuse_tables(pipe, runs, planners))
    if step_graph > 0 and any(p.name == "step_cache" for p in planners):
        from diffaccel.profiler.reuse_error import step_skip_errors

        k = min(step_graph, len(prompts))
        profile.reuse_error["step_cache"] = step_skip_errors(pipe, adapter, prompts[:k], seeds[:k], call_kwargs,
                                                             progress=progress)
    return profile


def _reuse_tables(pipe, runs: list[dict], planners: list[Planner]) -> dict:
    """The planners' entries of ``profile.reuse_error``, from every run's probe results."""
    tables = {}
    for planner in planners:
        results = [r.get("probes", {}).get(planner.name) for r in runs]
        if all(result is not None for result in results):
            tables.update(planner.reuse_error(pipe, results))
    return tables


def _bar(total, enabled, initial=0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="profiling", unit="prompt")


def _load_partial(path, signature) -> dict:
    fresh = {"signature": signature, "runs": {}, "costs": None}
    if path is None or not Path(path).is_file():
        return fresh
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return fresh  # an unreadable partial file is only lost progress
    if data.get("signature") != signature:
        raise ProfileError(f"{path} holds a partial profile of a different run (model, prompts or settings differ). "
                           "Delete it to start over, or rerun with the original settings to resume.")
    return data


def _save_partial(path, data) -> None:
    if path is not None:
        write_json_atomic(Path(path), data)


def _plain(obj):
    def default(o):
        if isinstance(o, torch.Tensor):  # prompt embeddings etc.: identified by shape and a checksum
            return f"tensor{tuple(o.shape)}:{float(o.float().sum()):.6g}"
        return str(o)

    return json.loads(json.dumps(obj, default=default))

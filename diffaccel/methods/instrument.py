"""Instrumentation: record how much each block / attention output changes from step to step.

``Instrument`` is a method that changes nothing in the computation. During normal calls it
records, per step, CFG branch and module, the relative L1 change and the cosine similarity of
the module's output (and of a block's residual, output minus input) against the same module's
output at the previous step. The profiler builds on it::

    with diffaccel.instrument.record(pipe, targets=("blocks", "attention")) as rec:
        pipe(prompt, num_inference_steps=25)
    rec.rows  # [{"step", "branch", "t_norm", "module", "kind", "rel_l1", "cosine", ...}, ...]

Block rows also carry ``branch_residual_rel_l1``: the residual change per CFG branch name.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from diffaccel.methods.base import Installed, Method, register

TARGETS = ("blocks", "attention", "output")


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    sample = getattr(x, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def change(current: torch.Tensor, previous: torch.Tensor) -> tuple[float, float]:
    """(mean|a - b| / mean|b|, cosine(a, b)) in float32."""
    a, b = current.detach().float().flatten(), previous.detach().float().flatten()
    rel = ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    return rel, cos


@register
@dataclass
class Instrument(Method):
    """Record per-step, per-module change statistics (no effect on outputs).

    Args:
        targets: any of ``"blocks"`` (adapter blocks: output and residual change),
            ``"attention"`` (every classified attention module's output) and ``"output"``
            (the denoiser output).
    """

    name = "instrument"
    targets: tuple[str, ...] = ("blocks", "attention", "output")
    rows: list[dict] = field(default_factory=list, repr=False, compare=False)

    def validate(self) -> None:
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"Instrument targets must be among {TARGETS}, got {bad}.")

    def apply(self, session) -> "InstalledInstrument":
        return InstalledInstrument(self, session)


class InstalledInstrument(Installed):
    def __init__(self, config: Instrument, session):
        super().__init__(config, session)
        self.previous: dict[tuple[str, int, str], torch.Tensor] = {}
        adapter = session.adapter
        watch: list[tuple[str, torch.nn.Module, str]] = []
        if "blocks" in config.targets:
            watch += [(name, module, "block") for name, module in adapter.blocks()]
        if "attention" in config.targets:
            watch += [(info.name, info.module, info.kind) for info in adapter.attention_modules()]
        if "output" in config.targets:
            watch.append(("", adapter.denoiser, "output"))
        for name, module, kind in watch:
            handle = module.register_forward_hook(self._make_hook(name, kind), with_kwargs=True)
            self.on_remove(handle.remove)

    def reset_cache(self) -> None:
        self.previous = {}

    def _make_hook(self, name: str, kind: str):
        def hook(module, args, kwargs, output):
            ctx = self.session.ctx
            if not ctx.active:
                return None
            out = _first_tensor(output)
            if out is None:
                return None
            row = {"step": ctx.step, "branch": ctx.branch, "t_norm": ctx.t_norm, "module": name, "kind": kind}
            series = [("out", out)]
            inp = args[0] if args else kwargs.get("hidden_states")
            if kind == "block" and isinstance(inp, torch.Tensor) and inp.shape == out.shape:
                series.append(("res", out - inp))
            for tag, value in series:
                key = (name, ctx.branch, tag)
                prev = self.previous.get(key)
                if prev is not None and prev.shape == value.shape:
                    rel, cos = change(value, prev)
                    row["rel_l1" if tag == "out" else "residual_rel_l1"] = rel
                    row["cosine" if tag == "out" else "residual_cosine"] = cos
                self.previous[key] = value.detach().clone()
            if len(series) > 1:
                row.update(self._branch_changes(name, series[1][1]))
            self.config.rows.append(row)
            self.count("records")
            return None

        return hook

    def _branch_changes(self, name: str, residual: torch.Tensor) -> dict:
        """Residual change per CFG branch ("cond"/"uncond"): AdaptiveCache decides per branch, so its
        planner needs each branch's signal, not the batch-wide one (batched CFG mixes both halves)."""
        from diffaccel.methods.cache_common import branch_rows

        changes = {}
        for branch, rows in branch_rows(self.session, int(residual.shape[0])):
            value, key = residual[rows], (name, branch, "branch_res")
            prev = self.previous.get(key)
            if prev is not None and prev.shape == value.shape:
                changes[branch] = change(value, prev)[0]
            self.previous[key] = value.detach().clone()
        return {"branch_residual_rel_l1": changes} if changes else {}


@contextlib.contextmanager
def record(pipe, targets=("blocks", "attention", "output")):
    """Record change statistics of every call made inside the ``with`` block.

    The pipeline must not be accelerated (record measures the unaccelerated model); the
    instrumentation is removed on exit.
    """
    from diffaccel.api import accelerate, disable, session_of

    if session_of(pipe) is not None:
        raise ValueError("record() measures the unaccelerated model: call diffaccel.disable(pipe) first.")
    config = Instrument(targets=tuple(targets))
    accelerate(pipe, methods=[config])
    try:
        yield config
    finally:
        disable(pipe)

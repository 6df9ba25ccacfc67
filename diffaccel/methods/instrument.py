"""Instrumentation: record how much each block / attention output changes from step to step.

``Instrument`` is a method that changes nothing in the computation. During normal calls it
records, per step, denoiser call and module, the relative L1 change and the cosine similarity of
the module's output (and of a block's residual, output minus input) against the same module's
output at the previous step. The profiler builds on it::

    with diffaccel.instrument.record(pipe, targets=("blocks", "attention")) as rec:
        pipe(prompt, num_inference_steps=25)
    rec.rows  # [{"step", "call_index", "t_norm", "module", "kind", "rel_l1", "cosine", ...}, ...]

Block rows also carry ``residual_rel_l1_by_half``: the residual change per CFG half ("cond",
"uncond"), the signal AdaptiveCache decides on.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from diffaccel.methods.base import Installed, Method, register
from diffaccel.methods.cache_common import cfg_half_rows
from diffaccel.pipelines import detect
from diffaccel.state import attach, detach, session_of

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
@dataclass(frozen=True)
class Instrument(Method):
    """Record per-step, per-module change statistics (no effect on outputs).

    The rows are kept by the installed handle (``InstrumentInstalled.rows``) across the calls it
    sees; :func:`record` hands them out.

    Args:
        targets: any of ``"blocks"`` (adapter blocks: output and residual change),
            ``"attention"`` (every classified attention module's output) and ``"output"``
            (the denoiser output).
    """

    name: ClassVar[str] = "instrument"
    targets: tuple[str, ...] = TARGETS

    def validate(self) -> None:
        if not isinstance(self.targets, (tuple, list)):
            raise ValueError(f"Instrument targets must be a tuple of {TARGETS}, got {self.targets!r}; "
                             f"e.g. targets=('blocks',).")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"Instrument targets must be among {TARGETS}, got {bad}.")

    def apply(self, session) -> "InstrumentInstalled":
        return InstrumentInstalled(self, session)


class InstrumentInstalled(Installed):
    """Forward hooks on the watched modules; ``rows`` grows with every active call."""

    def __init__(self, config: Instrument, session):
        super().__init__(config, session)
        self.rows: list[dict] = []
        self.previous: dict[tuple[str, object, str], torch.Tensor] = {}
        adapter = session.adapter
        watch: list[tuple[str, torch.nn.Module, str]] = []
        if "blocks" in config.targets:
            watch += [(name, module, "block") for name, module in adapter.blocks()]
        if "attention" in config.targets:
            watch += [(info.name, info.module, info.kind) for info in adapter.attention_modules()]
        if "output" in config.targets:
            watch.append(("", adapter.denoiser, "output"))
        for name, module, kind in watch:
            # A partial of a bound method, not a closure: pickling the denoiser then reaches the
            # handle, which refuses with diffaccel's message.
            handle = module.register_forward_hook(functools.partial(self._hook, name, kind), with_kwargs=True)
            self.on_remove(handle.remove)

    def reset_cache(self) -> None:
        self.previous = {}

    def _hook(self, name: str, kind: str, module, args, kwargs, output):
        ctx = self.session.ctx
        if not ctx.active:
            return None
        out = _first_tensor(output)
        if out is None:
            return None
        row = {"step": ctx.step, "call_index": ctx.call_index, "t_norm": ctx.t_norm, "module": name, "kind": kind}
        series = [("out", out)]
        inp = args[0] if args else kwargs.get("hidden_states")
        if kind == "block" and isinstance(inp, torch.Tensor) and inp.shape == out.shape:
            series.append(("res", out - inp))
        for tag, value in series:
            key = (name, ctx.call_index, tag)
            prev = self.previous.get(key)
            if prev is not None and prev.shape == value.shape:
                rel, cos = change(value, prev)
                row["rel_l1" if tag == "out" else "residual_rel_l1"] = rel
                row["cosine" if tag == "out" else "residual_cosine"] = cos
            self.previous[key] = value.detach().clone()
        if len(series) > 1:
            row.update(self._changes_by_half(name, series[1][1]))
        self.rows.append(row)
        self.count("records")
        return None

    def _changes_by_half(self, name: str, residual: torch.Tensor) -> dict:
        """Residual change per CFG half: AdaptiveCache decides per half, so its planner needs each
        half's signal, not the batch-wide one (batched CFG mixes both halves)."""
        changes = {}
        for half, rows in cfg_half_rows(self.session.ctx, int(residual.shape[0])):
            value, key = residual[rows], (name, half, "half_res")
            prev = self.previous.get(key)
            if prev is not None and prev.shape == value.shape:
                changes[half] = change(value, prev)[0]
            self.previous[key] = value.detach().clone()
        return {"residual_rel_l1_by_half": changes} if changes else {}


@dataclass
class Recording:
    """The rows :func:`record` collected (one dict per module call; see the module docstring)."""

    rows: list[dict] = field(default_factory=list)


@contextlib.contextmanager
def record(pipe, targets=TARGETS) -> Iterator[Recording]:
    """Record change statistics of every call made inside the ``with`` block.

    The pipeline must not be accelerated (record measures the unaccelerated model); the
    instrumentation is removed on exit and the rows stay in the yielded :class:`Recording`.
    """
    if session_of(pipe) is not None:
        raise ValueError("record() measures the unaccelerated model: call diffaccel.disable(pipe) first.")
    config = Instrument(targets=tuple(targets))
    config.validate()
    session = attach(pipe, detect(pipe), [config])
    recording = Recording(session.installed[0].rows)
    try:
        yield recording
    finally:
        if session_of(pipe) is session:  # an accelerate() inside the block replaced it: keep that
            detach(pipe)

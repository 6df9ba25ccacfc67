"""The contract every registered method keeps, on a tiny pipeline of every family it supports.

The cases come from the registry (``diffaccel.METHODS`` x ``supported_families()``), so a new
method is enrolled by registering it. For each: accelerate -> the same seed twice gives the same
output -> the output does not depend on the clock (``time.*`` faked to return nonsense while a
fresh pipeline is accelerated and called) -> a deep copy is an independent accelerated pipeline
-> an exception mid-call leaves nothing behind (the next call equals a fresh one) -> pickling
the denoiser is refused with a line saying to disable -> ``disable`` is bit-identical to plain.
"""
from __future__ import annotations

import copy
import itertools
import pickle
import time

import pytest
import torch

import diffaccel
from diffaccel.families import Family
from diffaccel.methods.base import METHODS
from diffaccel.state import session_of
from tiny_pipes import build, run

TINY = {Family.UNET: "sd", Family.IMAGE_DIT: "pixart", Family.VIDEO_DIT: "wan"}
STEPS = 3
CASES = [(name, family) for name, cls in sorted(METHODS.items()) for family in cls.supported_families()]


def test_every_family_has_a_tiny_pipeline():
    assert set(TINY) == set(Family)


class Boom(Exception):
    pass


def fake_clock(monkeypatch):
    nonsense = itertools.cycle([1e9, -7.0, 0.0, 3e-7, 42.0, 1e9])
    for name in ("perf_counter", "monotonic", "time", "process_time"):
        monkeypatch.setattr(time, name, lambda: next(nonsense))
    for name in ("perf_counter_ns", "monotonic_ns", "time_ns"):
        monkeypatch.setattr(time, name, lambda: int(next(nonsense)))


@pytest.mark.parametrize("method,family", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_method_contract(method, family, monkeypatch):
    name = TINY[family]
    make = METHODS[method]
    pipe = build(name)
    plain = run(name, pipe, steps=STEPS)
    diffaccel.accelerate(pipe, methods=[make()])

    # Same seed twice: the same output.
    first = run(name, pipe, steps=STEPS)
    assert torch.equal(run(name, pipe, steps=STEPS), first)

    # A fresh pipeline accelerated and called under a nonsense clock: bit-identical.
    with monkeypatch.context() as patched:
        fake_clock(patched)
        fresh = diffaccel.accelerate(build(name), methods=[make()])
        assert torch.equal(run(name, fresh, steps=STEPS), first)

    # A deep copy is accelerated on its own: same output, and disabling it leaves the original be.
    clone = copy.deepcopy(pipe)
    assert session_of(clone) is not None and session_of(clone) is not session_of(pipe)
    assert torch.equal(run(name, clone, steps=STEPS), first)
    assert diffaccel.stats(clone)["denoiser_calls"] > 0
    diffaccel.disable(clone)
    assert torch.equal(run(name, clone, steps=STEPS), plain)  # (the original is checked after the exception below)

    # An exception in the middle of a call: the next call equals a fresh one.
    denoiser = session_of(pipe).adapter.denoiser
    seen = []

    def fail_on_second_call(module, args, kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise Boom()

    handle = denoiser.register_forward_pre_hook(fail_on_second_call, with_kwargs=True)
    with pytest.raises(Boom):
        run(name, pipe, steps=STEPS)
    handle.remove()
    assert "step" not in vars(pipe.scheduler)
    assert torch.equal(run(name, pipe, steps=STEPS), first)

    # Pickling the accelerated denoiser is refused with what to do.
    with pytest.raises(TypeError, match=r"diffaccel\.disable\(pipe\) first"):
        pickle.dumps(denoiser)

    # disable: bit-identical to the never-accelerated pipeline.
    diffaccel.disable(pipe)
    assert torch.equal(run(name, pipe, steps=STEPS), plain)

"""The typed call context: what methods tell each other within a call is set by the session on
``ctx`` (CFG layout, call index), never stored on the session as loose attributes; configs are
frozen and the per-call state lives in the handles."""
import dataclasses

import pytest

import diffaccel
import tiny_pipes as tp
from diffaccel.state import session_of


def _layouts(name, methods=(), guidance=4.0):
    """(call_index, CFG halves, batched, uncond_dropped) seen by the first block of every call."""
    pipe = tp.build(name)
    diffaccel.accelerate(pipe, methods=list(methods)) if methods else tp.observe(pipe)
    session, seen = session_of(pipe), []
    block = session.adapter.blocks()[0][1]
    block.register_forward_pre_hook(lambda *a: seen.append(
        (session.ctx.call_index, session.ctx.cfg.halves, session.ctx.cfg.batched, session.ctx.cfg.uncond_dropped)))
    tp.run(name, pipe, steps=3, guidance=guidance)
    return pipe, seen


def test_batched_cfg_holds_both_halves_in_the_adapter_order():
    _, seen = _layouts("pixart")  # PixArt decides CFG locally: the layout comes from identical halves
    assert seen == [(0, ("uncond", "cond"), True, False)] * 3
    _, seen = _layouts("dit")
    assert seen == [(0, ("cond", "uncond"), True, False)] * 3


def test_separate_cfg_calls_are_one_half_each_and_no_cfg_is_cond():
    _, seen = _layouts("wan")
    assert seen == [(0, ("cond",), False, False), (1, ("uncond",), False, False)] * 3
    _, seen = _layouts("sd", guidance=1.0)
    assert seen == [(0, ("cond",), False, False)] * 3


def test_cfg_cache_narrows_the_layout_while_it_runs_the_conditional_half_alone():
    cfg_cache = diffaccel.FasterCache(attention_interval=1, cfg_interval=2, cfg_range=(0.0, 1.0))
    pipe, seen = _layouts("pixart", [cfg_cache])
    assert seen[1] == (0, ("cond",), True, True)  # step 1 reuses the stored uncond - cond difference
    assert seen[0] == seen[2] == (0, ("uncond", "cond"), True, False)
    assert session_of(pipe).ctx.cfg.uncond_dropped is False  # restored after the call


def test_methods_leave_no_attributes_on_the_session():
    pipe = tp.build("pixart")
    declared = set(vars(tp.observe(tp.build("pixart"))._diffaccel_session))
    diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(warmup=1),
                                        diffaccel.FasterCache(attention_interval=1, cfg_interval=2)])
    tp.run("pixart", pipe, steps=4)
    assert set(vars(session_of(pipe))) == declared


def test_configs_are_frozen():
    config = diffaccel.DeepCache(interval=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.interval = 4
    assert diffaccel.DeepCache(branch=1) == diffaccel.DeepCache(skip_branch=1)  # the former name still works
    assert dataclasses.replace(diffaccel.DeepCache(branch=2), interval=2).skip_branch == 2


def test_record_yields_the_rows_after_the_block():
    pipe = tp.build("wan")
    with diffaccel.instrument.record(pipe, targets=("blocks",)) as rec:
        tp.run("wan", pipe, steps=2)
    assert session_of(pipe) is None
    assert {(r["step"], r["call_index"]) for r in rec.rows} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    halves = [r["residual_rel_l1_by_half"] for r in rec.rows if r["step"] == 1 and "residual_rel_l1_by_half" in r]
    assert halves and all(len(h) == 1 for h in halves)  # separate calls: one CFG half each
    assert not hasattr(diffaccel.Instrument(), "rows")


def test_bad_numbers_are_refused_everywhere():
    for config in (diffaccel.DeepCache(power=float("nan")), diffaccel.DeepCache(power=float("inf")),
                   diffaccel.AdaptiveCache(threshold=float("inf")), diffaccel.ToMe(ratio=float("nan")),
                   diffaccel.FasterCache(alpha_low=float("nan")), diffaccel.PAB(spatial_range=(0.1, float("nan"))),
                   diffaccel.MediatorAttention(shortcut=float("inf"))):
        with pytest.raises(ValueError, match="must be"):
            config.validate()

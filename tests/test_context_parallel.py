"""diffaccel under diffusers' context parallelism (Ulysses, 2 gloo ranks on CPU).

For the families whose diffusers transformers ship a context-parallel plan (Wan, Flux): every
preset and every DiT method gives, on 2 ranks, the output of 1 process within the error of context
parallelism itself on the unaccelerated model; both ranks give the same output and the same stats,
and decisions (computed / reused counts) equal the 1-process ones. Methods that cannot be exact
refuse with a clear error (ToMe under any CP; sparse attention under ring, which splits the keys).
Sparse attention under Ulysses runs between diffusers' all-to-alls and equals 1 process.
"""
import pytest
import torch

from dist_harness import run_ranks

STEPS = 4
SIZE = dict(height=32, width=32)  # a few tokens per rank, divisible by 2
SPARSE = dict(min_tokens=0, full_attention_fraction=0.0)
CASES = {  # label -> accelerate(...) arguments (methods as (name, parameters))
    "quality": dict(preset="quality"),
    "balanced": dict(preset="balanced"),
    "fast": dict(preset="fast"),
    "adaptive_cache": dict(methods=[("adaptive_cache", dict(threshold=0.3, warmup=1, max_consecutive=2))]),
    "pab": dict(methods=[("pab", {})]),
    "faster_cache": dict(methods=[("faster_cache", dict(attention_interval=2, cfg_interval=2, cfg_range=(0.0, 1.0)))]),
    "cfg_cache": dict(methods=[("cfg_cache", dict(interval=2))]),
    "text_cache": dict(methods=[("text_cache", {})]),  # lossless: must equal the plain sharded output
}
LOSSLESS = {"text_cache"}


def _args(case):
    import diffaccel

    case = dict(case)
    if "methods" in case:
        case["methods"] = [diffaccel.METHODS[name](**params) for name, params in case["methods"]]
    return case


def _cp_worker(rank, world, name, cases, mode="ulysses", size=SIZE, lse_backend=False):
    """1-process and ``mode``-sharded runs of every case; with ``lse_backend`` both pipelines attend
    through the test backend that returns the log-sum-exp (ring needs it; tests/attention_backends.py)."""
    import contextlib

    import diffaccel
    import tiny_pipes
    from attention_backends import cpu_lse_backend, select
    from diffusers import ContextParallelConfig

    def run(pipe):
        out = pipe(**{**tiny_pipes.call_kwargs(name, steps=STEPS), **size})
        return (out.frames if hasattr(out, "frames") else out.images).clone()

    with cpu_lse_backend() if lse_backend else contextlib.nullcontext() as backend:
        plain = tiny_pipes.build(name)  # one process's model, no collectives (nothing asked for them)
        sharded = tiny_pipes.build(name)
        for pipe in (plain, sharded) if backend else ():
            select(pipe.transformer, backend)
        sharded.transformer.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
        out = {"plain": run(plain), "sharded": run(sharded), "cases": {}}
        for label, case in cases.items():
            row = {}
            for key, pipe in (("one", plain), ("cp", sharded)):
                try:
                    diffaccel.accelerate(pipe, **_args(case))
                except ValueError as err:
                    row[key] = str(err)
                    continue
                row[key] = (run(pipe), diffaccel.stats(pipe)["methods"])
                diffaccel.disable(pipe)
            out["cases"][label] = row
        out["disabled"] = run(sharded)  # disable under CP restores the plain sharded output exactly
    return out


def _decisions(methods: dict) -> dict:
    # flops_saved of the sparse methods counts this rank's heads; everything else is a decision count.
    return {m: {k: v for k, v in s.items() if k != "flops_saved"} for m, s in methods.items()}


def _check_equals_one_process(r0, r1, cases) -> dict:
    """Both ranks' results against 1 process; returns {label: (one, one_stats, cp0, stats0)}."""
    assert torch.equal(r0["sharded"], r1["sharded"])
    cp_error = (r0["sharded"] - r0["plain"]).abs().max().item()  # context parallelism's own error
    tol = max(8 * cp_error, 1e-5)
    assert torch.equal(r0["disabled"], r0["sharded"])
    rows = {}
    for label in cases:
        a, b = r0["cases"][label], r1["cases"][label]
        (one, one_stats), (cp0, stats0), (cp1, stats1) = a["one"], a["cp"], b["cp"]
        assert torch.equal(cp0, cp1), label  # ranks agree exactly
        assert stats0 == stats1, label
        assert _decisions(stats0) == _decisions(one_stats), label  # the 1-process decisions
        assert (cp0 - one).abs().max().item() <= tol, (label, (cp0 - one).abs().max().item(), tol)
        if label in LOSSLESS:  # bit for bit the unaccelerated output, on one process and on the ranks
            assert torch.equal(one, r0["plain"]) and torch.equal(cp0, r0["sharded"]), label
            assert stats0[label]["reused"] > 0, f"{label} reused nothing: the test would prove nothing"
        elif label not in ("quality", "balanced", "fast"):  # a preset may compute everything in 4 steps
            assert not torch.equal(one, r0["plain"]), f"{label} changed nothing: the test would prove nothing"
        rows[label] = (one, one_stats, cp0, stats0)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan", "flux"])
def test_ulysses_every_preset_and_method_equals_one_process(name):
    _check_equals_one_process(*run_ranks(_cp_worker, 2, name, CASES), CASES)


SPARSE_CASES = {  # a 64 px grid is larger than one tile, so the windows leave tokens out
    "sliding_tile": dict(methods=[("sliding_tile", dict(tile=(1, 2, 2), window=(1, 1, 1), **SPARSE))]),
    "mediator": dict(methods=[("mediator", dict(min_tokens=0))]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan", "flux"])
def test_sparse_attention_under_ulysses_equals_one_process(name):
    # Ulysses hands each rank the whole sequence for a shard of the heads between its all-to-alls;
    # the sparse kernel runs there, on the global token order (Flux's rank-stacked text is reordered).
    r0, r1 = run_ranks(_cp_worker, 2, name, SPARSE_CASES, "ulysses", dict(height=64, width=64))
    for label, (one, one_stats, cp0, stats0) in _check_equals_one_process(r0, r1, SPARSE_CASES).items():
        one_stats, stats0 = one_stats[label], stats0[label]
        assert stats0["sparse_calls"] > 0 and "dense_fallback_calls" not in stats0, (label, stats0)
        assert stats0["sparse_calls"] == one_stats["sparse_calls"], label  # every call, not one rank's shard


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wan", "flux"])
def test_ring_every_preset_and_method_equals_one_process(name):
    # Ring attention merges the ranks' partial attentions by their log-sum-exp; the test backend
    # (torch's CPU flash kernel, tests/attention_backends.py) returns it, so ring runs on gloo here.
    r0, r1 = run_ranks(_cp_worker, 2, name, CASES, "ring", SIZE, True)
    _check_equals_one_process(r0, r1, CASES)


def _refusal_worker(rank, world):
    import diffaccel
    import tiny_pipes
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ContextParallelInput

    errors = []
    pipe = tiny_pipes.build("wan")
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    for name in ("sliding_tile", "mediator"):
        try:
            diffaccel.accelerate(pipe, methods=[diffaccel.METHODS[name](**SPARSE)])
        except ValueError as err:
            errors.append(str(err))
    pipe = tiny_pipes.build("wan")
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    diffaccel.accelerate(pipe, preset="balanced")  # caches work on the sharded layout with ring too
    # Parallelism enabled after accelerate: refused at the call, before any collective.
    pipe = tiny_pipes.build("wan")
    diffaccel.accelerate(pipe, methods=[diffaccel.SlidingTileAttention(**SPARSE)])
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    try:
        tiny_pipes.run("wan", pipe, steps=2)
    except ValueError as err:
        errors.append(str(err))
    # ToMe merges tokens across the whole sequence: no context parallelism at all.
    pipe = tiny_pipes.build("pixart")
    split = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world),
                                        cp_plan={"transformer_blocks.0": {"hidden_states": split}})
    try:
        diffaccel.accelerate(pipe, methods=[diffaccel.ToMe()])
    except ValueError as err:
        errors.append(str(err))
    return errors


def test_methods_that_cannot_be_exact_under_context_parallelism_refuse():
    errors, _ = run_ranks(_refusal_worker, 2)
    assert len(errors) == 4, errors
    assert "SlidingTileAttention cannot run under diffusers' ring context parallelism" in errors[0]
    assert "MediatorAttention cannot run under diffusers' ring context parallelism" in errors[1]
    assert "SlidingTileAttention cannot run under diffusers' ring context parallelism" in errors[2]
    assert "ToMe cannot run under diffusers' Ulysses context parallelism" in errors[3]

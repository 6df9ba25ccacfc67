"""Rank consensus is explicit: collectives only when asked for (process_group=) or under diffusers'
context parallelism; a process group alone never makes diffaccel talk to other ranks."""
import pytest
import torch
import torch.distributed as dist

from dist_harness import run_ranks


def _decisions(rank, world, process_group):
    import diffaccel
    from cache_harness import denoise, inputs, pipe_for_harness
    from diffaccel.methods import adaptive_cache

    plans, reduced = [], []
    decide = adaptive_cache.AdaptiveCacheInstalled._decide
    adaptive_cache.AdaptiveCacheInstalled._decide = lambda self, r: plans.append(decide(self, r)) or plans[-1]
    original = adaptive_cache.consensus_sum
    adaptive_cache.consensus_sum = lambda v, s: reduced.append(v.tolist()) or original(v, s)
    collectives = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = lambda *a, **k: collectives.append(1) or real_all_reduce(*a, **k)

    pipe = pipe_for_harness()  # same weights on both ranks (seeded build)
    x, c, u = inputs(1, seed=100 + rank)  # different prompt embeddings and noise per rank
    config = diffaccel.AdaptiveCache(threshold=0.3, warmup=1, max_consecutive=4)
    diffaccel.accelerate(pipe, methods=[config], process_group=process_group)
    denoise(pipe, x, c, u, separate=False, steps=10)
    return {"plans": plans, "measured": reduced, "collectives": len(collectives)}


def test_process_group_makes_ranks_agree_and_none_means_no_collective():
    # With a group: one all-reduce per decision, every rank on the same path although inputs differ.
    r0, r1 = run_ranks(_decisions, 2, "world")
    assert r0["measured"] != r1["measured"]  # the ranks saw different activations...
    assert r0["plans"] == r1["plans"]  # ...and took the same path, including reuses
    assert any(not compute for plan in r0["plans"] for _, compute in plan)
    assert r0["collectives"] == len(r0["plans"]) == r1["collectives"]
    # Without one: no collective at all, each rank decides alone (as one process would).
    r0, r1 = run_ranks(_decisions, 2, None)
    assert r0["collectives"] == r1["collectives"] == 0
    assert r0["plans"] != r1["plans"]


def test_process_group_is_validated():
    import diffaccel
    from tiny_pipes import build

    with pytest.raises(ValueError, match="process_group must be a torch.distributed process group"):
        diffaccel.accelerate(build("pixart"), process_group=3)
    with pytest.raises(ValueError, match="process_group"):
        diffaccel.accelerate(build("pixart"), process_group=object())


def _crash_first(rank, world, marker, crashes):
    """Rank 0 dies of SIGSEGV on the first ``crashes`` runs (counted in ``marker``), then returns."""
    import os
    import signal

    count = int(open(marker).read() or 0) if os.path.exists(marker) else 0
    if rank == 0 and count < crashes:
        with open(marker, "w") as f:
            f.write(str(count + 1))
        os.kill(os.getpid(), signal.SIGSEGV)
    return rank


def test_harness_reruns_a_crashed_rank_once_and_fails_on_a_second_crash(tmp_path):
    with pytest.warns(UserWarning, match="SIGSEGV.*running the ranks once more"):
        assert run_ranks(_crash_first, 2, str(tmp_path / "once"), 1) == [0, 1]
    with pytest.warns(UserWarning, match="SIGSEGV"), pytest.raises(Exception, match="SIGSEGV"):
        run_ranks(_crash_first, 2, str(tmp_path / "twice"), 2)

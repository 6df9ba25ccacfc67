"""Two gloo processes on CPU must take identical cache decisions, even from different inputs."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffaccel.distributed import consensus_mean


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        import diffaccel
        from cache_harness import denoise, inputs, pipe_for_harness
        from diffaccel.methods import adaptive_cache

        measured, agreed = [], []
        original = adaptive_cache.consensus_mean

        def spy(values):
            out = original(values)
            measured.append(values.tolist())
            agreed.append(out.tolist())
            return out

        adaptive_cache.consensus_mean = spy
        plans = []
        decide = adaptive_cache.AdaptiveCacheInstalled._decide
        adaptive_cache.AdaptiveCacheInstalled._decide = lambda self, r: plans.append(decide(self, r)) or plans[-1]

        pipe = pipe_for_harness()  # same weights on both ranks (seeded build)
        x, c, u = inputs(1, seed=100 + rank)  # different prompt embeddings and noise per rank
        diffaccel.accelerate(pipe, methods=[diffaccel.AdaptiveCache(threshold=0.3, warmup=1, max_consecutive=4)])
        denoise(pipe, x, c, u, separate=False, steps=10)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump({"plans": plans, "measured": measured, "agreed": agreed,
                       "consensus": consensus_mean(torch.tensor([float(rank + 1)])).tolist()}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_take_identical_decisions(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert r0["consensus"] == r1["consensus"] == [1.5]  # all-reduce SUM / world size
    assert r0["measured"] != r1["measured"]  # the ranks saw different activations...
    assert r0["agreed"] == r1["agreed"]  # ...decided on the same numbers...
    for m0, m1, a in zip(r0["measured"], r1["measured"], r0["agreed"]):
        assert all(abs((x + y) / 2 - z) < 1e-9 for x, y, z in zip(m0, m1, a))
    assert r0["plans"] == r1["plans"]  # ...and took the same path, including reuses
    assert any(not compute for plan in r0["plans"] for _, compute in plan)


def test_consensus_is_identity_without_process_group():
    values = torch.tensor([0.25, 3.0])
    assert torch.equal(consensus_mean(values), values)

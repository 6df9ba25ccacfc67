"""Run a function on N gloo processes on CPU, with a deadline so a hang fails instead of stalling.

``run_ranks(fn, world, *args)`` spawns ``world`` processes that each join one gloo group and call
``fn(rank, world, *args)``; each return value comes back through a file. diffusers' context
parallelism divides by ``torch.accelerator.device_count()``, which is 0 on a CPU-only machine:
the workers report one device (the gloo backend runs on CPU either way).
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import tempfile
import time
import traceback
import warnings

import torch
import torch.multiprocessing as mp

DEADLINE_S = 600  # generous: only a hang (a collective no other rank joins) ever gets near it


def _entry(rank, fn, world, out_dir, args):
    faulthandler.enable()  # a crash in a rank prints where it happened (CI once saw a bare SIGSEGV)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda *a, **k: 1  # CPU-only box: diffusers' CP divides by this
    # A file rendezvous: a free port picked beforehand can be taken by another job before rank 0 binds it.
    torch.distributed.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"),
                                         rank=rank, world_size=world)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - carried back to the test, which fails with it
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # Tear down together: a rank leaving while the other still talks to it once aborted gloo
    # ("terminate called without an active exception") after both had written their results.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_ranks(fn, world: int, *args, deadline_s: float = DEADLINE_S) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run on its own rank.

    A rank killed by a signal (CI once saw a SIGSEGV inside gloo / torch that 250 local reruns did
    not reproduce) is reported as a warning, with its traceback on stderr, and the run is repeated
    once; a second crash, an error raised by ``fn``, a wrong result or a hang fails as usual.
    """
    try:
        return _run_once(fn, world, args, deadline_s)
    except RankCrashed as err:
        warnings.warn(f"{err}; running the ranks once more")
        return _run_once(fn, world, args, deadline_s)


class RankCrashed(RuntimeError):
    """A rank died of a signal (not an exception of ``fn``)."""


def _run_once(fn, world: int, args: tuple, deadline_s: float) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world, out_dir, args), nprocs=world, join=False,
                                 start_method="spawn")
        end = time.monotonic() + deadline_s
        try:
            while not ctx.join(timeout=max(0.1, end - time.monotonic())):  # returns as each process ends
                if time.monotonic() >= end:
                    for p in ctx.processes:
                        p.kill()
                    raise AssertionError(f"{world} ranks did not finish within {deadline_s} s: a collective hangs")
        except mp.ProcessExitedException as err:
            if not err.signal_name:
                raise
            done = [r for r in range(world) if os.path.exists(os.path.join(out_dir, f"{r}.pkl"))]
            raise RankCrashed(f"{err} (ranks that had written their result before it: {done or 'none'})") from err
        results = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results

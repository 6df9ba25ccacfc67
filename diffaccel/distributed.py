"""Consensus for data-dependent decisions under torch.distributed.

A cache decision taken from activations (e.g. "the first block barely changed, reuse the rest")
must be the same on every rank, or ranks running one sharded model (context/tensor parallel)
would take different code paths and deadlock, and ranks generating different seeds would make
schedule-dependent results differ between 1 and N processes. Every rank therefore decides on the
mean of all ranks' measurements.
"""
from __future__ import annotations

import torch


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def consensus_mean(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over all ranks (all-reduce SUM / world size).

    Without an initialised process group it returns ``values`` unchanged. Every rank must call
    it the same number of times with tensors of the same shape (collective semantics). The
    reduction runs in float64 on the tensor's device (gloo for CPU, NCCL for CUDA tensors).
    """
    if not is_distributed():
        return values
    reduced = values.detach().to(torch.float64).clone()
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
    return reduced / torch.distributed.get_world_size()

"""Process group for multi-process evaluation, from the variables that ``accelerate launch``
and ``torchrun`` set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the group, so we tear it down

    @classmethod
    def from_env(cls, device: str | None) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dist.is_initialized():
            return cls(rank, world, local)
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith(("cuda", "auto")))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, world, local, owns_group=True)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str | None) -> str | None:
        """Each rank drives its own GPU."""
        if self.world > 1 and torch.cuda.is_available() and requested in (None, "auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def mine(self, seeds: list[int]) -> list[int]:
        return seeds[self.rank::self.world]  # round-robin

    def gather(self, items: list) -> list:
        """Every rank's items, concatenated (in rank order)."""
        if self.world == 1:
            return list(items)
        parts = [None] * self.world
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's value on every rank (an error on rank 0 then stops all ranks alike)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

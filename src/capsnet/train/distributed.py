"""What the training loop needs from ``torch.distributed``; a single process is world size 1."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Dist"]


class Dist:
    """Rank, world size and the few collectives the loop uses (no-ops without a process group)."""

    def __init__(self):
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device="cpu") -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        if not self.enabled:
            return index
        return torch.tensor_split(index, self.world)[self.rank]

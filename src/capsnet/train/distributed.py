"""What the training loop needs from ``torch.distributed``; a single process is world size 1."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

__all__ = ["Dist"]


class Dist:
    """Rank, world size and the few collectives the loop uses (no-ops without a process group)."""

    def __init__(self):
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @classmethod
    def launch(cls, device: str, environ: Mapping[str, str]) -> tuple[Dist, str]:
        """Join the process group a launcher (``torchrun``) describes in ``environ`` (``WORLD_SIZE`` > 1:
        gloo on CPU, nccl on GPUs, ``cuda`` becoming ``cuda:<LOCAL_RANK>``), else stay one process.
        Returns the helper and the device of this rank; :meth:`close` leaves the group.
        """
        if int(environ.get("WORLD_SIZE", "1")) > 1:
            if device.startswith("cuda"):
                device = f"cuda:{int(environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return cls(), device

    def close(self) -> None:
        if self.enabled:
            dist.destroy_process_group()

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

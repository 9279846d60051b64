"""The optimiser the training loop uses: Adam, fused where it can be, with its state made up front.

``torch.optim.Adam`` makes its two moment buffers per parameter on the first ``step``, in
the middle of the first iteration's memory, where the activations of that iteration have
just been freed. With the heap kept by :func:`capsnet.allocator.keep_freed_memory` those
long-lived buffers then split the holes the next iterations' large temporaries would reuse,
and the heap grows. Made before the first forward, they sit below the activations:
``capsnet_mnist`` at batch 128 peaked at 746-796 MB of RSS over six steps against 799-851
(seven alternating runs each, docs/performance.md). The state is made through
``load_state_dict``, i.e. exactly as a resumed run gets it, and is what the first ``step``
would have made (``tests/test_train.py`` checks the trajectories are identical).
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["adam"]


def adam(params: Iterable[torch.nn.Parameter], *, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam`` (fused when every parameter is a floating CPU or CUDA tensor) with its state already made."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    state = optimizer.state_dict()
    for index, p in enumerate(params):
        state["state"][index] = {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    optimizer.load_state_dict(state)
    return optimizer

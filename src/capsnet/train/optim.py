"""The optimiser the training loop uses: Adam, fused where it can be, with its state made up front.

``torch.optim.Adam`` makes its two moment buffers per parameter on the first ``step``, in
the middle of the first iteration's memory, where the activations of that iteration have
just been freed. With the heap kept by :func:`capsnet.allocator.keep_freed_memory` those
long-lived buffers then split the holes the next iterations' large temporaries would reuse,
and the heap grows. Made before the first forward, they sit below the activations, and the
training peak is lower (docs/performance.md, session 5's "Adam's state made before the first
forward"). The state is made through
``load_state_dict`` and is what the first ``step`` would make for every parameter that
needs a gradient (``tests/test_optim.py`` checks trajectories and state are identical); a
parameter that needs one but never gets one keeps zero moments and step 0, where torch's
lazy Adam would have no entry for it.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["adam"]


def adam(
    params: Iterable[torch.nn.Parameter], *, lr: float = 1e-3, weight_decay: float = 0.0, make_state: bool = True
) -> torch.optim.Adam:
    """``torch.optim.Adam`` (fused when every parameter is a floating CPU or CUDA tensor) with its state already made.

    ``params`` are tensors (no parameter-group dicts); ``make_state=False`` leaves the state to
    ``load_state_dict`` (a resumed run) or to the first ``step``.
    """
    params = list(params)
    if any(not isinstance(p, torch.Tensor) for p in params):
        raise TypeError("capsnet.train.optim.adam takes an iterable of parameters (tensors), not parameter groups")
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # as torch's fused Adam accepts
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in floating for p in params)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if not make_state:
        return optimizer
    # The step counter's dtype as torch makes it: float32 for fused, else the default float dtype.
    step_dtype = torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64
    state = optimizer.state_dict()
    for index, p in enumerate(params):
        if p.requires_grad:
            state["state"][index] = {
                "step": torch.zeros((), dtype=step_dtype),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    optimizer.load_state_dict(state)
    return optimizer

"""An exponential moving average of the weights (Polyak averaging), which validation, ``best.pt`` and the test use.

Not in either capsule paper: an option of the training loop (``ema_decay``, off by default).
After every optimizer step the average moves toward the trained weights,

    avg_t = d_t avg_{t-1} + (1 - d_t) theta_t,    d_t = min(decay, (1 + t) / (10 + t)),

with ``t = 1, 2, ...`` the update (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``): early on ``d_t`` is small, so the average does not keep the random initial
weights for the ``1 / (1 - decay)`` steps a fixed decay would; the cap ``decay`` takes over
only at ``t = (10 decay - 1) / (1 - decay)`` (about 9,000 updates for 0.999, so in shorter
runs the average spans about a tenth of the steps so far). Buffers (batch-norm statistics)
are copied from the trained model, not averaged. The average is kept in the parameters' own
dtype (float32). A step that float16 loss scaling skips still counts as an update.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """A copy of ``model`` whose parameters follow the exponential moving average of ``model``'s.

    ``module`` is that copy (no gradients): evaluate it like the model, save its ``state_dict()``
    as a model's. :meth:`update` after each optimizer step; :meth:`state_dict` /
    :meth:`load_state_dict` for checkpoints (the average, its update count and the decay).
    """

    def __init__(self, model: nn.Module, decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0 < decay < 1 and math.isfinite(decay)):
            raise ValueError(f"ema_decay must lie in (0, 1), e.g. 0.999, got {decay!r}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0

    def rate(self) -> float:
        """``d_t`` of the next update."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of the average toward ``model``'s parameters (which must be the copied model's, in order)."""
        weight = 1.0 - self.rate()
        averages, current = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if len(averages) != len(current):
            raise ValueError(f"WeightAverage.update: the model has {len(current)} parameters, the average {len(averages)}")
        torch._foreach_lerp_(averages, current, weight)
        for kept, buffer in zip(self.module.buffers(), model.buffers()):
            kept.copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])  # the decay is the config's (a resume may change it)

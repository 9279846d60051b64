"""Training-time schedules of the capsule papers (pure functions of the step)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["MARGIN_SCHEDULES", "lr_factor", "spread_margin"]

#: ``"linear"``: the paper's "from 0.2 linearly increasing during training to 0.9";
#: ``"sigmoid"``: Google's released code, ``0.2 + 0.79 sigmoid(min(10, step / 50000 - 4))``.
MARGIN_SCHEDULES = ("linear", "sigmoid")


def spread_margin(
    step: int,
    *,
    schedule: str = "linear",
    start: float = 0.2,
    end: float = 0.9,
    steps: int = 50_000,
) -> float:
    """Margin ``m`` of the spread loss (Eq. 3 of Hinton, Sabour & Frosst 2018) at ``step``.

    ``"linear"`` (the paper): ``start`` at step 0, rising linearly to ``end`` at ``steps`` and
    held there. The paper gives no duration; ``steps`` is the experiment's choice.

    ``"sigmoid"`` (Google's code): ``start + (end - start) sigmoid(min(10, step / steps - 4))``
    with that code's values ``start=0.2``, ``end=0.99`` (so ``end - start = 0.79``) and
    ``steps=50000``: about 0.21 at step 0, 0.6 at 200k, 0.99 from 700k. Pass them explicitly
    (``end=0.99``); the defaults of this function are the paper's.

    Shape:
        scalars in, a float out.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start <= end:
        raise ValueError(f"margins must satisfy 0 <= start <= end, got start={start} end={end}")
    if schedule == "linear":
        return start + (end - start) * min(1.0, step / steps)
    if schedule == "sigmoid":
        x = min(10.0, step / steps - 4.0)
        return start + (end - start) / (1.0 + math.exp(-x))
    raise ValueError(f"schedule must be one of {MARGIN_SCHEDULES}, got {schedule!r}")


def lr_factor(cfg: "TrainConfig", total_steps: Optional[int] = None):
    """The learning rate at a step, as a multiple of ``cfg.lr`` (floored at ``lr_min``).

    After ``w = lr_warmup_steps`` steps of linear warm-up (factor ``(step + 1) / w``), the decay
    runs over ``lr_decay_steps`` steps (None: ``total_steps - w``, the rest of the run):
    ``"exponential"``, the official CapsNet code's continuous ``rate^(step / steps)``; or
    ``"cosine"``, ``(1 + cos(pi t)) / 2`` from ``lr`` down to ``lr_min`` at ``t = 1``, held after.
    """
    floor = cfg.lr_min / cfg.lr
    warmup = cfg.lr_warmup_steps
    length = cfg.lr_decay_steps
    if length is None:  # the rest of the run
        if total_steps is None:
            raise ValueError("lr_decay_steps=None needs the run's total steps")
        length = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        decay_step = max(0, step - warmup)
        if cfg.lr_schedule == "cosine":
            t = min(1.0, decay_step / length)
            value = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            value = cfg.lr_decay_rate ** (decay_step / length)
        if step < warmup:
            value *= (step + 1) / warmup
        return max(value, floor)

    return factor

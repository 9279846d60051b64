"""Training-time schedules of the capsule papers (pure functions of the step)."""

from __future__ import annotations

import math

__all__ = ["MARGIN_SCHEDULES", "spread_margin"]

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

"""Process-wide choices of the fast paths, in the manner of ``torch.backends``.

They choose how a result is computed, never what it is (the algorithms agree up to float
rounding, ``tests/test_conv.py``), so they are settings of the process, not hyper-parameters
of a model, and no checkpoint records them::

    import capsnet.backends

    capsnet.backends.conv.algorithm = "direct"   # every capsnet Conv2d that does not choose itself
    with capsnet.backends.conv.flags(algorithm="direct", weight_grad="native"):
        ...                                      # PyTorch's own convolution, for this block only

``conv``: the default of :class:`capsnet.layers.Conv2d` (Conv1 and PrimaryCaps of the CapsNet,
Conv1 of the EM networks) for ``algorithm`` (:data:`ALGORITHMS`) and ``weight_grad``
(:data:`WEIGHT_GRADIENTS`); a layer built with an explicit value keeps it. The defaults,
``"auto"`` and ``"auto"``, are the measured fastest choices (docs/fast_paths.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

__all__ = ["ALGORITHMS", "WEIGHT_GRADIENTS", "conv"]

#: How a convolution is computed: ``"direct"`` is PyTorch's forward with the weight gradient of
#: ``weight_grad``; ``"dft"`` the bilinear DFT algorithm of :mod:`capsnet.ops.dft`; ``"auto"``
#: takes ``"dft"`` where it saves enough multiply-adds for the batch at hand (:mod:`capsnet.ops.conv`).
ALGORITHMS = ("auto", "direct", "dft")
#: How the direct algorithm computes the weight gradient: ``"auto"`` picks ``"im2col"`` for short
#: columns of the unfolded input and ``"conv"`` otherwise; ``"native"`` is PyTorch's own backward
#: (the layer is then exactly ``nn.Conv2d``).
WEIGHT_GRADIENTS = ("auto", "conv", "im2col", "native")


def check_conv_choice(algorithm: str, weight_grad: str, *, who: str) -> None:
    """Refuse values outside :data:`ALGORITHMS` / :data:`WEIGHT_GRADIENTS`, and ``"dft"`` with an
    explicit weight gradient (the weight gradient is a choice of the direct algorithm)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{who}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if weight_grad not in WEIGHT_GRADIENTS:
        raise ValueError(f"{who}: weight_grad must be one of {WEIGHT_GRADIENTS}, got {weight_grad!r}")
    if weight_grad not in ("auto", "native") and algorithm == "dft":
        raise ValueError(
            f"{who}: weight_grad={weight_grad!r} is a choice of the direct algorithm; pass algorithm='direct' "
            "(or 'auto') with it, or leave weight_grad='auto' for algorithm='dft'"
        )


class _ConvSettings:
    """``capsnet.backends.conv``: the process-wide ``algorithm`` and ``weight_grad`` of Conv2d."""

    def __init__(self) -> None:
        self._algorithm, self._weight_grad = "auto", "auto"

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @algorithm.setter
    def algorithm(self, value: str) -> None:
        check_conv_choice(value, self._weight_grad, who="capsnet.backends.conv")
        self._algorithm = value

    @property
    def weight_grad(self) -> str:
        return self._weight_grad

    @weight_grad.setter
    def weight_grad(self, value: str) -> None:
        check_conv_choice(self._algorithm, value, who="capsnet.backends.conv")
        self._weight_grad = value

    @contextlib.contextmanager
    def flags(self, *, algorithm: Optional[str] = None, weight_grad: Optional[str] = None) -> Iterator[None]:
        """Set ``algorithm`` / ``weight_grad`` (None: unchanged) inside a ``with`` block; restored on exit."""
        saved = self._algorithm, self._weight_grad
        new = (saved[0] if algorithm is None else algorithm, saved[1] if weight_grad is None else weight_grad)
        check_conv_choice(*new, who="capsnet.backends.conv.flags")
        self._algorithm, self._weight_grad = new
        try:
            yield
        finally:
            self._algorithm, self._weight_grad = saved

    def __repr__(self) -> str:
        return f"capsnet.backends.conv(algorithm={self._algorithm!r}, weight_grad={self._weight_grad!r})"


conv = _ConvSettings()

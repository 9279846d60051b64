"""Shape arithmetic shared by the operators, the layers and the models."""

from __future__ import annotations

__all__ = ["conv_output_size"]


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side of a convolution (dilation 1) over an input side ``size``: ``(size + 2 padding - kernel) // stride + 1``.

    Not clamped: below 1 when the kernel does not fit, which callers test for.
    """
    return (size + 2 * padding - kernel) // stride + 1

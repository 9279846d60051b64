"""The private PyTorch APIs the package uses, each in one place with a test (``tests/test_compat.py``).

Each is a private or internal name that a PyTorch release may move or change; when one does,
this file (and its test) is where to look. Tested on torch 2.13.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["assert_async", "convolution_input_grad", "functorch_transforms_active", "softmax_backward"]


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is tracing this call.

    Hand-written backwards (``autograd.Function`` without ``setup_context`` / vmap rules) and
    raw data pointers do not work there; their callers take the plain autograd path.
    """
    return torch._C._are_functorch_transforms_active()


def softmax_backward(grad_output: Tensor, output: Tensor, dim: int) -> Tensor:
    """The gradient of ``softmax(x, dim)`` from its output ``y``: ``y * (g - sum_dim(y g))``, one fused kernel."""
    return torch._softmax_backward_data(grad_output, output, dim, output.dtype)


def assert_async(condition: Tensor, message: str) -> None:
    """Assert a 0-d boolean tensor without a host synchronisation on CUDA (synchronous elsewhere)."""
    torch._assert_async(condition, message)


def convolution_input_grad(grad_output: Tensor, x: Tensor, weight: Tensor, stride, padding) -> Tensor:
    """The input gradient of ``conv2d(x, weight, stride=stride, padding=padding)`` (no dilation,
    one group) from ``grad_output``, by ATen's ``convolution_backward``; differentiable."""
    return torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, stride, padding, (1, 1), False, (0, 0), 1, (True, False, False)
    )[0]

"""Fully connected capsule layer with routing-by-agreement (DigitCaps of Sabour et al. 2017)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..precision import float32_under_autocast
from ..routing import RoutingResult, dense_routing, dense_votes
from ..validation import check_dtype

__all__ = ["DenseCaps"]


class DenseCaps(nn.Module):
    """Every input capsule ``i`` predicts every output capsule ``j`` through its own matrix ``W_ij``.

    Votes ``u_hat_{j|i} = W_ij u_i`` (Eq. 2) come from weights that carry no batch
    axis; the parents come from routing by agreement (Procedure 1, Sabour et al. 2017).
    ``forward`` is :func:`~capsnet.routing.dense_routing` over the layer's parameters: to
    rounding, ``dynamic_routing(self.votes(u).transpose(1, 2), ...)``, with the votes and
    the routing fused.

    Args:
        in_caps, in_dim: number ``I`` and dimension of the input capsules.
        out_caps, out_dim: number ``J`` and dimension ``D`` of the output capsules.
        iterations: routing iterations (the paper: 3).
        detach_intermediate, leaky: see :func:`~capsnet.routing.dynamic_routing`.
        bias: add a learned ``(J, D)`` bias to the votes as the official code does
            (+J*D parameters); the paper has none, default False.
        init_std: standard deviation of the normal initialisation of ``W``.

    Shape:
        u: ``(B, I, in_dim)``; returns a :class:`~capsnet.routing.RoutingResult` with
        poses ``(B, J, D)``, coupling and logits ``(B, I, J)``.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        *,
        iterations: int = 3,
        detach_intermediate: bool = False,
        leaky: bool = False,
        bias: bool = False,
        init_std: float = 0.01,
    ):
        super().__init__()
        if min(in_caps, in_dim, out_caps, out_dim, iterations) < 1:
            raise ValueError(
                f"DenseCaps sizes must be positive, got in_caps={in_caps} in_dim={in_dim} "
                f"out_caps={out_caps} out_dim={out_dim} iterations={iterations}"
            )
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"DenseCaps init_std must be finite and >= 0, got {init_std}; pass a small std such as the default 0.01")
        self.in_caps, self.in_dim = in_caps, in_dim
        self.iterations = iterations
        self.detach_intermediate = detach_intermediate
        self.leaky = leaky
        # W_ij stored as (J, I, D, in_dim): parents outermost, as the (B, J, I, D) votes.
        self.weight = nn.Parameter(torch.randn(out_caps, in_caps, out_dim, in_dim) * init_std)
        self.bias = nn.Parameter(torch.zeros(out_caps, 1, out_dim)) if bias else None

    def _check_input(self, u: Tensor) -> None:
        if u.dim() != 3 or u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(
                f"DenseCaps expects input capsules of shape (B, {self.in_caps}, {self.in_dim}), got {tuple(u.shape)}"
            )
        check_dtype(u, self.weight.dtype, name="DenseCaps input")

    def votes(self, u: Tensor) -> Tensor:
        """Predictions ``u_hat_{j|i} = W_ij u_i`` as a ``(B, J, I, D)`` tensor: the readable form of what ``forward`` fuses."""
        self._check_input(u)
        return dense_votes(u, self.weight, self.bias)

    @float32_under_autocast  # the input check sees the float32 tensors routing will see
    def forward(self, u: Tensor) -> RoutingResult:
        self._check_input(u)
        return dense_routing(
            u, self.weight, self.bias, iterations=self.iterations, detach_intermediate=self.detach_intermediate, leaky=self.leaky
        )

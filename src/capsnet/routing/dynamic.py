"""Routing-by-agreement, Procedure 1 of Sabour, Frosst & Hinton 2017."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..functional import NORM_EPS, squash

__all__ = ["RoutingResult", "dynamic_routing"]


class RoutingResult(NamedTuple):
    """What routing produced; small enough to return from every forward.

    poses: ``(B, J, D)`` parent capsules ``v_j`` after the last iteration.
    coupling: ``(B, I, J)`` coupling coefficients ``c_ij`` used for the last ``s_j`` (sum to 1 over J).
    logits: ``(B, I, J)`` routing logits ``b_ij`` that gave ``coupling`` (softmax of them over J;
        Procedure 1's final agreement update changes nothing downstream and is skipped).
    """

    poses: Tensor
    coupling: Tensor
    logits: Tensor


def dynamic_routing(
    votes: Tensor,
    iterations: int = 3,
    *,
    detach_intermediate: bool = False,
    leaky: bool = False,
    eps: float = NORM_EPS,
) -> RoutingResult:
    """Route child votes ``u_hat_{j|i}`` to parents by agreement (Procedure 1).

    Logits ``b_ij`` start at zero for every sample on every call; nothing is kept
    between calls or shared across the batch. Each iteration: ``c_i = softmax(b_i)``
    over parents (Eq. 3), ``s_j = sum_i c_ij u_hat_{j|i}`` (Eq. 2), ``v_j = squash(s_j)``
    (Eq. 1), ``b_ij += u_hat_{j|i} . v_j``.

    Args:
        votes: predictions ``u_hat_{j|i}``, ``(B, I, J, D)``. A view of a ``(B, J, I, D)``
            contiguous tensor is the fast layout (no copy is made then).
        iterations: number of routing iterations ``r`` (>= 1).
        detach_intermediate: if True, gradients reach the votes only through the last
            iteration (a common implementation choice). The paper's official code lets
            gradients flow through every iteration: default False.
        leaky: add an "orphan" parent with a constant zero logit to the softmax
            (leaky routing of the official code, used there for CIFAR-10); off by default.
        eps: passed to :func:`~capsnet.functional.squash`.

    Shape:
        votes: ``(B, I, J, D)``; returns poses ``(B, J, D)``, coupling and logits ``(B, I, J)``.
    """
    if votes.dim() != 4:
        raise ValueError(f"votes must be (B, I, J, D), got shape {tuple(votes.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    batch, n_in, n_out, _ = votes.shape
    # (B, J, I, D): parents outermost so both contractions below are batched matmuls
    # over contiguous memory; this is a no-op when the caller already built that layout.
    u_hat = votes.transpose(1, 2).contiguous()
    u_hat_detached = u_hat.detach() if detach_intermediate else u_hat
    logits = votes.new_zeros(batch, n_out, n_in)  # b_ij in (B, J, I) layout
    for it in range(iterations):
        last = it == iterations - 1
        u = u_hat if last else u_hat_detached
        if leaky:
            # Orphan parent with logit 0: softmax over J + 1 entries, the orphan column dropped.
            padded = torch.cat([logits.new_zeros(batch, 1, n_in), logits], dim=1)
            coupling = torch.softmax(padded, dim=1)[:, 1:]
        else:
            coupling = torch.softmax(logits, dim=1)  # Eq. 3: over parents J
        s = torch.matmul(coupling.unsqueeze(2), u).squeeze(2)  # Eq. 2: (B, J, D)
        v = squash(s, dim=-1, eps=eps)  # Eq. 1
        if not last:
            agreement = torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)  # (B, J, I): u_hat . v
            logits = logits + agreement
    return RoutingResult(poses=v, coupling=coupling.transpose(1, 2), logits=logits.transpose(1, 2))

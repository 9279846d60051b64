"""Self-attention routing of Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, Sci. Rep. 2021).

One non-iterative pass from the votes ``u_hat_{j|i}`` to the parents ``v_j``. In the paper's
notation (Methods, "self-attention routing"), with ``U_j`` the ``(I, D)`` matrix of the votes
for parent ``j`` and ``B`` the learned ``(I, J)`` log priors:

* (SA-1) ``A_j = U_j U_j^T / sqrt(D)``: the self-attention matrix of parent ``j``, ``(I, I)``,
  the agreement of every pair of votes; ``sqrt(D)`` keeps its entries of order one.
* (SA-2) ``c_ij = exp(sum_k A_j[i, k]) / sum_j' exp(sum_k A_j'[i, k])``: the coupling
  coefficients, a softmax over the parents of each child's total agreement.
* (SA-3) ``s_j = U_j^T (c_j + b_j)``, i.e. ``s_j = sum_i (c_ij + b_ij) u_hat_{j|i}``.
* (SA-4) ``v_j = squash(s_j)`` with the paper's squash ``(1 - 1 / e^{|s|}) s / |s|``.

(The votes themselves, ``u_hat_{j|i} = u_i W_ij``, are the layer's: see
:class:`capsnet.models.efficient.SelfAttentionCaps`.) The equation labels SA-1..SA-4 are
this module's; they follow the order of the paper's formulas.

(SA-1) is never built: its row sums are ``sum_k A_j[i, k] = u_hat_{j|i} . (sum_k u_hat_{j|k}) / sqrt(D)``,
one dot product per vote with the sum of the votes, ``O(B I J D)`` instead of ``O(B I^2 J D)``.
``tests/test_efficient.py`` holds this against a loop over the full matrices.

Axis letters: ``B`` batch, ``I`` input (child) capsules, ``J`` output (parent) capsules,
``D`` pose dimension.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..functional import SQUASH_KINDS, squash
from ..precision import float32_under_autocast
from ..validation import check_votes

__all__ = ["SelfAttentionRoutingResult", "self_attention_routing"]


class SelfAttentionRoutingResult(NamedTuple):
    """What self-attention routing produced; the fields of :class:`~capsnet.routing.RoutingResult`.

    poses: ``(B, J, D)`` parent capsules ``v_j`` (SA-4).
    coupling: ``(B, I, J)`` coupling coefficients ``c_ij`` (SA-2), the attention of each child
        over the parents (sums to 1 over J); the weights of (SA-3) are ``coupling + prior``.
    logits: ``(B, I, J)`` the softmax's inputs, ``sum_k A_j[i, k]`` (row sums of SA-1).
    """

    poses: Tensor
    coupling: Tensor
    logits: Tensor


@float32_under_autocast
def self_attention_routing(
    votes: Tensor,
    prior: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    squash_kind: str = "efficient",
) -> SelfAttentionRoutingResult:
    """Route child votes ``u_hat_{j|i}`` to parents by self-attention, in one pass (SA-1..SA-4).

    Nothing is iterated and nothing is kept between calls; gradients come from autograd.

    Args:
        votes: predictions ``u_hat_{j|i}``, ``(B, I, J, D)``.
        prior: the log priors ``b_ij``, ``(I, J)``, shared by every sample (learned by the layer;
            the paper initialises them at 0); None adds nothing.
        scale: factor of the agreements in (SA-1); None is the paper's ``1 / sqrt(D)``.
        squash_kind: ``"efficient"`` (the paper) or ``"sabour"`` (Eq. 1 of Sabour et al. 2017),
            see :func:`~capsnet.functional.squash`.

    Shape:
        votes: ``(B, I, J, D)``; prior: ``(I, J)``; returns poses ``(B, J, D)``, coupling and
        logits ``(B, I, J)``.
    """
    _check_args(votes, prior, scale, squash_kind)
    if scale is None:
        scale = 1.0 / math.sqrt(votes.shape[-1])
    total = votes.sum(dim=1)  # (B, J, D): sum_k u_hat_{j|k}
    logits = torch.einsum("bijd,bjd->bij", votes, total) * scale  # SA-1, summed over k: (B, I, J)
    coupling = torch.softmax(logits, dim=2)  # SA-2: over the parents J
    weights = coupling if prior is None else coupling + prior  # SA-3: c_ij + b_ij, (B, I, J)
    s = torch.einsum("bij,bijd->bjd", weights, votes)  # SA-3: (B, J, D)
    poses = squash(s, dim=-1, kind=squash_kind)  # SA-4
    return SelfAttentionRoutingResult(poses=poses, coupling=coupling, logits=logits)


def _check_args(votes: Tensor, prior: Optional[Tensor], scale: Optional[float], squash_kind: str) -> None:
    check_votes(votes)
    if prior is not None:
        if prior.shape != votes.shape[1:3]:
            raise ValueError(
                f"prior must be (I, J) = {tuple(votes.shape[1:3])} for votes of shape {tuple(votes.shape)}, "
                f"got {tuple(prior.shape)}"
            )
        if prior.dtype != votes.dtype:
            raise ValueError(f"prior must have the votes' dtype {votes.dtype}, got {prior.dtype}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 or None (1 / sqrt(D)), got {scale!r}")
    if squash_kind not in SQUASH_KINDS:
        raise ValueError(f"squash_kind must be one of {SQUASH_KINDS}, got {squash_kind!r}")

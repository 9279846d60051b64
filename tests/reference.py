"""Slow, obvious reference implementations written straight from the papers' equations.

Everything here is explicit Python loops over float64 values, with no vectorisation
tricks, so that each line can be checked against the paper by eye. The fast library
code must match these on small inputs (see ``test_functional.py`` and ``test_routing.py``).

Axis letters: ``B`` batch, ``I`` input (child) capsules, ``J`` output (parent)
capsules, ``D`` pose dimension.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["reference_squash", "reference_dynamic_routing", "reference_margin_loss"]


def _squash_vector(s: list[float]) -> list[float]:
    """Eq. 1 of Sabour et al. 2017 on one vector: ``v = |s|^2 / (1 + |s|^2) * s / |s|``."""
    norm_sq = 0.0
    for x in s:
        norm_sq += x * x
    if norm_sq == 0.0:
        # The limit of Eq. 1 as s -> 0 is the zero vector.
        return [0.0 for _ in s]
    norm = math.sqrt(norm_sq)
    scale = norm_sq / (1.0 + norm_sq) / norm
    return [scale * x for x in s]


def reference_squash(s: Tensor) -> Tensor:
    """Squash, Eq. 1 of Sabour, Frosst & Hinton 2017, applied to every vector along the last axis.

    ``v = |s|^2 / (1 + |s|^2) * s / |s|`` (no eps: the zero vector maps to zero).

    Shape:
        s: ``(..., D)``; returns ``(..., D)`` in float64.
    """
    flat = s.detach().to(torch.float64).reshape(-1, s.shape[-1]).tolist()
    out = [_squash_vector(vec) for vec in flat]
    return torch.tensor(out, dtype=torch.float64).reshape(s.shape)


def reference_dynamic_routing(votes: Tensor, iterations: int, *, leaky: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Routing by agreement, Procedure 1 of Sabour, Frosst & Hinton 2017, one sample at a time.

    For every sample, with ``u_hat[i][j]`` the vote of child ``i`` for parent ``j``::

        b_ij = 0
        repeat r times:
            c_i = softmax(b_i) over parents j                      (Eq. 3)
            s_j = sum_i c_ij u_hat_j|i                             (Eq. 2)
            v_j = squash(s_j)                                      (Eq. 1)
            b_ij = b_ij + u_hat_j|i . v_j

    ``leaky=True`` is the official code's leaky routing: the softmax also sees an extra
    "orphan" parent whose logit is always 0, and that parent's share is discarded.

    Returns ``(poses, coupling, logits)``: ``v_j`` after the last iteration ``(B, J, D)``,
    the ``c_ij`` that produced it ``(B, I, J)`` and the ``b_ij`` that gave those ``c_ij``
    ``(B, I, J)`` (the procedure's final update of ``b`` is computed but feeds nothing).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    u_hat = votes.detach().to(torch.float64).tolist()  # nested lists [B][I][J][D]
    n_batch, n_in, n_out, dim = votes.shape
    all_poses, all_coupling, all_logits = [], [], []
    for b in range(n_batch):
        logits = [[0.0 for _ in range(n_out)] for _ in range(n_in)]  # b_ij, fresh for every sample
        for _ in range(iterations):
            # Eq. 3: softmax over the parents j of child i.
            coupling = []
            for i in range(n_in):
                exps = [math.exp(logits[i][j]) for j in range(n_out)]
                denom = sum(exps) + (math.exp(0.0) if leaky else 0.0)
                coupling.append([exps[j] / denom for j in range(n_out)])
            # Eq. 2: s_j = sum_i c_ij u_hat_j|i; Eq. 1: v_j = squash(s_j).
            poses = []
            for j in range(n_out):
                s_j = [0.0] * dim
                for i in range(n_in):
                    for d in range(dim):
                        s_j[d] += coupling[i][j] * u_hat[b][i][j][d]
                poses.append(_squash_vector(s_j))
            used_logits = [row[:] for row in logits]
            # Agreement: b_ij += u_hat_j|i . v_j
            for i in range(n_in):
                for j in range(n_out):
                    dot = 0.0
                    for d in range(dim):
                        dot += u_hat[b][i][j][d] * poses[j][d]
                    logits[i][j] += dot
        all_poses.append(poses)
        all_coupling.append(coupling)
        all_logits.append(used_logits)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_tensor(all_poses), as_tensor(all_coupling), as_tensor(all_logits)


def reference_margin_loss(
    lengths: Tensor,
    labels: Tensor,
    *,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> Tensor:
    """Margin loss, Eq. 4 of Sabour, Frosst & Hinton 2017: sum over classes, mean over the batch.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`` with
    ``m+ = 0.9, m- = 0.1, lambda = 0.5``. ``labels`` are integer classes ``(B,)`` (then
    ``T_k = 1`` iff ``k`` is the label) or multi-hot targets ``(B, J)`` giving ``T_k`` directly.

    Shape:
        lengths: ``(B, J)``; labels: ``(B,)`` or ``(B, J)``; returns a float64 scalar.
    """
    lens = lengths.detach().to(torch.float64).tolist()
    n_batch, n_classes = len(lens), len(lens[0])
    if labels.dim() == 1:
        targets = [[1.0 if k == int(labels[b]) else 0.0 for k in range(n_classes)] for b in range(n_batch)]
    else:
        targets = labels.detach().to(torch.float64).tolist()
    total = 0.0
    for b in range(n_batch):
        per_sample = 0.0
        for k in range(n_classes):
            t_k, v_k = targets[b][k], lens[b][k]
            per_sample += t_k * max(0.0, m_pos - v_k) ** 2
            per_sample += lam * (1.0 - t_k) * max(0.0, v_k - m_neg) ** 2
        total += per_sample
    return torch.tensor(total / n_batch, dtype=torch.float64)

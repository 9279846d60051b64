"""Multi-digit scoring and objectives (Sabour et al. 2017, Sec. 6, MultiMNIST).

Pure functions first, then two objectives with the interface of
:class:`capsnet.train.objectives.Objective` (``loss``, ``scores``) plus the two hooks a
multi-digit target needs: ``teacher(labels)`` (what the model gets as ``y``) and
``correct(output, labels)`` (per-sample correctness). They do not subclass ``Objective``
so that ``train/objectives.py`` can import this module without an import cycle.

Labels may be a :class:`capsnet.data.multimnist.MultiDigitTarget` (``classes`` ``(B, K)``
and ``digits`` ``(B, K, C, H, W)``) or a plain tensor of classes, ``(B,)`` or ``(B, K)``;
with plain single-digit labels the input image is the digit's reconstruction target.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .functional import margin_loss

__all__ = [
    "MultiDigitMarginObjective",
    "SigmoidCrossEntropyObjective",
    "matched_reconstruction_loss",
    "multi_hot",
    "sigmoid_cross_entropy",
    "two_digit_accuracy",
    "two_digit_correct",
]


def _classes(labels: Any) -> Tensor:
    """``(B, K)`` integer classes from a MultiDigitTarget or a ``(B,)`` / ``(B, K)`` tensor."""
    classes = labels.classes if hasattr(labels, "classes") else labels
    if not isinstance(classes, Tensor):
        raise ValueError(f"labels must be a tensor of classes or have a `classes` tensor, got {type(labels).__name__}")
    if classes.dim() == 1:
        classes = classes[:, None]
    if classes.dim() != 2 or classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise ValueError(f"classes must be (B,) or (B, K) integers, got shape {tuple(classes.shape)} dtype {classes.dtype}")
    return classes


def multi_hot(classes: Tensor, num_classes: int) -> Tensor:
    """Ones at each sample's classes: the targets ``T_k`` of Eq. 4 for several digits.

    Shape:
        classes: ``(B, K)`` integers in ``[0, num_classes)``; returns ``(B, num_classes)`` float.
    """
    classes = _classes(classes)
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes - 1}], got min {int(classes.min())} max {int(classes.max())}")
    out = torch.zeros(classes.shape[0], num_classes, device=classes.device)
    return out.scatter_(1, classes.long(), 1.0)


def two_digit_correct(scores: Tensor, classes: Tensor) -> Tensor:
    """Per sample: are the ``K`` highest scores exactly the ``K`` labelled classes, as a set?

    Sabour et al. 2017, Sec. 6: a MultiMNIST image counts as correctly classified when its
    two most active digit capsules are exactly its two digits (order does not matter).
    With ``K = 1`` this is ordinary argmax accuracy.

    Shape:
        scores: ``(B, J)``; classes: ``(B, K)`` distinct integers per row (or ``(B,)``);
        returns ``(B,)`` bool.
    """
    classes = _classes(classes)
    if scores.dim() != 2 or scores.shape[0] != classes.shape[0]:
        raise ValueError(f"scores must be (B, J) with B = {classes.shape[0]}, got shape {tuple(scores.shape)}")
    k = classes.shape[1]
    if k > scores.shape[1]:
        raise ValueError(f"{k} labelled classes per sample but only {scores.shape[1]} scores")
    wanted = classes.long().sort(dim=1).values
    if k > 1 and bool((wanted[:, 1:] == wanted[:, :-1]).any()):
        raise ValueError("the classes of a sample must all differ (MultiMNIST pairs digits of different classes)")
    top = scores.topk(k, dim=1).indices.sort(dim=1).values
    return (top == wanted.to(top.device)).all(dim=1)


def two_digit_accuracy(scores: Tensor, classes: Tensor) -> float:
    """Fraction of samples whose top-``K`` classes are exactly their ``K`` digits (see :func:`two_digit_correct`).

    Shape:
        scores: ``(B, J)``; classes: ``(B, K)``; returns a Python float.
    """
    return float(two_digit_correct(scores, classes).float().mean())


def matched_reconstruction_loss(
    reconstructions: Tensor, masks: Tensor, classes: Tensor, digits: Tensor, *, weight: float = 0.0005
) -> Tensor:
    """Reconstruction loss of each masked capsule against the digit of its class (Sec. 6).

    Reconstruction ``k`` was decoded from the capsule of class ``masks[:, k]``; its target
    is the digit image whose class is ``masks[:, k]``, or a black image when no digit of
    the sample has that class (a wrongly chosen capsule at test time should draw nothing).
    In training the masks are the true classes, so reconstruction ``k`` meets digit ``k``.
    Each term is the summed squared pixel error, mean over the batch, times ``weight``
    (Sec. 4.1), summed over the ``K`` reconstructions.

    Shape:
        reconstructions: ``(B, K, C, H, W)``; masks: ``(B, K)``; classes: ``(B, T)``;
        digits: ``(B, T, C, H, W)``; returns a scalar.
    """
    if reconstructions.dim() != 5 or masks.shape != reconstructions.shape[:2]:
        raise ValueError(
            f"reconstructions must be (B, K, C, H, W) with masks (B, K), got {tuple(reconstructions.shape)} and {tuple(masks.shape)}"
        )
    if digits.dim() != 5 or digits.shape[:2] != classes.shape or digits.shape[2:] != reconstructions.shape[2:]:
        raise ValueError(
            f"digits must be (B, T, C, H, W) = (B, T, {', '.join(map(str, reconstructions.shape[2:]))}) with classes (B, T); "
            f"got {tuple(digits.shape)} and {tuple(classes.shape)}"
        )
    match = (masks[:, :, None] == classes[:, None, :]).to(digits.dtype)  # (B, K, T): one 1 at most per row
    targets = torch.einsum("bkt,btchw->bkchw", match, digits)
    return weight * (reconstructions - targets).pow(2).flatten(2).sum(dim=2).mean(dim=0).sum()


def sigmoid_cross_entropy(logits: Tensor, classes: Tensor) -> Tensor:
    """Independent sigmoid cross-entropy per class against the multi-hot digits, summed over classes, mean over the batch.

    The loss of the paper's MultiMNIST baseline CNN (Sec. 6: sigmoid cross-entropy).

    Shape:
        logits: ``(B, J)``; classes: ``(B, K)`` or ``(B,)``; returns a scalar.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, J), got shape {tuple(logits.shape)}")
    target = multi_hot(classes, logits.shape[1]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1).mean()


def _digits(labels: Any, images: Tensor, k: int) -> Tensor:
    """Each digit's own image: ``labels.digits``, or the input itself for single-digit labels."""
    if hasattr(labels, "digits"):
        return labels.digits
    if k == 1:
        return images[:, None]
    raise ValueError(f"labels with {k} classes per sample need each digit's image (a MultiDigitTarget) for the reconstruction loss")


class MultiDigitMarginObjective:
    """Margin loss (Eq. 4) on multi-hot targets + ``recon_weight`` x per-digit reconstruction loss (Sec. 6).

    Needs a model whose output has ``reconstructions`` ``(B, K, C, H, W)`` and ``masks``
    ``(B, K)`` (``capsnet_multimnist``) unless ``recon_weight`` is 0 or it has no decoder.
    Accuracy is :func:`two_digit_correct`.

    Shape:
        output.lengths: ``(B, J)``; labels: a MultiDigitTarget or ``(B,)`` / ``(B, K)`` classes;
        loss: a scalar; scores: ``(B, J)``; correct: ``(B,)`` bool; teacher: ``(B, K)`` or ``(B,)``.
    """

    def __init__(self, *, recon_weight: float = 0.0005, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5):
        self.recon_weight, self.m_pos, self.m_neg, self.lam = recon_weight, m_pos, m_neg, lam

    def teacher(self, labels: Any) -> Tensor:
        """The classes that mask the decoder in training (Sec. 4.1: the true ones)."""
        return labels.classes if hasattr(labels, "classes") else labels

    def loss(self, output, images: Tensor, labels: Any, step: int) -> Tensor:
        classes = _classes(labels)
        loss = margin_loss(
            output.lengths, multi_hot(classes, output.lengths.shape[1]).to(output.lengths), m_pos=self.m_pos, m_neg=self.m_neg, lam=self.lam
        )
        if self.recon_weight and output.reconstruction is not None:
            if getattr(output, "reconstructions", None) is None:
                raise ValueError("the multi_margin objective needs per-digit `reconstructions` and `masks` (use capsnet_multimnist)")
            digits = _digits(labels, images, classes.shape[1])
            loss = loss + matched_reconstruction_loss(output.reconstructions, output.masks, classes, digits, weight=self.recon_weight)
        return loss

    def scores(self, output) -> Tensor:
        return output.lengths

    def correct(self, output, labels: Any) -> Tensor:
        return two_digit_correct(self.scores(output), _classes(labels))


class SigmoidCrossEntropyObjective:
    """Sigmoid cross-entropy on ``output.logits`` against the multi-hot digits: the MultiMNIST baseline CNN (Sec. 6).

    Shape:
        output.logits: ``(B, J)``; labels as for :class:`MultiDigitMarginObjective`; loss: a
        scalar; correct: ``(B,)`` bool.
    """

    def teacher(self, labels: Any) -> Tensor:
        return labels.classes if hasattr(labels, "classes") else labels

    def loss(self, output, images: Tensor, labels: Any, step: int) -> Tensor:
        return sigmoid_cross_entropy(output.logits, _classes(labels))

    def scores(self, output) -> Tensor:
        return output.logits

    def correct(self, output, labels: Any) -> Tensor:
        return two_digit_correct(self.scores(output), _classes(labels))

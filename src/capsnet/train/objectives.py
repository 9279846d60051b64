"""Training objectives: how a model's output becomes a loss and class scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import activation_cross_entropy, margin_loss, matched_reconstruction_loss, multi_digit_classes, multi_hot, reconstruction_loss, sigmoid_cross_entropy, spread_loss, two_digit_correct
from .schedules import spread_margin

__all__ = ["MultiDigitMarginObjective", "Objective", "SigmoidCrossEntropyObjective", "create_objective"]


class Objective:
    """``loss(output, images, labels, step)`` for training and ``scores(output)`` for accuracy.

    ``teacher(labels)`` is what the model gets as ``y`` in training, ``correct(output, labels)``
    which samples are right: multi-digit objectives (MultiMNIST) override both.
    """

    def loss(self, output: Any, images: Tensor, labels: Tensor, step: int) -> Tensor:
        raise NotImplementedError

    def scores(self, output: Any) -> Tensor:
        raise NotImplementedError

    def teacher(self, labels: Any) -> Tensor:
        return labels

    def correct(self, output: Any, labels: Tensor) -> Tensor:
        return self.scores(output).argmax(dim=1) == labels


class MarginObjective(Objective):
    """Margin loss (Eq. 4) + ``recon_weight`` x reconstruction loss, Sabour et al. 2017."""

    def __init__(self, *, recon_weight: float = 0.0005, m_pos: float = 0.9, m_neg: float = 0.1, lam: float = 0.5):
        self.recon_weight, self.m_pos, self.m_neg, self.lam = recon_weight, m_pos, m_neg, lam

    def loss(self, output, images, labels, step):
        loss = margin_loss(output.lengths, labels, m_pos=self.m_pos, m_neg=self.m_neg, lam=self.lam)
        if self.recon_weight and output.reconstruction is not None:
            loss = loss + reconstruction_loss(output.reconstruction, images, weight=self.recon_weight)
        return loss

    def scores(self, output):
        return output.lengths


class SpreadObjective(Objective):
    """Spread loss (Eq. 3, Hinton et al. 2018) with its margin schedule from 0.2 to 0.9.

    ``recon_weight`` (default 0, the paper): plus that times the reconstruction loss of a model
    built with a decoder (Sabour et al. 2017's, not in the EM paper). A weight without a decoder
    is refused, and so is a decoder without a weight (nothing would train it).
    """

    def __init__(self, *, recon_weight: float = 0.0, **schedule):
        if not recon_weight >= 0:
            raise ValueError(f"recon_weight must be >= 0, got {recon_weight!r}")
        self.recon_weight, self.schedule = float(recon_weight), schedule

    def loss(self, output, images, labels, step):
        loss = spread_loss(output.activations, labels, margin=spread_margin(step, **self.schedule))
        has_decoder = getattr(output, "reconstruction", None) is not None
        if self.recon_weight and not has_decoder:
            raise ValueError("the spread objective's recon_weight needs a model with a decoder (em_* models: decoder=True)")
        if has_decoder and not self.recon_weight:  # nothing would train the decoder, and DDP refuses unused parameters
            raise ValueError("a model with a decoder needs the spread objective's recon_weight > 0 (e.g. 0.0005), or decoder=False")
        if self.recon_weight:
            loss = loss + reconstruction_loss(output.reconstruction, images, weight=self.recon_weight)
        return loss

    def scores(self, output):
        return output.activations


class ActivationCrossEntropyObjective(Objective):
    """Softmax cross-entropy on the logits of ``output.activations`` (an option for EM capsules; the paper's loss is "spread")."""

    def loss(self, output, images, labels, step):
        return activation_cross_entropy(output.activations, labels)

    def scores(self, output):
        return output.activations


class CrossEntropyObjective(Objective):
    """Softmax cross-entropy on ``output.logits`` (the paper's baseline CNNs)."""

    def loss(self, output, images, labels, step):
        return torch.nn.functional.cross_entropy(output.logits, labels)

    def scores(self, output):
        return output.logits


def _digits(labels: Any, images: Tensor, k: int) -> Tensor:
    """Each digit's own image: ``labels.digits``, or the input itself for single-digit labels."""
    if hasattr(labels, "digits"):
        return labels.digits
    if k == 1:
        return images[:, None]
    raise ValueError(f"labels with {k} classes per sample need each digit's image (a MultiDigitTarget) for the reconstruction loss")


class MultiDigitMarginObjective(Objective):
    """Margin loss (Eq. 4) on multi-hot targets + ``recon_weight`` x per-digit reconstruction loss (Sec. 6).

    Needs a model whose output has ``reconstructions`` ``(B, K, C, H, W)`` and ``masks``
    ``(B, K)`` (``capsnet_multimnist``) unless ``recon_weight`` is 0 or it has no decoder.
    Accuracy is :func:`capsnet.functional.two_digit_correct`.

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
        classes = multi_digit_classes(labels)
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
        return two_digit_correct(self.scores(output), multi_digit_classes(labels))


class SigmoidCrossEntropyObjective(Objective):
    """Sigmoid cross-entropy on ``output.logits`` against the multi-hot digits: the MultiMNIST baseline CNN (Sec. 6).

    Shape:
        output.logits: ``(B, J)``; labels as for :class:`MultiDigitMarginObjective`; loss: a
        scalar; correct: ``(B,)`` bool.
    """

    def teacher(self, labels: Any) -> Tensor:
        return labels.classes if hasattr(labels, "classes") else labels

    def loss(self, output, images: Tensor, labels: Any, step: int) -> Tensor:
        return sigmoid_cross_entropy(output.logits, multi_digit_classes(labels))

    def scores(self, output) -> Tensor:
        return output.logits

    def correct(self, output, labels: Any) -> Tensor:
        return two_digit_correct(self.scores(output), multi_digit_classes(labels))


_OBJECTIVES = {
    "margin": MarginObjective,
    "spread": SpreadObjective,
    "activation_cross_entropy": ActivationCrossEntropyObjective,  # EM capsules, not the paper's (functional.py)
    "cross_entropy": CrossEntropyObjective,
    "multi_margin": MultiDigitMarginObjective,  # MultiMNIST CapsNet, Sabour et al. 2017 Sec. 6
    "sigmoid_cross_entropy": SigmoidCrossEntropyObjective,  # MultiMNIST baseline CNN, Sec. 6
}


def create_objective(name: str, **kwargs) -> Objective:
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(_OBJECTIVES)}")
    try:
        return _OBJECTIVES[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad objective_kwargs for {name!r}: {exc}") from None

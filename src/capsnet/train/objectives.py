"""Training objectives: how a model's output becomes a loss and class scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..functional import margin_loss, reconstruction_loss, spread_loss
from ..metrics import MultiDigitMarginObjective, SigmoidCrossEntropyObjective

__all__ = ["Objective", "create_objective"]


class Objective:
    """``loss(output, images, labels, step)`` for training and ``scores(output)`` for accuracy.

    ``teacher(labels)`` is what the model gets as ``y`` in training, ``correct(output, labels)``
    which samples are right: multi-digit objectives (``capsnet.metrics``) override both.
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
    """Spread loss (Eq. 3, Hinton et al. 2018) with its margin schedule from 0.2 to 0.9."""

    def __init__(self, **schedule):
        self.schedule = schedule

    def loss(self, output, images, labels, step):
        from ..schedules import spread_margin

        return spread_loss(output.activations, labels, margin=spread_margin(step, **self.schedule))

    def scores(self, output):
        return output.activations


class CrossEntropyObjective(Objective):
    """Softmax cross-entropy on ``output.logits`` (the paper's baseline CNNs)."""

    def loss(self, output, images, labels, step):
        return torch.nn.functional.cross_entropy(output.logits, labels)

    def scores(self, output):
        return output.logits


_OBJECTIVES = {
    "margin": MarginObjective,
    "spread": SpreadObjective,
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

"""Evaluation: accuracy and loss of a model on a whole split, under the run's precision."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..data import ExperimentData
from ..precision import resolve_amp
from .config import AMP_DTYPES
from .distributed import Dist
from .objectives import Objective

__all__ = ["autocast_for", "evaluate"]

log = logging.getLogger("capsnet.train.loop")  # the training log's name, as before the split


@torch.no_grad()
def evaluate(
    model, data: ExperimentData, split: str, objective: Objective, *, batch_size: int = 256, device="cpu", step: int = 0,
    dist: Optional[Dist] = None, amp: Optional[str] = None,
) -> dict:
    """Accuracy and mean loss of ``model`` on every sample of ``split``, without augmentation.

    Returns ``{"accuracy", "loss", "samples"}``; on a split of 0 samples accuracy and loss are
    None (with a warning), not 0.0. Under ``torch.distributed`` each rank evaluates every
    ``world``-th batch and the counts are summed. ``amp``: the forward pass and the loss under
    autocast, as in training (a config's value; ``"auto"`` resolves for ``device``).
    """
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0.0, 0.0, 0.0
    for k, (images, labels) in enumerate(data.eval_batches(split, batch_size)):
        if k % dist.world != dist.rank:
            continue
        images, labels = images.to(device), labels.to(device)
        with autocast_for(amp, device):
            out = model(images)
            loss = objective.loss(out, images, labels, step)
        correct += float(objective.correct(out, labels).sum())
        loss_sum += float(loss) * len(labels)
        total += len(labels)
    correct, total, loss_sum = dist.sum([correct, total, loss_sum], device=device)
    model.train(was_training)
    if not total:  # an accuracy of 0.0 would read as a result; TrainConfig refuses empty splits, other data may not
        log.warning("the %s split has 0 samples: no accuracy or loss to report (None)", split)
        return {"accuracy": None, "loss": None, "samples": 0}
    return {"accuracy": correct / total, "loss": loss_sum / total, "samples": int(total)}


def autocast_for(amp: Optional[str], device) -> torch.autocast:
    """``torch.autocast`` for a config's ``amp`` on ``device`` (disabled for float32)."""
    amp = resolve_amp(amp, device)
    dtype = getattr(torch, AMP_DTYPES[amp]) if amp else None
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)

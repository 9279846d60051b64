"""In-memory datasets for one experiment: train / validation / test and their batch transforms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .transforms import to_float

__all__ = ["ExperimentData", "Split"]


@dataclass
class Split:
    """Images ``(N, C, H, W)`` (uint8 or float) and integer labels ``(N,)`` or ``(N, k)``."""

    images: Tensor
    labels: Tensor

    def __post_init__(self):
        if self.images.dim() != 4:
            raise ValueError(f"split images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.images.shape[0]


class ExperimentData:
    """Train, validation and test splits with the batch transforms of one experiment.

    ``train_batch`` applies the training augmentation with the caller's generator,
    so the training loop owns (and checkpoints) every random number it uses.
    Subclasses that synthesise samples on the fly override ``train_batch``.
    """

    def __init__(
        self,
        *,
        name: str,
        train: Split,
        val: Split,
        test: Split,
        num_classes: int,
        augment: Optional[Callable[[Tensor, torch.Generator], Tensor]] = None,
        decode: Callable[[Tensor], Tensor] = to_float,
    ):
        self.name = name
        self.splits = {"train": train, "val": val, "test": test}
        self.num_classes = num_classes
        self.augment = augment
        self.decode = decode

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.splits["train"].images.shape[1:])

    def size(self, split: str) -> int:
        return len(self._split(split))

    def _split(self, split: str) -> Split:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        return self.splits[split]

    def train_batch(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Augmented float images and labels of the training samples at ``index``."""
        split = self.splits["train"]
        images = self.decode(split.images[index])
        if self.augment is not None:
            images = self.augment(images, generator)
        return images, split.labels[index]

    def eval_batches(self, split: str, batch_size: int):
        """Yield un-augmented ``(images, labels)`` batches of ``split`` in order."""
        data = self._split(split)
        for start in range(0, len(data), batch_size):
            yield self.decode(data.images[start : start + batch_size]), data.labels[start : start + batch_size]

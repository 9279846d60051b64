"""A tiny learnable dataset generated from a seed: smoke runs and tests without files."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ExperimentData, Split
from .registry import register_dataset

__all__ = ["synthetic_data"]


@register_dataset("synthetic")
def synthetic_data(
    root: Path,
    *,
    download: bool = False,
    seed: int = 0,
    train_size: int = 256,
    val_size: int = 64,
    test_size: int = 64,
    image_size: int = 28,
    channels: int = 1,
    num_classes: int = 10,
) -> ExperimentData:
    """Each class is a fixed random binary pattern; a sample is its pattern plus uniform noise.

    ``root`` and ``download`` are accepted for a uniform signature and ignored.
    """
    for key, value, least in (
        ("train_size", train_size, 1), ("val_size", val_size, 0), ("test_size", test_size, 0),
        ("image_size", image_size, 1), ("channels", channels, 1), ("num_classes", num_classes, 1),
    ):
        if value < least:
            raise ValueError(f"synthetic dataset option {key!r} must be >= {least}, got {value}; fix it in dataset_kwargs")
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(num_classes, channels, image_size, image_size, generator=g) > 0.7).float()

    def make(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.rand(n, channels, image_size, image_size, generator=g)
        return Split((0.7 * prototypes[labels] + 0.3 * noise).clamp_(0, 1), labels)

    return ExperimentData(
        name="synthetic", train=make(train_size), val=make(val_size), test=make(test_size), num_classes=num_classes
    )

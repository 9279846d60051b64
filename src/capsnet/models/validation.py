"""Boundary checks shared by the models' ``forward``: clear errors instead of deep crashes."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_images", "check_labels"]


def check_images(x: Tensor, channels: int, size: tuple[int, int], *, name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x`` is a finite floating ``(B, channels, *size)`` tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    expected = f"(B, {channels}, {size[0]}, {size[1]})"
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), shape {expected}; got {tuple(x.shape)}")
    if tuple(x.shape[2:]) != tuple(size):
        raise ValueError(f"{name} must be {size[0]}x{size[1]} pixels, shape {expected}; got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor (e.g. uint8 images / 255), got dtype {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN or infinite value(s); clean the data before the model sees it")


def check_labels(y: Tensor, batch: int, num_classes: int, *, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``y`` is ``(batch,)`` integer labels in ``[0, num_classes)``."""
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got min {int(y.min())} max {int(y.max())}")

"""Batched tensor transforms (no per-sample Python loops) and the train/validation split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_shift", "to_float", "train_val_split"]


def to_float(images: Tensor) -> Tensor:
    """uint8 pixels to floats in [0, 1]; floating images pass through unchanged."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by an independent random offset in ``[-max_shift, max_shift]`` per axis, filling with zeros.

    The paper's only MNIST augmentation (Sabour et al. 2017, Sec. 5: "shifted by up to
    2 pixels in each direction with zero padding").

    Shape:
        images: ``(B, C, H, W)``; returns the same shape and dtype.
    """
    if images.dim() != 4:
        raise ValueError(f"random_shift expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0 or images.shape[0] == 0:
        return images
    b, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def train_val_split(n: int, val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed, seeded split of ``range(n)`` into sorted train and validation indices."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must lie in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values

"""The MultiMNIST figure (Sabour et al. 2017, Fig. 5): inputs above their two reconstructions in two colours."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .figures import _image, _save

__all__ = ["multimnist_figure", "two_colour_overlay"]


def two_colour_overlay(first: Tensor, second: Tensor) -> np.ndarray:
    """Two single-channel images as one RGB picture: the first in red, the second in green (overlap: yellow).

    Shape:
        first, second: ``(1, H, W)`` or ``(H, W)`` in [0, 1]; returns an ``(H, W, 3)`` float array.
    """
    a, b = (t.detach().float().cpu().clamp(0, 1) for t in (first, second))
    if a.dim() == 3 and a.shape[0] == 1:
        a, b = a[0], b[0]
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"need two (1, H, W) or (H, W) images of one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    return torch.stack([a, b, torch.zeros_like(a)], dim=-1).numpy()


def multimnist_figure(
    images: Tensor,
    reconstructions: Tensor,
    path: str | Path,
    *,
    classes: Optional[Tensor] = None,
    masks: Optional[Tensor] = None,
) -> Path:
    """Top row: the overlaid inputs (titled ``L:`` with the true classes); bottom row: the two
    reconstructions, the first in red and the second in green (titled ``R:`` with the
    classes of the capsules that drew them), as in the paper's Fig. 5.

    Shape:
        images: ``(N, 1, H, W)`` in [0, 1]; reconstructions: ``(N, 2, 1, H, W)``;
        classes, masks: ``(N, 2)`` integers or None.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W) grey overlays, got shape {tuple(images.shape)}")
    n = images.shape[0]
    if reconstructions.shape != (n, 2, *images.shape[1:]):
        raise ValueError(
            f"reconstructions must be (N, 2, 1, H, W) = {(n, 2, *images.shape[1:])} for these images, got {tuple(reconstructions.shape)}"
        )
    for name, pairs in (("classes", classes), ("masks", masks)):
        if pairs is not None and tuple(pairs.shape) != (n, 2):
            raise ValueError(f"{name} must be ({n}, 2), got {tuple(pairs.shape)}")

    def pair(t: Tensor, i: int) -> str:
        return ",".join(str(int(v)) for v in t[i])

    fig = Figure(figsize=(1.2 * n, 2.8))
    for i in range(n):
        ax = fig.add_subplot(2, n, i + 1)
        ax.imshow(_image(images[i]), cmap="gray", vmin=0, vmax=1)
        if classes is not None:
            ax.set_title(f"L:({pair(classes, i)})", fontsize=7)
        ax = fig.add_subplot(2, n, n + i + 1)
        ax.imshow(two_colour_overlay(reconstructions[i, 0], reconstructions[i, 1]))
        if masks is not None:
            ax.set_title(f"R:({pair(masks, i)})", fontsize=7)
    for k, ax in enumerate(fig.axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k == 0:
            ax.set_ylabel("input", fontsize=7)
        if k == 1:
            ax.set_ylabel("reconstructions", fontsize=7)
    return _save(fig, path)

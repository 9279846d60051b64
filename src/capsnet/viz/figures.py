"""Figures as PNG files, drawn with matplotlib's object API (no pyplot, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..train.logs import read_metrics_csv

__all__ = [
    "POSE_STEPS",
    "coupling_figure",
    "pose_perturbation_figure",
    "pose_perturbations",
    "reconstruction_figure",
    "training_curves_figure",
]

#: Sabour et al. 2017, Fig. 4: each dimension tweaked by intervals of 0.05 in [-0.25, 0.25].
POSE_STEPS = tuple(round(0.05 * k, 2) for k in range(-5, 6))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _image(t: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] to something imshow draws: (H, W) or (H, W, 3)."""
    a = t.detach().float().cpu().clamp(0, 1).numpy()
    return a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)


def reconstruction_figure(images: Tensor, reconstructions: Tensor, path: str | Path, *, labels: Sequence[int] | None = None) -> Path:
    """Inputs (top row) above their reconstructions (bottom row).

    Shape:
        images, reconstructions: ``(N, C, H, W)`` in [0, 1].
    """
    if images.shape != reconstructions.shape:
        raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape")
    n = images.shape[0]
    fig = Figure(figsize=(1.2 * n, 2.6))
    for i in range(n):
        for row, (batch, title) in enumerate(((images, "input"), (reconstructions, "reconstruction"))):
            ax = fig.add_subplot(2, n, row * n + i + 1)
            ax.imshow(_image(batch[i]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=7)
            if row == 0 and labels is not None:
                ax.set_title(str(int(labels[i])), fontsize=8)
    return _save(fig, path)


@torch.no_grad()
def pose_perturbations(model, poses: Tensor, label: int, steps: Sequence[float] = POSE_STEPS) -> Tensor:
    """Decode the class capsule ``label`` with each pose dimension tweaked by each step.

    Shape:
        poses: ``(J, D)`` one sample's class capsules; returns ``(D, len(steps), C, H, W)``.
    """
    if poses.dim() != 2:
        raise ValueError(f"poses must be (J, D) for one sample, got {tuple(poses.shape)}")
    dims = poses.shape[1]
    delta = torch.tensor(steps, dtype=poses.dtype, device=poses.device)
    tweaked = poses.expand(dims, len(steps), *poses.shape).clone()  # (D, S, J, D)
    tweaked[torch.arange(dims), :, label, torch.arange(dims)] += delta
    flat = tweaked.reshape(-1, *poses.shape)
    labels = torch.full((flat.shape[0],), label, dtype=torch.long, device=poses.device)
    images = model.reconstruct(flat, labels)
    return images.reshape(dims, len(steps), *images.shape[1:])


def pose_perturbation_figure(grid: Tensor, path: str | Path, *, steps: Sequence[float] = POSE_STEPS) -> Path:
    """One row per pose dimension, one column per perturbation (Sabour et al. 2017, Fig. 4).

    Shape:
        grid: ``(D, S, C, H, W)`` from :func:`pose_perturbations`.
    """
    dims, n_steps = grid.shape[:2]
    fig = Figure(figsize=(0.55 * n_steps + 0.6, 0.55 * dims + 0.4))
    for d in range(dims):
        for s in range(n_steps):
            ax = fig.add_subplot(dims, n_steps, d * n_steps + s + 1)
            ax.imshow(_image(grid[d, s]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if s == 0:
                ax.set_ylabel(str(d), fontsize=6, rotation=0, labelpad=8)
            if d == 0:
                ax.set_title(f"{steps[s]:+.2f}", fontsize=6)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return _save(fig, path)


def training_curves_figure(csv_path: str | Path, path: str | Path) -> Path:
    """Loss and accuracy against step from a run's ``metrics.csv``."""
    rows = read_metrics_csv(csv_path)
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, ys = series.setdefault(r["tag"], ([], []))
        xs.append(r["step"])
        ys.append(r["value"])
    fig = Figure(figsize=(10, 3.5))
    for k, (title, tags) in enumerate((("loss", ("train/loss", "val/loss")), ("accuracy", ("train/accuracy", "val/accuracy")))):
        ax = fig.add_subplot(1, 2, k + 1)
        for tag in tags:
            if tag in series:
                ax.plot(*series[tag], label=tag, marker="." if tag.startswith("val") else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def coupling_figure(image: Tensor, coupling: Tensor, path: str | Path, *, types: int, label: int | None = None) -> Path:
    """Where one input's primary capsules route: mean coupling ``c_ij`` per primary type and class.

    Shape:
        image: ``(C, H, W)``; coupling: ``(I, J)`` with ``I = types * positions`` (type-major).
    """
    n_in, n_out = coupling.shape
    if n_in % types:
        raise ValueError(f"{n_in} input capsules do not split into {types} types")
    per_type = coupling.detach().float().cpu().reshape(types, n_in // types, n_out).mean(1).numpy()
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 3, 1)
    ax.imshow(_image(image), cmap="gray")
    ax.set_title("input" + ("" if label is None else f" ({label})"), fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(1, 3, (2, 3))
    shown = ax.imshow(per_type, aspect="auto", cmap="viridis")
    ax.set_xlabel("class capsule j")
    ax.set_ylabel("primary capsule type")
    ax.set_xticks(range(n_out))
    ax.set_title("mean coupling coefficient c_ij", fontsize=9)
    fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    return _save(fig, path)

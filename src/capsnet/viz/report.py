"""All figures of a trained CapsNet at once: what ``capsnet viz`` and ``make demo`` write."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import ExperimentData
from .figures import coupling_figure, pose_perturbation_figure, pose_perturbations, reconstruction_figure, training_curves_figure
from .multimnist import multimnist_figure

__all__ = ["write_figures"]


@torch.no_grad()
def write_figures(model, data: ExperimentData, out_dir: str | Path, *, split: str = "test", n: int = 8, metrics_csv: str | Path | None = None, device="cpu") -> list[Path]:
    """Reconstructions, pose perturbations and routing of the first ``n`` images of ``split``; curves from the CSV."""
    out = Path(out_dir)
    written: list[Path] = []
    images, labels = next(data.eval_batches(split, n))
    images = images.to(device)
    model.eval()
    output = model(images)
    if hasattr(labels, "classes"):  # MultiMNIST: two digits per image
        if getattr(output, "reconstructions", None) is not None:
            written.append(multimnist_figure(images, output.reconstructions, out / "multimnist.png", classes=labels.classes, masks=output.masks))
        labels = labels.classes[:, 0]
    if getattr(output, "reconstruction", None) is not None:
        written.append(reconstruction_figure(images, output.reconstruction, out / "reconstructions.png", labels=labels.tolist()))
        scores = output.lengths if getattr(output, "lengths", None) is not None else output.activations  # EM: activations
        grid = pose_perturbations(model, output.poses[0].flatten(1), int(scores[0].argmax()))
        written.append(pose_perturbation_figure(grid, out / "pose_perturbations.png"))
    if getattr(output, "coupling", None) is not None and hasattr(model, "primary"):
        written.append(coupling_figure(images[0], output.coupling[0], out / "routing.png", types=model.primary.types, label=int(labels[0])))
    if metrics_csv is not None and Path(metrics_csv).exists():
        written.append(training_curves_figure(metrics_csv, out / "training_curves.png"))
    return written

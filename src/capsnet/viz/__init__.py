"""Figures: reconstructions, pose perturbations, routing and training curves."""

from .figures import (
    POSE_STEPS,
    coupling_figure,
    pose_perturbation_figure,
    pose_perturbations,
    reconstruction_figure,
    training_curves_figure,
)
from .report import write_figures

__all__ = [
    "POSE_STEPS",
    "coupling_figure",
    "pose_perturbation_figure",
    "pose_perturbations",
    "reconstruction_figure",
    "training_curves_figure",
    "write_figures",
]

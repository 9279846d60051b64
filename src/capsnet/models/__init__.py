"""Assembled models and the registry that builds them by name."""

# Imported to register their models: the baseline CNNs, Efficient-CapsNet, the EM models, the MultiMNIST CapsNet.
from . import baselines, efficient, em, multimnist  # noqa: F401
from .capsnet import CapsNet, CapsNetOutput
from .registry import create_model, list_models, register_model

__all__ = ["CapsNet", "CapsNetOutput", "create_model", "list_models", "register_model"]

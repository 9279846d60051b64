"""Assembled models and the registry that builds them by name."""

from .capsnet import CapsNet, CapsNetOutput
from .registry import create_model, list_models, register_model
from . import em  # noqa: F401  (registers EM models)
from . import baselines, multimnist  # noqa: F401  (registers the baseline CNNs and the MultiMNIST CapsNet)
from . import efficient  # noqa: F401  (registers Efficient-CapsNet)

__all__ = ["CapsNet", "CapsNetOutput", "create_model", "list_models", "register_model"]

"""Assembled models and the registry that builds them by name."""

from .capsnet import CapsNet, CapsNetOutput
from .registry import create_model, list_models, register_model

__all__ = ["CapsNet", "CapsNetOutput", "create_model", "list_models", "register_model"]

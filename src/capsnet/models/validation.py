"""The models' boundary checks; they live in :mod:`capsnet.validation`, shared with the layers."""

from __future__ import annotations

from typing import Any

from ..validation import check_images, check_keywords, check_labels

__all__ = ["check_images", "check_labels", "check_model_kwargs"]


def check_model_kwargs(model: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the key when a ``model_kwargs`` value does not fit the builder's annotations.

    Read from the model class the builder returns (``capsnet_mnist(**overrides) -> CapsNet``):
    ``routing_iterations=1.5`` or ``True`` is refused here, before anything is built; the
    ranges of sizes (``>= 1``) are the constructors' own checks. An unknown ``model`` or key
    is left to :func:`~capsnet.models.create_model`, which names it.
    """
    from .registry import _MODELS

    if model in _MODELS:
        check_keywords(_MODELS[model], kwargs, name="model_kwargs")

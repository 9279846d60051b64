"""Model registry: ``@register_model`` builders and ``create_model(name, **overrides)``."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..validation import check_keywords

__all__ = ["check_model_kwargs", "create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``builder`` under its function name; builders take keyword overrides only."""
    name = builder.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = builder
    return builder


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace the paper's hyper-parameters.

    >>> model = create_model("capsnet_mnist", routing_iterations=1)
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name](**overrides)


def check_model_kwargs(model: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the key when a ``model_kwargs`` value does not fit the builder's annotations.

    Read from the model class the builder returns (``capsnet_mnist(**overrides) -> CapsNet``):
    ``routing_iterations=1.5`` or ``True`` is refused here, before anything is built; the
    ranges of sizes (``>= 1``) are the constructors' own checks. An unknown ``model`` or key
    is left to :func:`create_model`, which names it.
    """
    if model in _MODELS:
        check_keywords(_MODELS[model], kwargs, name="model_kwargs")

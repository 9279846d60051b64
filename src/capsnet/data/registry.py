"""Dataset registry: experiments name their data, ``load_dataset`` builds it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import ExperimentData

__all__ = ["list_datasets", "load_dataset", "register_dataset"]

_DATASETS: dict[str, Callable[..., ExperimentData]] = {}


def register_dataset(name: str):
    """Register ``builder(root, *, download, seed, **options) -> ExperimentData`` under ``name``."""

    def wrap(builder):
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        _DATASETS[name] = builder
        return builder

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def load_dataset(name: str, root: str | Path, *, download: bool = False, seed: int = 0, **options) -> ExperimentData:
    """Build the experiment data ``name`` from files under ``root``."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets())}")
    return _DATASETS[name](Path(root), download=download, seed=seed, **options)

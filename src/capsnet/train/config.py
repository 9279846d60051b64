"""The training configuration: one flat dataclass, validated before any work starts."""

from __future__ import annotations

import dataclasses
import math
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["TrainConfig", "load_config"]

#: ``epoch_order`` (train/loop.py) seeds the data order with ``seed * EPOCH_SEED_STRIDE + epoch``, an int64.
EPOCH_SEED_STRIDE = 1_000_003
#: ``"exponential"``: the official code's continuous decay; ``"cosine"``: half a cosine to ``lr_min``.
LR_SCHEDULES = ("exponential", "cosine")
#: Mixed precision (``amp``): None (float32), ``"bf16"`` or ``"fp16"`` (with loss scaling) under
#: ``torch.autocast`` for the forward pass and the loss; routing stays float32 (:mod:`capsnet.precision`).
AMP_DTYPES = {None: None, "bf16": "bfloat16", "fp16": "float16"}
#: Seeds lie in ``[0, SEED_LIMIT)``, so that the epoch-order seed above fits in int64.
SEED_LIMIT = 2**63 // EPOCH_SEED_STRIDE


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults: the paper recipe of Sabour et al. 2017.

    Adam at lr 1e-3 decayed by 0.96 every 2,000 steps (continuous, floored at 1e-6, as in
    the official code), batch 128, margin loss plus 0.0005 x reconstruction loss.
    ``lr_schedule="cosine"`` instead follows half a cosine from ``lr`` to ``lr_min`` over
    ``lr_decay_steps`` steps (for short, fixed-length runs; None: the run's length after the
    warm-up, from ``epochs`` or ``max_steps``); ``lr_warmup_steps`` ramps the
    learning rate linearly up from ``lr / lr_warmup_steps`` first, under either schedule.
    ``amp``: mixed precision, see :data:`AMP_DTYPES`.
    """

    model: str = "capsnet_mnist"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "mnist"
    dataset_kwargs: dict = field(default_factory=dict)
    objective: str = "margin"
    objective_kwargs: dict = field(default_factory=dict)
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 1e-3
    lr_decay_rate: float = 0.96
    lr_decay_steps: Optional[int] = 2000
    lr_min: float = 1e-6
    lr_schedule: str = "exponential"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: Optional[int] = None
    time_budget_s: Optional[float] = None
    eval_every: Optional[int] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    figures: bool = True
    amp: Optional[str] = None

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        positive = ["batch_size", "eval_batch_size", "epochs", "checkpoint_every", "keep_checkpoints", "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "lr_decay_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"config key {name!r} must be >= 1 or None, got {value}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"config key 'time_budget_s' must be > 0 or None, got {self.time_budget_s}")
        for name in ("lr", "lr_min", "weight_decay", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"config key {name!r} must be finite, got {value}")
        if not self.lr > 0:
            raise ValueError(f"config key 'lr' must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"config key 'lr_schedule' must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"config key 'amp' must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"config key 'lr_warmup_steps' must be >= 0, got {self.lr_warmup_steps}")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"config key 'lr_decay_rate' must lie in (0, 1], got {self.lr_decay_rate}")
        if self.lr_min > self.lr:
            raise ValueError(f"config key 'lr_min' ({self.lr_min}) must not exceed 'lr' ({self.lr})")
        if self.lr_min < 0 or self.weight_decay < 0:
            raise ValueError(f"config keys 'lr_min' and 'weight_decay' must be >= 0, got {self.lr_min}, {self.weight_decay}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"config key 'seed' must lie in [0, {SEED_LIMIT}), got {self.seed}; pick a seed in that range")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config, refusing unknown keys by name (with the closest known key)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
                raise ValueError(f"unknown config key {key!r}{hint}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    hint = typing.get_origin(hint) or hint
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"config key {name!r} must be of type {hint.__name__}, got {value!r} ({type(value).__name__})")


def load_config(spec: str, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """Load ``path/to/config.py[:variant]`` and apply ``key=value`` overrides.

    A config file defines ``get_config(variant)`` returning a dict of :class:`TrainConfig`
    keys; its module docstring holds the command that reproduces the experiment.
    Override keys may reach into dicts with dots: ``model_kwargs.routing_iterations=1``;
    values are Python literals (``1``, ``0.5``, ``None``, ``'text'``) or bare strings.
    """
    import importlib.util
    from pathlib import Path

    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist (expected path/to/config.py[:variant])")
    module_spec = importlib.util.spec_from_file_location(f"capsnet_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config(variant) function")
    return TrainConfig.from_dict(apply_overrides(module.get_config(variant or "default"), overrides))


def apply_overrides(values: dict[str, Any], overrides: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a config dict in place and return it.

    Keys may reach into dicts with dots (``dataset_kwargs.shift=0``); values are Python
    literals (``1``, ``0.5``, ``None``, ``'text'``) or bare strings.
    """
    import ast

    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        target = values
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a dict in the config")
        target[leaf] = value
    return values

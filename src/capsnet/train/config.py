"""The training configuration: one flat dataclass, validated before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from ..models.registry import check_model_kwargs
from ..validation import check_keywords

__all__ = ["TrainConfig", "load_config"]

#: ``epoch_order`` (train/loop.py) seeds the data order with ``seed * EPOCH_SEED_STRIDE + epoch``, an int64.
EPOCH_SEED_STRIDE = 1_000_003
#: ``"exponential"``: the official code's continuous decay; ``"cosine"``: half a cosine to ``lr_min``.
LR_SCHEDULES = ("exponential", "cosine")
#: Mixed precision (``amp``): None (float32), ``"bf16"`` or ``"fp16"`` (with loss scaling) under
#: ``torch.autocast`` for the forward pass and the loss; routing stays float32 (:mod:`capsnet.precision`).
AMP_DTYPES = {None: None, "bf16": "bfloat16", "fp16": "float16"}
#: ``amp`` values: those of :data:`AMP_DTYPES` and ``"auto"`` (the default), which
#: :func:`capsnet.precision.resolve_amp` turns into one of them for the device: bf16 on CPUs
#: with AMX-BF16, float32 elsewhere.
AMP_CHOICES = (*AMP_DTYPES, "auto")
#: Seeds lie in ``[0, SEED_LIMIT)``, so that the epoch-order seed above fits in int64.
SEED_LIMIT = 2**63 // EPOCH_SEED_STRIDE
#: Ranges of objective keywords that their annotations (``float``, ``int``) do not say:
#: loss weights are >= 0, the margins of Eq. 4 bound capsule lengths in [0, 1], the spread
#: margin (Eq. 3, Hinton et al. 2018) ramps between non-negative values over >= 1 steps.
OBJECTIVE_RANGES = {
    "recon_weight": (0, None), "lam": (0, None), "m_pos": (0, 1), "m_neg": (0, 1),
    "start": (0, None), "end": (0, None), "steps": (1, None),
}  # fmt: skip
#: ``dataset_kwargs`` that size an evaluation split, with why it must not be empty (a
#: negative ``limit_*`` would also slice from the end). Validation keeps ``best.pt``; the
#: test reports an accuracy, and "0.0 on 0 samples" is no result.
SPLIT_SIZE_KEYS = {
    "val_size": "training keeps best.pt by validation accuracy, so it needs a validation split",
    "val_pairs": "training keeps best.pt by validation accuracy, so it needs a validation split",
    "limit_eval": "training keeps best.pt by validation accuracy and the test reports an accuracy; both need samples",
    "test_size": "the test would report an accuracy of no samples",
    "test_pairs": "the test would report an accuracy of no samples",
    "limit_test": "the test would report an accuracy of no samples",
}


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults: the paper recipe of Sabour et al. 2017.

    Adam at lr 1e-3 decayed by 0.96 every 2,000 steps (continuous, floored at 1e-6, as in
    the official code), batch 128, margin loss plus 0.0005 x reconstruction loss.
    ``lr_schedule="cosine"`` instead follows half a cosine from ``lr`` to ``lr_min`` over
    ``lr_decay_steps`` steps (for short, fixed-length runs; None: the run's length after the
    warm-up, from ``epochs`` or ``max_steps``); ``lr_warmup_steps`` ramps the
    learning rate linearly up from ``lr / lr_warmup_steps`` first, under either schedule.
    ``amp``: mixed precision, see :data:`AMP_CHOICES` (``"auto"``: bf16 where the CPU has
    AMX-BF16, float32 elsewhere; ``None`` forces float32).
    ``adam_beta1`` / ``adam_beta2``: Adam's moment decay rates (Kingma & Ba's 0.9 / 0.999 by
    default). ``lr_scale``: ``{pattern: factor}``, the lr of every parameter whose name
    (``model.named_parameters()``) matches the ``fnmatch`` pattern times the factor (the first
    pattern that matches wins; each pattern must match a parameter), e.g. ``{"*.beta_*": 10}``; on the
    command line as one literal, ``--set 'lr_scale={"*.beta_*": 10}'`` (a dotted ``--set`` key
    cannot hold a pattern with dots). A run resumes only with the ``lr_scale`` it was started with.
    ``grad_clip``: scale the gradients down to this global L2 norm where it is larger
    (``torch.nn.utils.clip_grad_norm_``, before the optimizer step; the norm before clipping is
    logged as ``train/grad_norm``; a model's own ``training_metrics``, such as the EM models'
    per-layer gradient norms, see the clipped gradients); None: no clipping.
    ``ema_decay``: keep an exponential moving average of the weights with this decay (e.g.
    0.999; :class:`capsnet.train.ema.WeightAverage`, with a warm-up of the decay) and validate,
    select ``best.pt`` and test with it; ``last.pt`` holds both the trained weights (its
    ``"model"``, what ``capsnet eval last.pt`` scores) and the average (``"ema"``); the logged
    ``train/accuracy`` is the trained weights'. None (default): no average, as the papers.
    ``warmup_iterations`` / ``warmup_iterations_steps``: route with this many iterations in
    every routed layer (dynamic or EM) in the training steps before step
    ``warmup_iterations_steps``, then with the model's own; validation, ``best.pt`` and the
    test always route with the model's own, so a checkpoint selected during the warm-up is
    scored as the model it is. Not in either paper (a curriculum over the routing
    iterations, docs/em_training.md, session 17). Both keys or neither: None and 0 (default),
    the model's own throughout. ``train/accuracy`` and the routing statistics of a warm-up
    step are those of the warm-up's iterations.
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
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scale: dict = field(default_factory=dict)
    grad_clip: Optional[float] = None
    ema_decay: Optional[float] = None
    warmup_iterations: Optional[int] = None
    warmup_iterations_steps: int = 0
    epochs: int = 1
    max_steps: Optional[int] = None
    time_budget_s: Optional[float] = None
    eval_every: Optional[int] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    figures: bool = True
    amp: Optional[str] = "auto"

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
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"config key 'amp' must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"config key 'lr_warmup_steps' must be >= 0, got {self.lr_warmup_steps}")
        if not 0 < self.lr_decay_rate <= 1:
            raise ValueError(f"config key 'lr_decay_rate' must lie in (0, 1], got {self.lr_decay_rate}")
        if self.lr_min > self.lr:
            raise ValueError(f"config key 'lr_min' ({self.lr_min}) must not exceed 'lr' ({self.lr})")
        if self.lr_min < 0 or self.weight_decay < 0:
            raise ValueError(f"config keys 'lr_min' and 'weight_decay' must be >= 0, got {self.lr_min}, {self.weight_decay}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"config key 'grad_clip' must be a finite norm > 0 or None, got {self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"config key 'ema_decay' must lie in (0, 1) (e.g. 0.999) or be None, got {self.ema_decay}")
        if (self.warmup_iterations is None) != (self.warmup_iterations_steps == 0):
            raise ValueError(
                "config keys 'warmup_iterations' and 'warmup_iterations_steps' go together (e.g. 2 and 1719: two routing "
                f"iterations for the first 1,719 steps), got {self.warmup_iterations} and {self.warmup_iterations_steps}"
            )
        if self.warmup_iterations is not None and (self.warmup_iterations < 1 or self.warmup_iterations_steps < 1):
            raise ValueError(f"config key 'warmup_iterations' must be >= 1 and 'warmup_iterations_steps' >= 1, "
                             f"got {self.warmup_iterations} and {self.warmup_iterations_steps}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"config key {name!r} must lie in [0, 1), got {getattr(self, name)}")
        for pattern, factor in self.lr_scale.items():
            if not isinstance(pattern, str) or isinstance(factor, bool) or not isinstance(factor, (int, float)):
                raise ValueError(f"config key 'lr_scale' maps name patterns (str) to factors (float), got {pattern!r}: {factor!r}")
            if not (factor > 0 and math.isfinite(factor)):
                raise ValueError(f"config key 'lr_scale' must map {pattern!r} to a finite factor > 0, got {factor}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"config key 'seed' must lie in [0, {SEED_LIMIT}), got {self.seed}; pick a seed in that range")
        _check_split_sizes(self.dataset_kwargs)
        check_model_kwargs(self.model, self.model_kwargs)
        _check_objective_kwargs(self.objective, self.objective_kwargs)

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

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every key's default value (what a config, or a checkpoint written before a key existed, leaves out)."""
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_split_sizes(dataset_kwargs: dict[str, Any]) -> None:
    for key, why in SPLIT_SIZE_KEYS.items():
        value = dataset_kwargs.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"config key 'dataset_kwargs.{key}' must be an int >= 1 (or left out), got {value!r}: {why}")


def _check_objective_kwargs(objective: str, kwargs: dict[str, Any]) -> None:
    """Types from the objective's annotations, ranges from :data:`OBJECTIVE_RANGES`; unknown names are create_objective's."""
    from .objectives import _OBJECTIVES
    from .schedules import spread_margin

    # The spread objective hands its keywords on to the margin schedule.
    target = spread_margin if objective == "spread" else _OBJECTIVES.get(objective)
    if target is not None:
        check_keywords(target, kwargs, name="objective_kwargs", ranges=OBJECTIVE_RANGES)


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

    The file is Python and runs: it is trusted input, like any training script. A file
    that is not ``.py``, does not parse, lacks ``get_config`` or whose ``get_config`` returns
    no dict is a ValueError naming the file and the reason.
    """
    import importlib.util
    from pathlib import Path

    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist (expected path/to/config.py[:variant])")
    if path.suffix != ".py":
        raise ValueError(f"config file {path} is not a .py file: a config is a Python file defining get_config(variant)")
    module_spec = importlib.util.spec_from_file_location(f"capsnet_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as exc:  # the config's own errors at run time keep their traceback: they are its code's
        raise ValueError(f"config file {path} is not valid Python: {exc.msg} (line {exc.lineno})") from None
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config(variant) function")
    values = module.get_config(variant or "default")
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {path}: get_config({variant or 'default'!r}) returned {type(values).__name__}, "
            "expected a dict of config keys"
        )
    return TrainConfig.from_dict(apply_overrides(values, overrides))


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

"""Boundary checks shared by the layers' and models' ``forward``: clear errors instead of deep crashes.

Shape and dtype checks are O(1); only the finiteness of images and the range of labels
read the values (one reduction each, once per forward). A bad value raises a ValueError at
once, except on CUDA, where the check runs on the device (``torch._assert_async``) so that a
training step never waits for the host, and fails at the next synchronisation.

:func:`check_keywords` checks keyword arguments (a config's ``model_kwargs``) against the
annotations of the function or class they are for, before anything is built.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._compat import assert_async

__all__ = ["assert_on_device", "check_dtype", "check_images", "check_keywords", "check_labels", "check_votes", "keyword_hints"]


def check_dtype(x: Tensor, dtype: torch.dtype, *, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` has ``dtype``, the dtype of the parameters it meets.

    Under ``torch.autocast`` any floating dtype passes: autocast casts for the layer.
    """
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor of dtype {dtype}, got dtype {x.dtype}; convert it with .to({dtype})")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{name} has dtype {x.dtype} but the parameters it meets are {dtype}; convert the input with "
            f".to({dtype}) or the module with .to({x.dtype})"
        )


def check_images(x: Tensor, channels: int, size: tuple[int, int], *, dtype: torch.dtype | None = None, name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x`` is a finite floating ``(B, channels, *size)`` tensor (of ``dtype`` if given)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    expected = f"(B, {channels}, {size[0]}, {size[1]})"
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), shape {expected}; got {tuple(x.shape)}")
    if tuple(x.shape[2:]) != tuple(size):
        raise ValueError(f"{name} must be {size[0]}x{size[1]} pixels, shape {expected}; got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor (e.g. uint8 images / 255), got dtype {x.dtype}")
    if dtype is not None:
        check_dtype(x, dtype, name=name)
    if not x.numel():
        return
    if x.device.type == "cuda":  # no host-device sync inside a training step: checked on the device
        assert_on_device(torch.isfinite(x).all(), f"{name} holds NaN or infinite values; clean the data before the model sees it")
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} holds {bad} NaN or infinite value(s); clean the data before the model sees it")


def check_votes(votes: Tensor) -> None:
    """Raise ``ValueError`` unless ``votes`` are routing votes: a floating ``(B, I, J, D)`` tensor, no empty axis but B.

    Shape:
        votes: ``(B, I, J, D)``.
    """
    if votes.dim() != 4:
        raise ValueError(f"votes must be (B, I, J, D), got shape {tuple(votes.shape)}")
    if min(votes.shape[1:]) < 1:
        raise ValueError(
            f"votes must have at least one input capsule, parent and pose dimension, (B, I >= 1, J >= 1, D >= 1); "
            f"got shape {tuple(votes.shape)}"
        )
    if not votes.dtype.is_floating_point:
        raise ValueError(f"votes must be a floating tensor, got dtype {votes.dtype}; convert them with votes.float()")


def check_labels(y: Tensor, batch: int, num_classes: int, *, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``y`` is ``(batch,)`` integer labels in ``[0, num_classes)``."""
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},) to match the batch, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if not y.numel():
        return
    if y.device.type == "cuda":  # no host-device sync inside a training step: checked on the device
        assert_on_device(((y >= 0) & (y < num_classes)).all(), f"{name} must lie in [0, {num_classes - 1}]")
        return
    low, high = torch.stack(torch.aminmax(y)).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got min {low} max {high}")


def assert_on_device(condition: Tensor, message: str) -> None:
    """Check a 0-d boolean CUDA tensor without waiting for it (``torch._assert_async``).

    A failure is a device-side assert raised by the next operation that synchronises; it
    leaves the process's CUDA context unusable, so only the hot path uses it, for inputs the
    data pipeline has already validated. Other devices keep the synchronous ValueError.
    """
    assert_async(condition, message)


def keyword_hints(target: Callable) -> dict[str, Any]:
    """The keyword arguments ``target`` accepts, name -> type hint, following ``**kwargs``.

    A builder ``f(**overrides) -> Cls`` hands its keywords to ``Cls`` (read from its return
    annotation), and a class whose ``__init__`` takes ``**kwargs`` to its base class; names
    found nowhere are left out, unannotated ones map to ``Any``.
    """
    hints: dict[str, Any] = {}
    while target is not None and target is not object:
        function = target.__init__ if isinstance(target, type) else target
        try:
            signature = inspect.signature(function)
            annotations = typing.get_type_hints(function)
        except (TypeError, ValueError, NameError):  # a builtin, or an annotation that does not resolve
            return hints
        forwards = False
        for p in signature.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
                hints.setdefault(p.name, annotations.get(p.name, Any))
        if not forwards:
            return hints
        if isinstance(target, type):
            target = next((base for base in target.__mro__[1:] if "__init__" in vars(base)), None)
        else:
            returned = annotations.get("return")
            target = returned if isinstance(returned, type) else None
    return hints


def check_keywords(
    target: Callable,
    kwargs: dict[str, Any],
    *,
    name: str,
    ranges: Optional[dict[str, tuple[Optional[float], Optional[float]]]] = None,
) -> None:
    """Raise ``ValueError`` naming key, value and expectation unless ``kwargs`` fit ``target``'s annotations.

    ``int`` means an int (not a bool, not a float), ``float`` a finite int or float, ``bool``
    True or False; ``Optional``, ``Union``, ``Literal`` and sequences (a list or tuple of the
    element type) are read too, other hints pass. ``ranges`` bounds named keys, inclusive
    (None: unbounded), for each number of the value. Keys ``target`` does not take are left
    to ``target`` itself to refuse. ``name`` prefixes the key in messages (``"model_kwargs"``).
    """
    hints = keyword_hints(target)
    ranges = ranges or {}
    owner = getattr(target, "__qualname__", repr(target))
    for key, value in kwargs.items():
        if key not in hints:
            continue
        hint, bounds = hints[key], ranges.get(key, (None, None))
        numbers = _numbers(value)
        fits = (
            _conforms(value, hint)
            and all(math.isfinite(x) for x in numbers if isinstance(x, float))
            and all((bounds[0] is None or x >= bounds[0]) and (bounds[1] is None or x <= bounds[1]) for x in numbers)
        )
        if not fits:
            expected = f"{_describe(hint)} {_bounds(*bounds)}".rstrip()
            raise ValueError(
                f"config key '{name}.{key}' must be {expected} ({owner} takes {key}: {_hint_text(hint)}), "
                f"got {value!r} ({type(value).__name__})"
            )


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return any(_conforms(value, h) for h in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, h) for v, h in zip(value, args))
        return all(_conforms(v, args[0] if args else Any) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _numbers(value: Any) -> list:
    """The ints and floats in ``value`` (itself or the items of a list / tuple), bools left out."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _bounds(low: Optional[float], high: Optional[float]) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else ""


def _describe(hint: Any) -> str:
    """``int`` -> "an int", ``Optional[float]`` -> "None or a finite number", ... for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return " or ".join(_describe(h) for h in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        element = args[0] if args else Any
        return f"a list or tuple of ({_describe(element)})"
    names = {type(None): "None", bool: "True or False", int: "an int", float: "a finite number", str: "a string"}
    return names.get(hint, f"a {_hint_text(hint)}")


def _hint_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")

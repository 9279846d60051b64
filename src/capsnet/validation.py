"""Boundary checks shared by the layers' and models' ``forward``: clear errors instead of deep crashes.

Shape and dtype checks are O(1); only the finiteness of images and the range of labels
read the values (one reduction each, once per forward). A bad value raises a ValueError at
once, except on CUDA, where the check runs on the device (``torch._assert_async``) so that a
training step never waits for the host, and fails at the next synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["assert_on_device", "check_dtype", "check_images", "check_labels"]


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
    torch._assert_async(condition, message)

"""Mixed precision: routing always runs in float32.

Under ``torch.autocast`` the convolutions and linear layers run in bfloat16 / float16, which
is where the FLOPs are. Routing is different: squash divides by norms near zero, the
softmax over parents and EM's Gaussian log-likelihoods and variance floors need float32's
range and precision, and the fused routing functions contract tensors of one dtype. So the
routing entry points cast their inputs to float32 and run with autocast off; their outputs
are float32, and autocast casts them down again for the next layer that wants it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["float32_under_autocast"]

_LOW = (torch.float16, torch.bfloat16)


def _device_of(values) -> Optional[torch.device]:
    for value in values:
        if isinstance(value, Tensor):
            return value.device
        if isinstance(value, tuple):  # a NamedTuple of tensors (FactoredVotes)
            found = _device_of(value)
            if found is not None:
                return found
    return None


def _float32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.dtype in _LOW else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_float32(v) for v in value))
    return value


def float32_under_autocast(fn: Callable) -> Callable:
    """Run ``fn`` in float32 with autocast off whenever autocast is on for its tensors' device.

    Half-precision tensor arguments (also inside NamedTuples) are cast to float32; float32 and
    float64 pass unchanged. Without autocast the call is untouched.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = _device_of(list(args) + list(kwargs.values()))
        if device is None or not torch.is_autocast_enabled(device.type):
            return fn(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return fn(*(_float32(a) for a in args), **{k: _float32(v) for k, v in kwargs.items()})

    return wrapper

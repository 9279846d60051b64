"""Mixed precision: routing always runs in float32.

Under ``torch.autocast`` the convolutions and linear layers run in bfloat16 / float16, which
is where the FLOPs are. Routing is different: squash divides by norms near zero, the
softmax over parents and EM's Gaussian log-likelihoods and variance floors need float32's
range and precision, and the fused routing functions contract tensors of one dtype. So the
routing entry points cast their inputs to float32 and run with autocast off; their outputs
are float32, and autocast casts them down again for the next layer that wants it.

Which precision ``amp="auto"`` means on a device is :func:`resolve_amp`'s choice: bfloat16 on a
CPU with AMX-BF16 tiles (:func:`cpu_bf16_units`), where it is measured faster than float32
(docs/performance.md, "bf16 on CPU"), float32 everywhere else.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["cpu_bf16_units", "float32_under_autocast", "resolve_amp"]

_LOW = (torch.float16, torch.bfloat16)


#: CPU bfloat16 units that ``amp="auto"`` trains with. AMX-BF16 (Intel Sapphire Rapids and
#: later): measured faster than float32 for capsnet_mnist (docs/performance.md). AVX512-BF16
#: alone (AMD Zen 4, Intel Cooper Lake) has bf16 dot products but no tiles; not measured yet,
#: so ``auto`` keeps float32 there (``amp="bf16"`` still runs it).
AUTO_BF16_UNITS = ("amx_bf16",)


def cpu_bf16_units() -> Optional[str]:
    """The CPU's best bfloat16 unit: ``"amx_bf16"``, ``"avx512_bf16"``, or None (bf16 is then emulated).

    From ``torch.cpu.get_capabilities()`` (cpuinfo's CPUID flags, the ones ``lscpu`` lists as
    ``amx_bf16`` and ``avx512_bf16``): what oneDNN dispatches its bf16 kernels on.
    ``torch.backends.cpu.get_cpu_capability()`` names only the vector width (``"AVX512"``) and
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true on every AVX-512 CPU, units or not.
    """
    caps = torch.cpu.get_capabilities()
    for unit in ("amx_bf16", "avx512_bf16"):
        if caps.get(unit, False):
            return unit
    return None


def resolve_amp(amp: Optional[str], device: str | torch.device) -> Optional[str]:
    """The precision a config's ``amp`` runs in on ``device``: None (float32), ``"bf16"`` or ``"fp16"``.

    ``"auto"``: ``"bf16"`` on a CPU whose bf16 unit is in :data:`AUTO_BF16_UNITS`, None elsewhere
    (on CUDA too, where float32 stays the default: the GPU choice is made there, not here).
    Other values are returned unchanged.
    """
    if amp != "auto":
        return amp
    return "bf16" if torch.device(device).type == "cpu" and cpu_bf16_units() in AUTO_BF16_UNITS else None


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

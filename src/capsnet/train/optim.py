"""The optimiser the training loop uses: Adam, fused where it can be, with its state made up front.

``torch.optim.Adam`` makes its two moment buffers per parameter on the first ``step``, in
the middle of the first iteration's memory, where the activations of that iteration have
just been freed. With the heap kept by :func:`capsnet.allocator.keep_freed_memory` those
long-lived buffers then split the holes the next iterations' large temporaries would reuse,
and the heap grows. Made before the first forward, they sit below the activations, and the
training peak is lower (docs/performance.md, session 5's "Adam's state made before the first
forward"). The state is made through
``load_state_dict`` and is what the first ``step`` would make for every parameter that
needs a gradient (``tests/test_optim.py`` checks trajectories and state are identical); a
parameter that needs one but never gets one keeps zero moments and step 0, where torch's
lazy Adam would have no entry for it.

``torch.optim`` wraps ``step``, ``add_param_group``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` in helpers for ``torch.compile`` whose first call imports ``torch._dynamo``,
and with it sympy and torch.distributed: about 70 MB resident and 800 modules in a process that
never compiles, a quarter of what a small model's training step holds (docs/performance.md,
"Memory"). The optimiser made here is a :class:`torch.optim.Adam` that calls the undecorated
methods (``step`` under ``torch.no_grad``, as the wrapper does for a non-differentiable
optimiser) while ``torch._dynamo`` is not loaded, and torch's own ones once it is, so
``torch.compile`` sees exactly torch's Adam.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["adam", "lr_scales"]


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def _without_dynamo_import(method, *, no_grad: bool = False):
    """``method`` as it is, once ``torch._dynamo`` is loaded; before that, the function it wraps (under no_grad if asked)."""
    plain = getattr(method, "__wrapped__", method)

    def call(self, *args, **kwargs):
        if _dynamo_loaded() or plain is method or (no_grad and self.defaults.get("differentiable")):
            return method(self, *args, **kwargs)
        if no_grad:
            with torch.no_grad():
                return plain(self, *args, **kwargs)
        return plain(self, *args, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = method.__name__, method.__qualname__, method.__doc__
    call.__wrapped__ = plain  # inspect.signature shows the real parameters
    return call


def _unhooked_adam_step():
    """``Adam.step`` as defined, without the hook-running wrapper torch puts on the class at its first instance."""
    step = vars(torch.optim.Adam)["step"]
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose methods import ``torch._dynamo`` only if it is loaded already (module docstring)."""

    # Unhooked: Optimizer.__init__ puts the hook-running wrapper on this class's step itself.
    step = _without_dynamo_import(_unhooked_adam_step(), no_grad=True)
    add_param_group = _without_dynamo_import(torch.optim.Optimizer.add_param_group)
    zero_grad = _without_dynamo_import(torch.optim.Optimizer.zero_grad)
    state_dict = _without_dynamo_import(torch.optim.Optimizer.state_dict)
    load_state_dict = _without_dynamo_import(torch.optim.Optimizer.load_state_dict)


def adam(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    lr_scales: Optional[Sequence[float]] = None,
    make_state: bool = True,
) -> torch.optim.Adam:
    """``torch.optim.Adam`` (fused when every parameter is a floating CPU or CUDA tensor) with its state already made.

    ``params`` are tensors (no parameter-group dicts); ``make_state=False`` leaves the state to
    ``load_state_dict`` (a resumed run) or to the first ``step``. ``lr_scales``, one positive
    factor per parameter, puts the parameters into groups of equal factor (in order of first
    appearance) whose lr is ``lr`` times the factor (also when there is only one factor); None:
    the parameters as one group at ``lr``.
    """
    params = list(params)
    if any(not isinstance(p, torch.Tensor) for p in params):
        raise TypeError("capsnet.train.optim.adam takes an iterable of parameters (tensors), not parameter groups")
    grouped = lr_scales is not None
    lr_scales = [1.0] * len(params) if lr_scales is None else [float(s) for s in lr_scales]
    if len(lr_scales) != len(params):
        raise ValueError(f"lr_scales must hold one factor per parameter: {len(lr_scales)} factors for {len(params)} parameters")
    if any(not (s > 0 and math.isfinite(s)) for s in lr_scales):
        raise ValueError(f"lr_scales must be finite and > 0, got {sorted(set(lr_scales))}")
    groups: dict[float, list[torch.Tensor]] = {}
    for p, scale in zip(params, lr_scales):
        groups.setdefault(scale, []).append(p)
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # as torch's fused Adam accepts
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in floating for p in params)
    param_groups = [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()] if grouped else params
    optimizer = Adam(param_groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
    if not make_state:
        return optimizer
    # The step counter's dtype as torch makes it: float32 for fused, else the default float dtype.
    step_dtype = torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64
    state = optimizer.state_dict()
    # state_dict numbers the parameters group after group.
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(ordered):
        if p.requires_grad:
            state["state"][index] = {
                "step": torch.zeros((), dtype=step_dtype),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    optimizer.load_state_dict(state)
    return optimizer


def lr_scales(model: torch.nn.Module, patterns: dict[str, float]) -> Optional[list[float]]:
    """One lr factor per ``model.parameters()``: that of the first pattern its name matches (``fnmatchcase``), else 1.

    None when ``patterns`` is empty. A pattern that matches no parameter is a ValueError that
    lists the names, so a typo cannot silently leave every lr as it was.
    """
    if not patterns:
        return None
    names = [name for name, _ in model.named_parameters()]
    unused = [pattern for pattern in patterns if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]
    if unused:
        raise ValueError(
            f"lr_scale pattern(s) {unused} match no parameter of {type(model).__name__}; its parameters are: {', '.join(names)}"
        )
    return [next((float(f) for pattern, f in patterns.items() if fnmatch.fnmatchcase(name, pattern)), 1.0) for name in names]

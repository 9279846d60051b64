"""Shared cases of the property-based tests (``tests/test_properties_*.py``): the hypothesis
settings, the dtypes and scales every entry point is held to, and small checks.

The contract every public entry point is held to:

* finite input -> finite output with finite gradients, whenever the exact result is
  representable in the dtype (a loss whose exact value exceeds the dtype's range may be
  +inf, never NaN), and the value is the one the equation gives, not a silent 0;
* a non-finite input is never hidden: the pure functions (``squash``, ``safe_norm``,
  ``dynamic_routing``, the losses) pass NaN / inf through IEEE-style, and only to the
  capsules and samples that held it -- they do not check, which would cost a device sync
  in the hot path; the boundaries that take user data (``CapsNet.forward``, the CLI and
  its config) refuse it with a ``ValueError``;
* malformed arguments raise ``ValueError`` naming what was expected and what came, never
  an ``IndexError`` / ``RuntimeError`` from deep inside torch.

Inputs are drawn at random: small random shapes, batch size 1, empty batches (B = 0),
exact zeros, huge values (1e6 and 1e30 in float32 and float64) and NaN / inf. Properties
the library does not hold yet are marked ``xfail(strict=True)``, one test per bug, with the
bug and the proposed fix in the reason: the fix turns the test into a failure that asks for
the mark to go. Their inputs come only from the failing region, so they fail on every run.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Few examples, no deadline (timings on shared cores are noisy), no example database
# (nothing is written into the repository).
FAST = settings(max_examples=8, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Layers and models: a few examples per (dtype, scale, batch) case.
LAYER = settings(FAST, max_examples=4)

DTYPES = (torch.float32, torch.float64)
#: Scales at which every exact result is representable and the library must be right.
SAFE = {torch.float32: (0.0, 1e-30, 1e-3, 1.0, 1e6), torch.float64: (0.0, 1e-30, 1e-3, 1.0, 1e6, 1e30)}
#: Scales at which |s|^2 overflows (float32 |s| > 1.8e19, float64 > 1.3e154) though |s| does not.
SQUARE_OVERFLOW = {torch.float32: (1e20, 1e30), torch.float64: (1e160, 1e300)}
#: Scales at which |s|^3 overflows (float32 |s| > 7e12, float64 > 5.6e102): an unscaled Eq. 1 gives 0 there.
CUBE_OVERFLOW = {torch.float32: (1e13,), torch.float64: (1e110,)}
#: The scales layers and models run at (the pure functions cover the ones in between).
LAYER_SCALES = {torch.float32: (0.0, 1.0, 1e6), torch.float64: (0.0, 1.0, 1e30)}


def _scaled(*magnitudes) -> list:
    return [pytest.param(d, s, id=f"{str(d)[6:]}-{s:g}") for m in magnitudes for d in DTYPES for s in m[d]]


def _dtype_and_scale(*magnitudes):
    return st.sampled_from([(d, s) for m in magnitudes for d in DTYPES for s in m[d]])


def _randn(shape, dtype, scale: float, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _grads_finite(output: torch.Tensor, inputs) -> bool:
    grads = torch.autograd.grad(output, list(inputs), allow_unused=True)
    return all(g is None or _finite(g) for g in grads)


def _weighted_sum(t: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient differs per element, so a 0/0 anywhere in a backward shows."""
    return (t * torch.linspace(1, 2, t.numel(), dtype=t.dtype).view(t.shape)).sum()


def _not_refused(cases: dict[str, Callable[[], object]]) -> list[str]:
    """The cases that did not raise ``ValueError``, each with what happened instead."""
    problems = []
    for name, call in cases.items():
        try:
            call()
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001 -- what escaped is the finding
            problems.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        else:
            problems.append(f"{name}: accepted")
    return problems




def _reference_squash(s: torch.Tensor, dim: int) -> torch.Tensor:
    """Eq. 1 in float64 without overflow: ``|v| = n^2 / (1 + n^2) = 1 / (1 + n^-2)`` along ``s / n``."""
    s = s.detach().double()
    if s.shape[dim] == 0:
        return s.clone()
    m = s.abs().amax(dim=dim, keepdim=True).clamp_min(1.0)
    n = m * torch.linalg.vector_norm(s / m, dim=dim, keepdim=True)
    length = torch.where(n >= 1, 1 / (1 + 1 / n.clamp_min(1) ** 2), n**2 / (1 + n**2))
    return torch.where(n > 0, s / m / (n / m) * length, torch.zeros_like(s))


def _reference_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    x = x.detach().double()
    if x.shape[dim] == 0:
        return x.sum(dim)
    m = x.abs().amax(dim=dim, keepdim=True).clamp_min(1.0)
    return (m * torch.linalg.vector_norm(x / m, dim=dim, keepdim=True)).squeeze(dim)


@st.composite
def _shape_and_dim(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    return shape, draw(st.integers(-len(shape), len(shape) - 1))


SEEDS = st.integers(0, 2**32 - 1)

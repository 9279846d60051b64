"""Property-based tests (hypothesis) of the dynamic-routing side at its edges.

Inputs are drawn at random: small random shapes, batch size 1, empty batches (B = 0),
exact zeros, huge values (1e6 and 1e30 in float32 and float64) and NaN / inf. The
contract every public entry point is held to:

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

Properties the library does not hold yet are marked ``xfail(strict=True)``, one test per
bug, with the bug and the proposed fix in the reason: the fix turns the test into a
failure that asks for the mark to go. Their inputs come only from the failing region, so
they fail on every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import typing
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsnet import create_model, dynamic_routing, margin_loss, reconstruction_loss, safe_norm, spread_loss, squash
from capsnet.cli import main
from capsnet.layers import CapsuleDecoder, DenseCaps, PrimaryCaps
from capsnet.train import TrainConfig, load_checkpoint

from conftest import REPO

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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is ~50x faster than two on cores shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- squash and safe_norm


def _check_squash(shape, dim, dtype, scale, seed):
    s = _randn(shape, dtype, scale, seed).requires_grad_()
    v = squash(s, dim=dim)
    assert v.shape == s.shape and v.dtype == dtype
    assert _finite(v), f"squash of |s| ~ {scale:g} ({dtype}) is not finite"
    # The value of Eq. 1 (eps = 1e-8 moves |v| by at most eps / 2), not merely some finite number.
    torch.testing.assert_close(v.double(), _reference_squash(s, dim), rtol=1e-4, atol=1e-6)
    assert _grads_finite(_weighted_sum(v), [s])


@FAST
@pytest.mark.parametrize(("dtype", "scale"), _scaled(SAFE))
@given(shape_dim=_shape_and_dim(), seed=SEEDS)
def test_squash_gives_eq1_with_finite_gradients(dtype, scale, shape_dim, seed):
    _check_squash(*shape_dim, dtype, scale, seed)


@FAST
@given(dtype_scale=_dtype_and_scale(CUBE_OVERFLOW, SQUARE_OVERFLOW), seed=SEEDS, dim_size=st.integers(1, 4))
def test_squash_gives_eq1_when_the_norm_cubed_overflows(dtype_scale, seed, dim_size):
    _check_squash((2, dim_size), -1, *dtype_scale, seed)


@FAST
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@given(shape=st.tuples(st.integers(2, 4), st.integers(1, 4)), data=st.data())
def test_squash_keeps_a_non_finite_capsule_to_itself(value, shape, data):
    s = _randn(shape, torch.float32, 1.0, data.draw(SEEDS))
    row, col = data.draw(st.integers(0, shape[0] - 1)), data.draw(st.integers(0, shape[1] - 1))
    clean = squash(s)
    s[row, col] = value
    v = squash(s)
    assert not _finite(v[row]), "a non-finite capsule must not come out finite"
    others = torch.arange(shape[0]) != row
    torch.testing.assert_close(v[others], clean[others], rtol=0, atol=0)


def _check_safe_norm(shape, dim, dtype, scale, seed):
    x = _randn(shape, dtype, scale, seed).requires_grad_()
    n = safe_norm(x, dim=dim)
    assert _finite(n), f"safe_norm of |x| ~ {scale:g} ({dtype}) is not finite"
    # sqrt(|x|^2 + eps) as hypot(|x|, sqrt(eps)): squaring a float64 norm above 1.3e154 would overflow the reference.
    reference = _reference_norm(x, dim)
    torch.testing.assert_close(n.double(), torch.hypot(reference, torch.full_like(reference, 1e-4)), rtol=1e-5, atol=1e-6)
    assert _grads_finite(n.sum(), [x])


@FAST
@pytest.mark.parametrize(("dtype", "scale"), _scaled(SAFE, CUBE_OVERFLOW))
@given(shape_dim=_shape_and_dim(), seed=SEEDS)
def test_safe_norm_is_the_norm_with_finite_gradients(dtype, scale, shape_dim, seed):
    _check_safe_norm(*shape_dim, dtype, scale, seed)


@FAST
@given(dtype_scale=_dtype_and_scale(SQUARE_OVERFLOW), seed=SEEDS, dim_size=st.integers(1, 4))
def test_safe_norm_is_finite_when_the_norm_squared_overflows(dtype_scale, seed, dim_size):
    _check_safe_norm((2, dim_size), -1, *dtype_scale, seed)


# --------------------------------------------------------------------------- losses


def _margin_ref(lengths, t, m_pos=0.9, m_neg=0.1, lam=0.5):
    """Eq. 4 in float64 with the present / absent terms selected, not multiplied, by the targets."""
    lengths, t = lengths.detach().double(), t.double()
    present = torch.where(t > 0, t * torch.relu(m_pos - lengths) ** 2, 0.0)
    absent = torch.where(t < 1, lam * (1 - t) * torch.relu(lengths - m_neg) ** 2, 0.0)
    return (present + absent).sum() / lengths.shape[0]


def _spread_ref(a, labels, margin):
    """Eq. 3 of Hinton et al. 2018 in float64."""
    a = a.detach().double()
    a_t = a[torch.arange(a.shape[0]), labels][:, None]
    is_target = torch.nn.functional.one_hot(labels, a.shape[1]).bool()
    return torch.where(is_target, 0.0, torch.relu(margin - (a_t - a)) ** 2).sum() / a.shape[0]


def _targets(data, batch: int, classes: int, multi_hot: bool) -> torch.Tensor:
    if multi_hot:
        row = st.lists(st.sampled_from([0.0, 1.0]), min_size=classes, max_size=classes)
        return torch.tensor(data.draw(st.lists(row, min_size=batch, max_size=batch)), dtype=torch.float32).view(batch, classes)
    return torch.tensor(data.draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)), dtype=torch.long)


def _one_hot(t: torch.Tensor, classes: int) -> torch.Tensor:
    return t if t.dim() == 2 else torch.nn.functional.one_hot(t, classes)


def _check_loss_is_exact_or_overflows(loss, reference, dtype, inputs):
    """Finite and equal to the float64 value when that fits the dtype; +inf, never NaN, when it does not."""
    assert not torch.isnan(loss), f"NaN loss from finite inputs (float64 value {float(reference):g})"
    if float(reference) < torch.finfo(dtype).max / 2:
        assert _finite(loss)
        torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-6)
        assert _grads_finite(loss, inputs)
    else:  # at or beyond the dtype's range: the rounded value, or +inf
        assert loss == float("inf") or bool(torch.isclose(loss.double(), reference, rtol=1e-4)), f"{loss} vs {reference}"


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(SAFE))
@given(batch=st.sampled_from([1, 3]), data=st.data(), multi_hot=st.booleans())
def test_margin_loss_is_eq4_with_finite_gradients(dtype, scale, batch, data, multi_hot):
    classes = data.draw(st.integers(1, 5))
    # Capsule lengths are >= 0: |randn| * scale spans zeros, typical lengths and huge ones.
    lengths = _randn((batch, classes), dtype, scale, data.draw(SEEDS)).abs().requires_grad_()
    t = _targets(data, batch, classes, multi_hot)
    _check_loss_is_exact_or_overflows(margin_loss(lengths, t), _margin_ref(lengths, _one_hot(t, classes)), dtype, [lengths])


@FAST
@given(dtype_scale=_dtype_and_scale(SQUARE_OVERFLOW), classes=st.integers(1, 5), multi_hot=st.booleans())
def test_margin_loss_overflows_to_inf_not_nan(dtype_scale, classes, multi_hot):
    dtype, scale = dtype_scale
    lengths = torch.full((2, classes), scale, dtype=dtype, requires_grad=True)
    t = torch.ones(2, classes) if multi_hot else torch.zeros(2, dtype=torch.long)  # a target class is huge
    _check_loss_is_exact_or_overflows(margin_loss(lengths, t), _margin_ref(lengths, _one_hot(t, classes)), dtype, [lengths])


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(SAFE, SQUARE_OVERFLOW))
@given(batch=st.sampled_from([1, 3]), data=st.data(), margin=st.floats(0.0, 1.0))
def test_spread_loss_is_eq3_or_overflows_to_inf(dtype, scale, batch, data, margin):
    classes = data.draw(st.integers(1, 5))
    a = _randn((batch, classes), dtype, scale, data.draw(SEEDS)).requires_grad_()
    labels = _targets(data, batch, classes, multi_hot=False)
    _check_loss_is_exact_or_overflows(spread_loss(a, labels, margin=margin), _spread_ref(a, labels, margin), dtype, [a])


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(SAFE))
@given(batch=st.sampled_from([1, 3]), data=st.data(), weight=st.floats(0.0, 1.0))
def test_reconstruction_loss_is_the_weighted_squared_error(dtype, scale, batch, data, weight):
    pixels = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    seed = data.draw(SEEDS)
    recon = torch.rand((batch, *pixels), generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()
    images = _randn((batch, *pixels), dtype, scale, seed + 1)
    loss = reconstruction_loss(recon, images.flatten(1), weight=weight)  # flat or not: same pixels per sample
    reference = weight * ((recon.detach().double() - images.double()) ** 2).sum() / batch
    _check_loss_is_exact_or_overflows(loss, reference, dtype, [recon])


@FAST
@pytest.mark.parametrize("loss", ["margin", "margin-multi-hot", "spread", "reconstruction"])
@given(data=st.data())
def test_a_nan_input_always_gives_a_nan_loss(loss, data):
    batch, classes = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    x = torch.rand(batch, classes)
    x[data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, classes - 1))] = float("nan")
    if loss == "reconstruction":
        pair = (torch.rand(batch, classes), x)
        value = reconstruction_loss(*(pair if data.draw(st.booleans()) else pair[::-1]))
    elif loss == "spread":
        value = spread_loss(x, _targets(data, batch, classes, False), margin=0.5)
    else:
        value = margin_loss(x, _targets(data, batch, classes, loss == "margin-multi-hot"))
    assert torch.isnan(value), f"{loss} loss hid a NaN input: {value}"


def _finite_or_refused(loss_fn, inputs) -> None:
    with contextlib.suppress(ValueError):
        loss = loss_fn()
        assert _finite(loss) and _grads_finite(loss, inputs), f"loss {loss}"


@pytest.mark.parametrize("loss", ["margin", "margin-multi-hot", "spread"])
def test_margin_and_spread_loss_of_an_empty_batch_are_finite_or_refused(loss):
    x = torch.rand(0, 10, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    if loss == "spread":
        _finite_or_refused(lambda: spread_loss(x, labels, margin=0.2), [x])
    else:
        _finite_or_refused(lambda: margin_loss(x, torch.zeros(0, 10) if loss == "margin-multi-hot" else labels), [x])


@pytest.mark.parametrize("shape", [(0, 1, 4, 4), ()], ids=["empty-batch", "0-d"])
def test_reconstruction_loss_of_an_empty_batch_or_scalar_is_finite_or_refused(shape):
    recon = torch.rand(shape, requires_grad=True)
    _finite_or_refused(lambda: reconstruction_loss(recon, torch.rand(shape)), [recon])


@FAST
@given(data=st.data(), bad=st.sampled_from(["too-large", "negative", "float", "bool", "short", "long", "multi-hot-shape", "1-d"]))
def test_bad_labels_are_refused_by_every_loss(data, bad):
    batch, classes = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    scores, labels = torch.rand(batch, classes), torch.zeros(batch, dtype=torch.long)
    row = data.draw(st.integers(0, batch - 1))
    if bad == "too-large":
        labels[row] = data.draw(st.integers(classes, classes + 100))
    elif bad == "negative":
        labels[row] = data.draw(st.integers(-100, -1))
    elif bad in ("float", "bool"):
        labels = labels.float() if bad == "float" else labels.bool()
    elif bad in ("short", "long"):
        labels = torch.zeros(batch - 1 if bad == "short" else batch + 1, dtype=torch.long)
    elif bad == "multi-hot-shape":
        labels = torch.zeros(batch, classes + 1)
    else:
        scores = scores.flatten()
    with pytest.raises(ValueError):
        margin_loss(scores, labels)
    with pytest.raises(ValueError):
        spread_loss(scores, labels, margin=0.5)


def test_multi_hot_targets_must_be_zeros_and_ones():
    def with_entry(value):
        t = torch.zeros(2, 4)
        t[1, 2] = value
        return lambda: margin_loss(torch.rand(2, 4), t)

    problems = _not_refused({str(v): with_entry(v) for v in (5.0, -1.0, 2.0, float("nan"))})
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- dynamic routing


def _check_routing(votes, iterations, leaky, detach):
    result = dynamic_routing(votes, iterations, leaky=leaky, detach_intermediate=detach)
    batch, n_in, n_out, dim = votes.shape
    assert result.poses.shape == (batch, n_out, dim) and result.coupling.shape == result.logits.shape == (batch, n_in, n_out)
    assert _finite(result.poses) and _finite(result.coupling) and _finite(result.logits)
    assert bool((torch.linalg.vector_norm(result.poses.double(), dim=-1) <= 1 + 1e-6).all())
    sums = result.coupling.sum(-1)
    if leaky:
        assert bool((sums <= 1 + 1e-6).all())
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))
    if iterations == 1 and not leaky:
        # Uniform coupling c_ij = 1 / J: each parent is squash(sum_i u_hat_j|i / J) (Eq. 3, 2, 1).
        s = votes.detach().double().sum(1) / n_out
        torch.testing.assert_close(result.poses.double(), _reference_squash(s, -1), rtol=1e-4, atol=1e-6)
    assert _grads_finite(_weighted_sum(result.poses) + result.coupling.sum(), [votes])


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    iterations=st.integers(1, 4),
    leaky=st.booleans(),
    detach=st.booleans(),
    seed=SEEDS,
)
def test_routing_is_finite_normalised_and_differentiable(dtype, scale, batch, sizes, iterations, leaky, detach, seed):
    _check_routing(_randn((batch, *sizes), dtype, scale, seed).requires_grad_(), iterations, leaky, detach)


@FAST
@given(dtype_scale=_dtype_and_scale(SQUARE_OVERFLOW), sizes=st.tuples(*[st.integers(1, 4)] * 3), seed=SEEDS)
def test_routing_of_huge_votes_is_finite_and_exact(dtype_scale, sizes, seed):
    _check_routing(_randn((2, *sizes), *dtype_scale, seed).requires_grad_(), 1, False, False)


@FAST
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@given(data=st.data(), iterations=st.integers(1, 3), leaky=st.booleans())
def test_routing_keeps_a_non_finite_sample_to_itself(value, data, iterations, leaky):
    shape = [data.draw(st.integers(2, 4)), *(data.draw(st.integers(1, 4)) for _ in range(3))]
    votes = _randn(shape, torch.float64, 1.0, data.draw(SEEDS))
    where = [data.draw(st.integers(0, n - 1)) for n in shape]
    votes[tuple(where)] = value
    result = dynamic_routing(votes, iterations, leaky=leaky)
    bad = where[0]
    assert not _finite(result.poses[bad]), "a non-finite vote must not give finite poses"
    keep = torch.arange(shape[0]) != bad
    alone = dynamic_routing(votes[keep], iterations, leaky=leaky)
    torch.testing.assert_close(result.poses[keep], alone.poses)
    torch.testing.assert_close(result.coupling[keep], alone.coupling)


@pytest.mark.parametrize(
    ("shape", "iterations"),
    [((2, 3, 4), 3), ((1, 2, 3, 4, 5), 3), ((2, 3, 4, 5), 0), ((2, 3, 4, 5), -2)],
    ids=["3-d", "5-d", "zero-iterations", "negative-iterations"],
)
def test_votes_of_the_wrong_rank_or_too_few_iterations_are_refused(shape, iterations):
    with pytest.raises(ValueError):
        dynamic_routing(torch.rand(shape), iterations)


def test_votes_with_an_empty_capsule_axis_or_integer_dtype_are_refused():
    cases = {
        "no-inputs": torch.rand(2, 0, 4, 5),
        "no-parents": torch.rand(2, 3, 0, 5),
        "no-pose-dims": torch.rand(2, 3, 4, 0),
        "integer": torch.ones(2, 3, 4, 5, dtype=torch.long),
    }
    problems = _not_refused({name: (lambda v=v: dynamic_routing(v)) for name, v in cases.items()})
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- layers


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 2])
@given(
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    seed=SEEDS,
)
def test_primary_caps_are_finite_unit_bounded_and_differentiable(dtype, scale, batch, sizes, extra, seed):
    channels, types, dim, kernel, stride = sizes
    torch.manual_seed(seed)
    layer = PrimaryCaps(channels, types=types, dim=dim, kernel_size=kernel, stride=stride).to(dtype)
    h, w = kernel + extra[0], kernel + extra[1]
    x = _randn((batch, channels, h, w), dtype, scale, seed).requires_grad_()
    u = layer(x)
    grid = ((h - kernel) // stride + 1) * ((w - kernel) // stride + 1)
    assert u.shape == (batch, types * grid, dim) and _finite(u)
    assert bool((torch.linalg.vector_norm(u.double(), dim=-1) <= 1 + 1e-6).all())
    assert _grads_finite(_weighted_sum(u), [x, *layer.parameters()])


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(
    sizes=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    iterations=st.integers(1, 3),
    bias=st.booleans(),
    leaky=st.booleans(),
    seed=SEEDS,
)
def test_dense_caps_are_finite_unit_bounded_and_differentiable(dtype, scale, batch, sizes, iterations, bias, leaky, seed):
    torch.manual_seed(seed)
    in_caps, in_dim, out_caps, out_dim = sizes
    layer = DenseCaps(in_caps, in_dim, out_caps, out_dim, iterations=iterations, bias=bias, leaky=leaky, init_std=0.5)
    layer = layer.to(dtype)
    u = _randn((batch, in_caps, in_dim), dtype, scale, seed).requires_grad_()
    result = layer(u)
    assert result.poses.shape == (batch, out_caps, out_dim) and _finite(result.poses) and _finite(result.coupling)
    assert bool((torch.linalg.vector_norm(result.poses.double(), dim=-1) <= 1 + 1e-6).all())
    assert _grads_finite(_weighted_sum(result.poses) + result.coupling.sum(), [u, *layer.parameters()])


@FAST
@given(
    where=st.sampled_from(["primary_caps", "dense_caps", "capsnet_tiny"]),
    dtype_scale=st.sampled_from([(torch.float32, 1e30), (torch.float64, 1e300)]),
    seed=SEEDS,
)
def test_capsule_layers_and_capsnet_stay_finite_on_huge_inputs(where, dtype_scale, seed):
    dtype, scale = dtype_scale
    torch.manual_seed(seed)
    if where == "primary_caps":
        out = PrimaryCaps(2, types=2, dim=4, kernel_size=3, stride=1).to(dtype)(_randn((2, 2, 5, 5), dtype, scale, seed))
    elif where == "dense_caps":
        out = DenseCaps(3, 4, 2, 4, init_std=0.5).to(dtype)(_randn((2, 3, 4), dtype, scale, seed)).poses
    else:
        out = create_model("capsnet_tiny").to(dtype)(_randn((2, 1, 28, 28), dtype, scale, seed).abs()).lengths
    assert _finite(out)


@FAST
@given(
    layer=st.sampled_from(["primary", "dense"]),
    sizes=st.lists(st.integers(-3, 3), min_size=5, max_size=5).filter(lambda s: min(s) < 1),
)
def test_capsule_layers_refuse_non_positive_sizes(layer, sizes):
    with pytest.raises(ValueError, match="must be positive"):
        if layer == "primary":
            PrimaryCaps(sizes[0], types=sizes[1], dim=sizes[2], kernel_size=sizes[3], stride=sizes[4])
        else:
            DenseCaps(*sizes[:4], iterations=sizes[4])


def test_dense_caps_refuse_a_non_finite_init_std():
    problems = _not_refused({str(v): (lambda v=v: DenseCaps(3, 2, 2, 2, init_std=v)) for v in (float("nan"), float("inf"))})
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 6, 3), (5, 3)], ids=["wrong-in-dim", "wrong-in-caps", "no-batch-axis"])
def test_dense_caps_refuse_input_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"\(B, 5, 3\)"):
        DenseCaps(5, 3, 4, 6)(torch.rand(shape))


def test_capsule_layers_refuse_malformed_input():
    primary, dense = PrimaryCaps(3, types=2, dim=4, kernel_size=3, stride=1), DenseCaps(5, 3, 4, 6)
    cases = {
        "primary wrong channels": lambda: primary(torch.rand(2, 4, 5, 5)),
        "primary no batch axis": lambda: primary(torch.rand(3, 5, 5)),
        "primary smaller than kernel": lambda: primary(torch.rand(2, 3, 2, 2)),
        "primary integer": lambda: primary(torch.ones(2, 3, 5, 5, dtype=torch.long)),
        "primary float64 into float32": lambda: primary(torch.rand(2, 3, 5, 5, dtype=torch.float64)),
        "dense integer": lambda: dense(torch.ones(2, 5, 3, dtype=torch.long)),
        "dense float64 into float32": lambda: dense(torch.rand(2, 5, 3, dtype=torch.float64)),
    }
    problems = _not_refused(cases)
    assert not problems, "\n".join(problems)


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES, SQUARE_OVERFLOW))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    image_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    hidden=st.lists(st.integers(1, 8), max_size=2).map(tuple),
    data=st.data(),
)
def test_decoder_gives_finite_pixels_in_0_1(dtype, scale, batch, sizes, image_shape, hidden, data):
    """The decoder never squashes, so even poses far beyond squash's range give finite pixels."""
    num_caps, caps_dim = sizes
    seed = data.draw(SEEDS)
    torch.manual_seed(seed)
    decoder = CapsuleDecoder(num_caps, caps_dim, image_shape, hidden=hidden).to(dtype)
    poses = _randn((batch, num_caps, caps_dim), dtype, scale, seed).requires_grad_()
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_caps - 1), min_size=batch, max_size=batch)), dtype=torch.int64)
    out = decoder(poses, labels)
    assert out.shape == (batch, *image_shape) and _finite(out) and bool(((out >= 0) & (out <= 1)).all())
    if batch:
        assert _grads_finite(out.sum(), [poses, *decoder.parameters()])


def test_decoder_refuses_malformed_poses_and_labels():
    decoder = CapsuleDecoder(4, 6, (1, 5, 5), hidden=(8,))
    cases = {
        "label too large": (torch.rand(2, 4, 6), torch.tensor([0, 4])),
        "negative label": (torch.rand(2, 4, 6), torch.tensor([0, -1])),
        "float labels": (torch.rand(2, 4, 6), torch.tensor([0.0, 2.7])),
        "label count": (torch.rand(2, 4, 6), torch.tensor([0, 1, 2])),
        "pose dim": (torch.rand(2, 4, 5), torch.tensor([0, 1])),
        "capsule count": (torch.rand(2, 3, 6), torch.tensor([0, 1])),
    }
    problems = _not_refused({name: (lambda a=args: decoder(*a)) for name, args in cases.items()})
    assert not problems, "\n".join(problems)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_decoder_refuses_non_positive_sizes():
    cases = {
        "no capsules": (0, 6, (1, 5, 5), (8,)),
        "zero pose dim": (4, 0, (1, 5, 5), (8,)),
        "zero pixels": (4, 6, (1, 0, 5), (8,)),
        "negative pixels": (4, 6, (1, -5, 5), (8,)),
        "negative hidden": (4, 6, (1, 5, 5), (-8,)),
        "zero hidden": (4, 6, (1, 5, 5), (8, 0)),
    }
    problems = _not_refused({name: (lambda a=args: CapsuleDecoder(*a[:3], hidden=a[3])) for name, args in cases.items()})
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- create_model("capsnet_tiny")


@pytest.fixture(scope="module")
def tiny_models() -> dict:
    torch.manual_seed(0)
    return {torch.float32: create_model("capsnet_tiny"), torch.float64: create_model("capsnet_tiny").double()}


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(with_labels=st.booleans(), training=st.booleans(), seed=SEEDS)
def test_capsnet_tiny_forward_is_finite_with_finite_gradients(tiny_models, dtype, scale, batch, with_labels, training, seed):
    model = tiny_models[dtype].train(training)
    x = _randn((batch, 1, 28, 28), dtype, scale, seed).abs()  # pixels are >= 0
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed)) if with_labels else None
    out = model(x, y)
    assert out.lengths.shape == (batch, 10) and out.reconstruction.shape == (batch, 1, 28, 28)
    for name in ("lengths", "poses", "reconstruction", "coupling", "primary"):
        assert _finite(getattr(out, name)), name
    assert bool(((out.lengths >= 0) & (out.lengths <= 1 + 1e-6)).all())
    if batch:
        labels = y if y is not None else out.lengths.argmax(1)
        loss = margin_loss(out.lengths, labels) + reconstruction_loss(out.reconstruction, x)
    else:  # the losses of an empty batch: test_*_of_an_empty_batch_*
        loss = _weighted_sum(out.lengths) + out.reconstruction.sum()
    assert _finite(loss) and _grads_finite(loss, model.parameters())


@st.composite
def _bad_images(draw):
    kind = draw(st.sampled_from(["ndim", "channels", "size", "integer", "nan", "inf"]))
    batch = draw(st.integers(1 if kind in ("nan", "inf") else 0, 3))
    shape = [batch, 1, 28, 28]
    if kind == "ndim":
        ndim = draw(st.sampled_from([0, 1, 2, 3, 5]))
        shape = draw(st.lists(st.integers(1, 28), min_size=ndim, max_size=ndim))
    elif kind == "channels":
        shape[1] = draw(st.sampled_from([0, 2, 3]))
    elif kind == "size":
        shape[2:] = draw(st.tuples(st.integers(1, 40), st.integers(1, 40)).filter(lambda hw: hw != (28, 28)))
    if kind == "integer":
        return torch.zeros(shape, dtype=draw(st.sampled_from([torch.uint8, torch.int64, torch.bool])))
    x = torch.rand(shape)
    if kind in ("nan", "inf"):
        value = float("nan") if kind == "nan" else draw(st.sampled_from([float("inf"), -float("inf")]))
        x[draw(st.integers(0, batch - 1)), 0, draw(st.integers(0, 27)), draw(st.integers(0, 27))] = value
    return x


@FAST
@given(x=_bad_images())
def test_capsnet_tiny_refuses_bad_images_by_name(tiny_models, x):
    with pytest.raises(ValueError, match="input"):
        tiny_models[torch.float32](x)


@FAST
@given(data=st.data(), kind=st.sampled_from(["too-large", "negative", "long", "2-d", "float", "bool"]))
def test_capsnet_tiny_refuses_bad_labels_by_name(tiny_models, data, kind):
    batch = data.draw(st.integers(1, 3))
    y = {
        "too-large": lambda: torch.full((batch,), data.draw(st.integers(10, 1000))),
        "negative": lambda: torch.full((batch,), data.draw(st.integers(-1000, -1))),
        "long": lambda: torch.zeros(batch + 1, dtype=torch.long),
        "2-d": lambda: torch.zeros(batch, 1, dtype=torch.long),
        "float": lambda: torch.zeros(batch),
        "bool": lambda: torch.zeros(batch, dtype=torch.bool),
    }[kind]()
    with pytest.raises(ValueError, match="labels"):
        tiny_models[torch.float32](torch.rand(batch, 1, 28, 28), y)


def test_capsnet_tiny_refuses_images_of_another_floating_dtype(tiny_models):
    model = tiny_models[torch.float32]
    dtypes = (torch.float64, torch.float16, torch.bfloat16)
    cases = {str(d): (lambda d=d: model(torch.rand(2, 1, 28, 28, dtype=d))) for d in dtypes}
    problems = _not_refused(cases)
    assert not problems, "\n".join(problems)


@FAST
@given(
    overrides=st.fixed_dictionaries(
        {},
        optional={
            "image_size": st.integers(17, 30),
            "num_classes": st.integers(1, 4),
            "routing_iterations": st.integers(1, 3),
            "class_dim": st.integers(1, 4),
            "primary_types": st.integers(1, 3),
            "primary_dim": st.integers(1, 4),
            "conv_channels": st.integers(1, 4),
            "decoder_hidden": st.lists(st.integers(1, 8), max_size=2).map(tuple),
            "decoder": st.booleans(),
            "leaky_routing": st.booleans(),
            "class_bias": st.booleans(),
        },
    ),
    batch=st.integers(1, 2),
)
def test_capsnet_tiny_with_random_sizes_builds_and_runs(overrides, batch):
    model = create_model("capsnet_tiny", **overrides)
    out = model(torch.rand(batch, 1, model.image_size, model.image_size))
    assert out.lengths.shape == (batch, model.num_classes) and _finite(out.lengths)
    assert (out.reconstruction is None) == (overrides.get("decoder") is False)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(
    ("key", "value"),
    [
        *[
            (key, value)
            for key in (
                "image_size", "num_classes", "primary_types", "primary_dim", "primary_kernel", "primary_stride", "class_dim",
                "routing_iterations",
            )
            for value in (0, -3)
        ],
        ("conv_channels", 0),
    ],
)
def test_capsnet_tiny_refuses_non_positive_sizes(key, value):
    with pytest.raises(ValueError):
        create_model("capsnet_tiny", **{key: value})


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_capsnet_tiny_refuses_non_positive_input_kernel_and_decoder_sizes():
    cases = {
        "in_channels=0": {"in_channels": 0},
        "in_channels=-3": {"in_channels": -3},
        "conv_channels=-3": {"conv_channels": -3},
        "conv_kernel=0": {"conv_kernel": 0},
        "conv_kernel=-3": {"conv_kernel": -3},
        "decoder_hidden=(0,)": {"decoder_hidden": (0,)},
        "decoder_hidden=(-3,)": {"decoder_hidden": (-3,)},
    }

    def build_and_run(kwargs):
        model = create_model("capsnet_tiny", **kwargs)
        model(torch.rand(1, model.in_channels, 28, 28))  # what a silently accepted size leads to

    problems = _not_refused({name: (lambda k=kwargs: build_and_run(k)) for name, kwargs in cases.items()})
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- CLI: the config is checked before training

SMOKE = str(REPO / "configs" / "mnist.py:smoke")
KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def _train_cli(*overrides: str) -> tuple[int, str, bool]:
    """``capsnet train`` on the smoke config, in-process: (exit code, stderr, whether the run directory exists)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        err = io.StringIO()
        args = ["train", "--config", SMOKE, "--out", str(out), "--data", tmp, "--no-progress", "--set", "figures=False"]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args + [a for o in overrides for a in ("--set", o)])
        return code, err.getvalue(), out.exists()


def _refusal_problem(key: str, *overrides: str) -> str | None:
    """None when ``capsnet train`` exits 2 naming ``key`` and leaves no run directory; else what it did."""
    try:
        code, err, created = _train_cli(*overrides)
    except Exception as exc:  # noqa: BLE001 -- an exception escaping main() is the finding
        return f"{overrides}: {type(exc).__name__} escaped main(): {str(exc).splitlines()[0][:120]}"
    if code != 2:
        return f"{overrides}: exit code {code}, stderr {err[-300:]!r}"
    if f"'{key}'" not in err:
        return f"{overrides}: the message does not name {key!r}: {err.strip().splitlines()[-1][:200]!r}"
    if created:
        return f"{overrides}: refused, but only after creating the run directory"
    return None


@settings(FAST, max_examples=5)
@given(key=st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(lambda k: k not in KEYS))
def test_cli_refuses_an_unknown_config_key_by_name(key):
    assert _refusal_problem(key, f"{key}=1") is None


def _bad_literals(hint) -> list[str]:
    optional = typing.get_origin(hint) is typing.Union
    base = next(h for h in typing.get_args(hint) if h is not type(None)) if optional else hint
    bad = {
        int: ["'abc'", "1.5", "True", "[1]", "{}"],
        float: ["'fast'", "True", "[0.1]", "{}"],
        bool: ["1", "'yes'", "0.0", "[]"],
        str: ["3", "[1]", "{}", "1.5"],
        dict: ["3", "'x'", "[1]", "True"],
    }[typing.get_origin(base) or base]
    return bad if optional else [*bad, "None"]


@FAST
@given(data=st.data())
def test_cli_refuses_a_value_of_the_wrong_type_by_name(data):
    key = data.draw(st.sampled_from(sorted(KEYS)))
    text = data.draw(st.sampled_from(_bad_literals(HINTS[key])))
    assert _refusal_problem(key, f"{key}={text}") is None


_POSITIVE_INTS = [
    "batch_size", "eval_batch_size", "lr_decay_steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "max_steps",
    "eval_every",
]


@st.composite
def _impossible_values(draw):
    negative = st.floats(min_value=-1e300, max_value=-1e-300)  # no subnormals: they may print as -0.0
    non_positive = st.one_of(st.just(0.0), negative)
    kind = draw(st.sampled_from(["int", "lr", "decay", "non-negative", "budget"]))
    if kind == "int":
        return draw(st.sampled_from(_POSITIVE_INTS)), repr(draw(st.integers(-10**6, 0)))
    if kind == "lr":
        return "lr", repr(draw(non_positive))
    if kind == "decay":
        return "lr_decay_rate", repr(draw(st.one_of(non_positive, st.floats(min_value=1.0 + 1e-9, max_value=1e300))))
    if kind == "non-negative":
        return draw(st.sampled_from(["lr_min", "weight_decay"])), repr(draw(negative))
    return "time_budget_s", repr(draw(non_positive))


@FAST
@given(key_value=_impossible_values())
def test_cli_refuses_an_impossible_value_by_name(key_value):
    key, text = key_value
    assert _refusal_problem(key, f"{key}={text}") is None


def test_cli_refuses_an_infinite_learning_rate_or_weight_decay_by_name():
    problems = [p for key in ("lr", "lr_min", "weight_decay") if (p := _refusal_problem(key, f"{key}=1e999", "max_steps=1"))]
    assert not problems, "\n".join(problems)


def test_cli_refuses_bad_names_and_kwargs_before_creating_the_run():
    cases = [
        ("capsnet_nope", "model=capsnet_nope"),
        ("nope", "dataset=nope"),
        ("nope", "objective=nope"),
        ("routing_iterationz", "model_kwargs.routing_iterationz=3"),
        ("routing_iterations", "model_kwargs.routing_iterations=0"),
        ("nope", "dataset_kwargs.nope=1"),
        ("train_size", "dataset_kwargs.train_size=-1"),
        ("nope", "objective_kwargs.nope=1"),
        ("seed", "seed=99999999999999999999"),
    ]
    problems = [p for key, override in cases if (p := _refusal_problem(key, override, "max_steps=1"))]
    assert not problems, "\n".join(problems)


def test_cli_stops_a_diverging_run_with_a_clear_error():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        err = io.StringIO()
        args = ["train", "--config", SMOKE, "--out", str(out), "--data", tmp, "--no-progress"]
        sets = ["figures=False", "lr=1e30", "max_steps=3", "checkpoint_every=1"]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args + [a for s in sets for a in ("--set", s)])
        if (out / "last.pt").exists():
            weights = load_checkpoint(out / "last.pt")["model"]
            assert all(_finite(w) for w in weights.values()), "a checkpoint holds non-finite weights"
        assert code == 2 and "step" in err.getvalue()

"""Property-based tests (hypothesis) of squash, safe_norm and the losses at their edges; the contract and the shared
cases are in ``tests/property_cases.py``."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_cases import (
    CUBE_OVERFLOW,
    FAST,
    LAYER,
    SAFE,
    SEEDS,
    SQUARE_OVERFLOW,
    _dtype_and_scale,
    _finite,
    _grads_finite,
    _not_refused,
    _randn,
    _reference_norm,
    _reference_squash,
    _scaled,
    _shape_and_dim,
    _weighted_sum,
)

from capsnet import margin_loss, reconstruction_loss, safe_norm, spread_loss, squash
from capsnet.functional import activation_cross_entropy

# Tiny tensors: one intra-op thread is ~50x faster than two on cores shared with other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_activation_cross_entropy_of_an_empty_batch_is_zero_with_zero_gradients():
    a = torch.rand(0, 10, requires_grad=True)
    loss = activation_cross_entropy(a, torch.zeros(0, dtype=torch.long))
    (grad,) = torch.autograd.grad(loss, a)
    assert loss.item() == 0.0 and grad.shape == (0, 10)


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
    with pytest.raises(ValueError):
        activation_cross_entropy(scores, labels)


def test_multi_hot_targets_must_be_zeros_and_ones():
    def with_entry(value):
        t = torch.zeros(2, 4)
        t[1, 2] = value
        return lambda: margin_loss(torch.rand(2, 4), t)

    problems = _not_refused({str(v): with_entry(v) for v in (5.0, -1.0, 2.0, float("nan"))})
    assert not problems, "\n".join(problems)

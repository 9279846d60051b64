"""Property-based tests (hypothesis) of dynamic routing at its edges; the contract and the shared
cases are in ``tests/property_cases.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_cases import (
    FAST,
    LAYER,
    LAYER_SCALES,
    SEEDS,
    SQUARE_OVERFLOW,
    _dtype_and_scale,
    _finite,
    _grads_finite,
    _not_refused,
    _randn,
    _reference_squash,
    _scaled,
    _weighted_sum,
)

from capsnet import dynamic_routing

# Tiny tensors: one intra-op thread is ~50x faster than two on cores shared with other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


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

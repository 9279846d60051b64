"""Routing-by-agreement (Procedure 1 of Sabour et al. 2017) against its reference and its invariants."""

from __future__ import annotations

import pytest
import torch
from reference import reference_dynamic_routing
from torch.autograd import gradcheck

from capsnet import dynamic_routing, squash

SHAPES = [(1, 3, 2, 4), (2, 5, 3, 4), (3, 8, 10, 16), (2, 12, 4, 2)]  # (B, I, J, D)
ITERATIONS = [1, 2, 3, 5]


def _votes(shape, *, seed=0, scale=1.0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype) * scale


@pytest.mark.parametrize("iterations", ITERATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_routing_matches_reference(shape, iterations):
    votes = _votes(shape)
    fast = dynamic_routing(votes, iterations)
    poses, coupling, logits = reference_dynamic_routing(votes, iterations)
    torch.testing.assert_close(fast.poses, poses, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.coupling, coupling, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.logits, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 3])
def test_leaky_routing_matches_reference(iterations):
    votes = _votes((2, 6, 3, 4))
    fast = dynamic_routing(votes, iterations, leaky=True)
    poses, coupling, _ = reference_dynamic_routing(votes, iterations, leaky=True)
    torch.testing.assert_close(fast.poses, poses, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.coupling, coupling, rtol=0, atol=1e-6)


def test_result_shapes():
    result = dynamic_routing(_votes((2, 7, 3, 5)), 3)
    assert result.poses.shape == (2, 3, 5)
    assert result.coupling.shape == (2, 7, 3)
    assert result.logits.shape == (2, 7, 3)


@pytest.mark.parametrize("iterations", ITERATIONS)
def test_coupling_sums_to_one_over_parents(iterations):
    # Votes large enough that the routing moves far from uniform coupling.
    result = dynamic_routing(_votes((3, 9, 5, 4), scale=3.0), iterations)
    sums = result.coupling.sum(dim=2)  # (B, I)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_coupling_is_softmax_of_returned_logits_over_parents():
    result = dynamic_routing(_votes((2, 9, 5, 4), scale=3.0), 3)
    torch.testing.assert_close(result.coupling, torch.softmax(result.logits, dim=2))


def test_coupling_departs_from_uniform_after_several_iterations():
    # Guards the tests above against a routing that never updates its logits.
    result = dynamic_routing(_votes((2, 9, 5, 4), scale=3.0), 3)
    assert (result.coupling - 1 / 5).abs().max() > 0.05


def test_single_iteration_uses_uniform_coupling():
    votes = _votes((2, 9, 5, 4))
    result = dynamic_routing(votes, 1)
    torch.testing.assert_close(result.coupling, torch.full_like(result.coupling, 1 / 5))
    torch.testing.assert_close(result.poses, squash(votes.sum(dim=1) / 5))  # s_j = sum_i u_hat_j|i / J


def test_two_calls_on_the_same_input_give_identical_results():
    votes = _votes((2, 9, 5, 4), scale=3.0)
    first = dynamic_routing(votes, 3)
    second = dynamic_routing(votes, 3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_routing_a_batch_equals_routing_each_sample_separately():
    votes = _votes((4, 9, 5, 4), scale=3.0)
    batched = dynamic_routing(votes, 3)
    for b in range(4):
        single = dynamic_routing(votes[b : b + 1], 3)
        torch.testing.assert_close(batched.poses[b : b + 1], single.poses, rtol=0, atol=1e-12)
        torch.testing.assert_close(batched.coupling[b : b + 1], single.coupling, rtol=0, atol=1e-12)


def test_routing_accepts_a_transposed_view_of_votes():
    # DenseCaps hands routing a (B, I, J, D) view of a (B, J, I, D) contiguous tensor.
    votes = _votes((2, 9, 5, 4))
    view = votes.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    torch.testing.assert_close(dynamic_routing(view, 3).poses, dynamic_routing(votes, 3).poses, rtol=0, atol=0)


# --------------------------------------------------------------------------- gradients


def _vote_gradient(votes, iterations, *, detach_intermediate, weights):
    votes = votes.clone().requires_grad_(True)
    poses = dynamic_routing(votes, iterations, detach_intermediate=detach_intermediate).poses
    (poses * weights).sum().backward()
    return poses.detach(), votes.grad


def test_detach_intermediate_keeps_forward_values():
    votes = _votes((2, 9, 5, 4), scale=2.0)
    attached = dynamic_routing(votes, 3, detach_intermediate=False)
    detached = dynamic_routing(votes, 3, detach_intermediate=True)
    for a, b in zip(attached, detached):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_detach_intermediate_changes_gradients_with_several_iterations():
    votes = _votes((2, 9, 5, 4), scale=2.0)
    weights = _votes((2, 5, 4), seed=1)
    _, grad_attached = _vote_gradient(votes, 3, detach_intermediate=False, weights=weights)
    _, grad_detached = _vote_gradient(votes, 3, detach_intermediate=True, weights=weights)
    assert (grad_attached - grad_detached).abs().max() > 1e-3


def test_detach_intermediate_gradient_is_last_iteration_with_constant_coupling():
    votes = _votes((2, 9, 5, 4), scale=2.0)
    weights = _votes((2, 5, 4), seed=1)
    _, grad_detached = _vote_gradient(votes, 3, detach_intermediate=True, weights=weights)

    # Explicit construction: take the final coupling as a constant, redo Eq. 2 and Eq. 1 once.
    coupling = dynamic_routing(votes, 3).coupling.detach()  # (B, I, J)
    u_hat = votes.clone().requires_grad_(True)
    s = torch.einsum("bij,bijd->bjd", coupling, u_hat)  # Eq. 2
    (squash(s) * weights).sum().backward()  # Eq. 1
    torch.testing.assert_close(grad_detached, u_hat.grad, rtol=1e-10, atol=1e-12)


def test_detach_intermediate_is_irrelevant_with_one_iteration():
    votes = _votes((2, 9, 5, 4), scale=2.0)
    weights = _votes((2, 5, 4), seed=1)
    _, grad_attached = _vote_gradient(votes, 1, detach_intermediate=False, weights=weights)
    _, grad_detached = _vote_gradient(votes, 1, detach_intermediate=True, weights=weights)
    torch.testing.assert_close(grad_attached, grad_detached, rtol=0, atol=0)


@pytest.mark.parametrize("leaky", [False, True])
def test_routing_gradcheck_float64(leaky):
    votes = _votes((1, 3, 2, 3)).requires_grad_(True)
    assert gradcheck(lambda v: dynamic_routing(v, 3, leaky=leaky).poses, (votes,))


# --------------------------------------------------------------------------- leaky routing


def test_leaky_coupling_sums_to_less_than_one_over_real_parents():
    result = dynamic_routing(_votes((2, 9, 5, 4), scale=3.0), 3, leaky=True)
    sums = result.coupling.sum(dim=2)  # (B, I)
    assert bool((sums < 1).all()), f"max coupling sum {sums.max().item()}"
    assert bool((sums > 0).all())


def test_leaky_coupling_is_softmax_with_a_zero_orphan_logit():
    result = dynamic_routing(_votes((2, 9, 5, 4), scale=3.0), 3, leaky=True)
    padded = torch.cat([torch.zeros_like(result.logits[..., :1]), result.logits], dim=2)  # (B, I, 1 + J)
    torch.testing.assert_close(result.coupling, torch.softmax(padded, dim=2)[..., 1:])


def test_leaky_single_iteration_coupling_is_one_over_parents_plus_one():
    result = dynamic_routing(_votes((2, 9, 5, 4)), 1, leaky=True)
    torch.testing.assert_close(result.coupling, torch.full_like(result.coupling, 1 / 6))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("shape", [(9, 5, 4), (2, 9, 5, 4, 1), (9,)])
def test_routing_rejects_votes_that_are_not_4d(shape):
    with pytest.raises(ValueError, match=r"\(B, I, J, D\)"):
        dynamic_routing(torch.randn(shape), 3)


@pytest.mark.parametrize("iterations", [0, -1])
def test_routing_rejects_fewer_than_one_iteration(iterations):
    with pytest.raises(ValueError, match="iterations"):
        dynamic_routing(torch.randn(2, 9, 5, 4), iterations)


def test_iterations_accept_integer_like_values():
    import numpy as np

    votes = torch.randn(2, 5, 3, 4)
    expected = dynamic_routing(votes, iterations=2).poses
    for iterations in (np.int64(2), torch.tensor(2)):
        torch.testing.assert_close(dynamic_routing(votes, iterations=iterations).poses, expected)
    for bad in (True, 2.0, "2", torch.tensor(2.0)):
        with pytest.raises(ValueError, match="iterations"):
            dynamic_routing(votes, iterations=bad)

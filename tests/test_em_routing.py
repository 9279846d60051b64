"""EM routing (Procedure 1 of Hinton, Sabour & Frosst 2018): fast path against the slow reference and its invariants."""

from __future__ import annotations

import math

import pytest
import torch
from em_problems import fan_in, random_problem
from em_reference import conv_children, dense_children, reference_em_routing
from torch.autograd import gradcheck

from capsnet.routing.em import (
    ConvGeometry,
    child_sum,
    children_per_parent,
    em_routing,
    inverse_temperatures,
    log_child_normaliser,
    parent_counts,
    to_patches,
)
from capsnet.routing.em_steps import _Assign, assignments

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _children(geometry, votes):
    if geometry is None:
        return dense_children(votes.shape[1], votes.shape[2])
    return conv_children(geometry.in_size, geometry.kernel, geometry.stride, geometry.types)


def _assert_matches_reference(votes, act, beta_a, beta_v, geometry, *, iterations, schedule="fan_in", **kw):
    fast = em_routing(votes, act, beta_a, beta_v, iterations=iterations, geometry=geometry, schedule=schedule, **kw)
    cost_scale = kw.get("cost_scale")
    if cost_scale is None:
        cost_scale = 100.0 * votes.shape[3] / votes.shape[2] if schedule == "authors" else 1.0
    lambdas = inverse_temperatures(schedule, iterations, final_lambda=kw.get("final_lambda"), fan_in=fan_in(votes, geometry))
    poses, acts, assign = reference_em_routing(
        votes.numpy(), act.numpy(), beta_a.numpy(), beta_v.numpy(),
        lambdas=lambdas, children=_children(geometry, votes), cost_scale=cost_scale,
        activation=kw.get("activation", "paper"), temperature=kw.get("e_step_temperature", 1.0),
    )  # fmt: skip
    torch.testing.assert_close(fast.poses, torch.from_numpy(poses), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.activations, torch.from_numpy(acts), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.assignments, torch.from_numpy(assign), rtol=0, atol=1e-6)


CONV_CASES = [  # (in_size, kernel, stride, child types)
    ((5, 5), (3, 3), (1, 1), 2),
    ((5, 5), (3, 3), (2, 2), 2),
    ((6, 7), (3, 3), (2, 2), 1),  # VALID padding leaves the last row / column of children out
    ((4, 4), (2, 2), (1, 1), 2),
    ((5, 6), (2, 3), (1, 2), 1),  # rectangular kernel and stride
    ((3, 3), (3, 3), (1, 1), 2),  # one patch: every child has J parents
]


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}k{c[1]}s{c[2]}t{c[3]}")
def test_conv_routing_matches_reference(case, iterations):
    geometry = ConvGeometry(*case)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=iterations)
    _assert_matches_reference(votes, act, beta_a, beta_v, geometry, iterations=iterations)


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_dense_routing_matches_reference(iterations):
    votes, act, beta_a, beta_v = random_problem(None, types=4, num_patches=2, slots=9, dim=16, seed=iterations)
    _assert_matches_reference(votes, act, beta_a, beta_v, None, iterations=iterations)


@pytest.mark.parametrize("activation", ["centred", "standardised", "offset"])
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}k{c[1]}s{c[2]}t{c[3]}")
def test_other_activations_match_reference(case, iterations, activation):
    geometry = ConvGeometry(*case)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=10 + iterations)
    _assert_matches_reference(votes, act, beta_a, beta_v, geometry, iterations=iterations, schedule="linear",
                              final_lambda=2.0, activation=activation)


@pytest.mark.parametrize("temperature", [0.5, 2.5])
@pytest.mark.parametrize("iterations", [2, 3])
@pytest.mark.parametrize("case", CONV_CASES[:3], ids=lambda c: f"{c[0]}k{c[1]}s{c[2]}t{c[3]}")
def test_e_step_temperature_matches_reference(case, iterations, temperature):
    """``e_step_temperature`` against the loop reference whose E-step weighs ``a_j p_ij^(1/T)``."""
    geometry = ConvGeometry(*case)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=40 + iterations)
    _assert_matches_reference(votes, act, beta_a, beta_v, geometry, iterations=iterations, activation="offset",
                              schedule="linear", final_lambda=2.0, e_step_temperature=temperature)


def test_e_step_temperature_softens_the_assignments_and_one_is_procedure_1():
    """T = 1 gives Procedure 1 bit for bit; a larger T gives assignments of higher entropy over the parents, and a
    very large one assignments near the E-step's prior ``a_j / sum_k a_k`` (the likelihood flattened away)."""
    votes, act, beta_a, beta_v = random_problem(GEOMETRY, seed=44)

    def route(**kw):
        return em_routing(votes, act, beta_a, beta_v, iterations=2, geometry=GEOMETRY, activation="offset", **kw)

    plain, one = route(), route(e_step_temperature=1.0)
    for a, b in zip(plain, one):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def entropy(r):  # over the J parent types of each (patch, slot), where the slot has mass
        p = r / r.sum(-1, keepdim=True).clamp_min(1e-300)
        return -(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean()

    entropies = [entropy(route(e_step_temperature=t).assignments) for t in (1.0, 2.0, 8.0)]
    assert entropies[0] < entropies[1] < entropies[2]
    with pytest.raises(ValueError, match="e_step_temperature must be a finite number > 0, got 0"):
        route(e_step_temperature=0)


@pytest.mark.parametrize("activation", ["centred", "standardised", "offset"])
def test_other_activations_dense_and_per_capsule_betas_match_reference(activation):
    votes, act, beta_a, beta_v = random_problem(None, types=4, num_patches=2, slots=9, dim=16, seed=7, beta_shape=(2, 4))
    _assert_matches_reference(votes, act, beta_a, beta_v, None, iterations=3, activation=activation)


def test_centred_activation_is_the_paper_logit_shifted_by_the_mean_cost():
    """Centring moves every parent of a position by the same amount: their order is the paper's."""
    geometry = ConvGeometry((5, 5), (3, 3), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=12)
    beta_a = torch.zeros_like(beta_a)  # equal offsets, so the paper's order is the cost's
    paper = em_routing(votes, act, beta_a, beta_v, iterations=1, geometry=geometry)
    centred = em_routing(votes, act, beta_a, beta_v, iterations=1, geometry=geometry, activation="centred")
    assert torch.equal(paper.activations.argsort(-1), centred.activations.argsort(-1))
    logit = torch.logit(centred.activations)
    torch.testing.assert_close(logit.mean(-1), torch.zeros_like(logit.mean(-1)), rtol=0, atol=1e-9)


def test_offset_activation_is_the_centred_logit_with_beta_a_added_after_lambda():
    """With beta_a = 0 the two agree; with beta_a the offset logit moves by beta_a itself, not by lambda beta_a."""
    geometry = ConvGeometry((5, 5), (3, 3), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=13)
    zero = torch.zeros_like(beta_a)
    kw = dict(iterations=1, geometry=geometry, schedule="linear", final_lambda=0.01)
    centred = em_routing(votes, act, zero, beta_v, activation="centred", **kw)
    offset = em_routing(votes, act, zero, beta_v, activation="offset", **kw)
    torch.testing.assert_close(offset.activations, centred.activations, rtol=0, atol=1e-12)
    shifted = em_routing(votes, act, zero - 2.0, beta_v, activation="offset", **kw)
    torch.testing.assert_close(torch.logit(shifted.activations), torch.logit(offset.activations) - 2.0, rtol=0, atol=1e-9)


def test_standardised_activation_is_finite_when_every_parent_costs_the_same():
    """Identical votes for every parent type: the costs' spread is 0, COST_EPS keeps logits and gradients finite."""
    geometry = ConvGeometry((4, 4), (2, 2), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=8)
    votes = votes[..., :1, :].expand_as(votes).clone().requires_grad_()
    out = em_routing(votes, act, torch.zeros_like(beta_a), torch.zeros_like(beta_v), geometry=geometry,
                     schedule="linear", activation="standardised")
    torch.testing.assert_close(out.activations, torch.full_like(out.activations, 0.5))  # beta_a = 0, no winner
    out.activations.sum().backward()
    assert torch.isfinite(votes.grad).all()


def test_routing_statistics_describe_each_iteration_and_change_nothing():
    geometry = ConvGeometry((5, 5), (3, 3), (2, 2), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=9)
    stats = []
    measured = em_routing(votes, act, beta_a, beta_v, iterations=3, geometry=geometry, stats=stats)
    plain = em_routing(votes, act, beta_a, beta_v, iterations=3, geometry=geometry)
    for a, b in zip(measured, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(stats) == 3
    assert set(stats[0]) == {"a_mean", "a_std", "var_floor_fraction", "r_entropy", "logit_p05", "logit_p50", "logit_p95"}
    assert stats[0]["r_entropy"] == pytest.approx(1.0)  # the init is uniform over the J types of a patch
    assert all(0.0 <= s["r_entropy"] <= 1.0 + 1e-12 and 0.0 <= s["var_floor_fraction"] <= 1.0 for s in stats)
    assert stats[1]["r_entropy"] < 1.0  # the E-step has taken sides
    assert stats[-1]["a_mean"] == pytest.approx(float(measured.activations.mean()))
    assert stats[0]["logit_p05"] <= stats[0]["logit_p50"] <= stats[0]["logit_p95"]


def test_plain_linear_schedule_matches_reference():
    geometry = ConvGeometry((5, 5), (3, 3), (2, 2), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=2)
    _assert_matches_reference(votes, act, beta_a, beta_v, geometry, iterations=3, schedule="linear")


def test_authors_schedule_with_ibm_cost_scaling_matches_reference():
    geometry = ConvGeometry((5, 5), (3, 3), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=3)
    beta_a = beta_a - 1000.0  # the schedule's companion init: large negative beta_a
    _assert_matches_reference(votes, act, beta_a, beta_v, geometry, iterations=3, schedule="authors")


def test_per_capsule_betas_match_reference():
    geometry = ConvGeometry((5, 5), (3, 3), (2, 2), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, beta_shape=(geometry.num_patches, 3), seed=4)
    _assert_matches_reference(votes, act, beta_a, beta_v, geometry, iterations=3)


def test_per_capsule_betas_equal_per_type_betas_when_rows_agree():
    geometry = ConvGeometry((5, 5), (3, 3), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=5)
    per_type = em_routing(votes, act, beta_a, beta_v, geometry=geometry)
    rows = geometry.num_patches
    per_capsule = em_routing(votes, act, beta_a.expand(rows, -1), beta_v.expand(rows, -1), geometry=geometry)
    for a, b in zip(per_type, per_capsule):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    changed = beta_a.expand(rows, -1).clone()
    changed[0] += 1.0  # only the parents of patch 0 get a different beta_a
    moved = em_routing(votes, act, changed, beta_v.expand(rows, -1), iterations=1, geometry=geometry)
    assert not torch.allclose(moved.activations[:, 0], per_type.activations[:, 0])
    torch.testing.assert_close(moved.activations[:, 1:], em_routing(votes, act, beta_a, beta_v, iterations=1,
                                                                    geometry=geometry).activations[:, 1:])


def test_1d_receptive_field_sum_is_per_child_not_per_patch():
    """Implementation notes' example: children [1, 2, 3, 4], patches of 2, stride 1."""
    geometry = ConvGeometry((1, 4), (1, 2), (1, 1), 1)
    patches = to_patches(torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=F64), geometry)  # (1, L=3, I=2)
    assert patches.squeeze(0).tolist() == [[1, 2], [2, 3], [3, 4]]
    assert child_sum(patches, geometry).flatten().tolist() == [1, 4, 6, 4]  # the correct sum
    assert patches.sum(dim=1).flatten().tolist() == [6, 9]  # the per-patch defect, for contrast
    # The E-step normaliser works in log space and hands each slot its child's total.
    totals = log_child_normaliser(patches.log(), geometry).exp()
    torch.testing.assert_close(totals.squeeze(0), torch.tensor([[1.0, 4.0], [4.0, 6.0], [6.0, 4.0]], dtype=F64))


def test_2d_corner_children_have_one_patch_centre_children_several():
    geometry = ConvGeometry((5, 5), (3, 3), (1, 1), 1)
    counts = parent_counts(geometry, like=torch.zeros((), dtype=F64))[0, 0]
    assert counts[0, 0] == counts[0, 4] == counts[4, 0] == counts[4, 4] == 1
    assert counts[2, 2] == 9 and counts[0, 2] == 3 and counts[1, 1] == 4
    votes, act, beta_a, beta_v = random_problem(geometry, types=2, seed=6)
    r = em_routing(votes, act, beta_a, beta_v, iterations=2, geometry=geometry).assignments  # (B, L=9, I=9, J)
    corner_slot, centre_slot = 0, 4  # slot (0, 0) of patch 0 is child (0, 0); slot (1, 1) of patch 4 is (2, 2)
    # The corner child gets all its feedback from patch 0: its J assignments there sum to 1.
    torch.testing.assert_close(r[:, 0, corner_slot].sum(-1), torch.ones(2, dtype=F64))
    # The centre child is shared by all 9 patches: one patch alone holds only part of it.
    assert (r[:, 4, centre_slot].sum(-1) < 1 - 1e-3).all()
    per_child = child_sum(r.sum(-1), geometry)
    torch.testing.assert_close(per_child[:, 0, 2, 2], torch.ones(2, dtype=F64))


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}k{c[1]}s{c[2]}t{c[3]}")
def test_assignments_sum_to_one_over_all_parents_of_every_child(case):
    geometry = ConvGeometry(*case)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=7)
    r = em_routing(votes, act, beta_a, beta_v, iterations=3, geometry=geometry).assignments
    per_child = child_sum(r.sum(-1), geometry)  # (B, T, H, W)
    covered = parent_counts(geometry, like=per_child) > 0
    torch.testing.assert_close(per_child, covered.to(F64).expand_as(per_child), rtol=0, atol=1e-12)


def test_dense_assignments_sum_to_one_over_parents():
    votes, act, beta_a, beta_v = random_problem(None, types=5, slots=7, seed=8)
    r = em_routing(votes, act, beta_a, beta_v, iterations=3).assignments
    torch.testing.assert_close(r.sum(-1), torch.ones_like(r[..., 0]), rtol=0, atol=1e-12)


def test_one_parent_one_iteration_is_the_closed_form_gaussian():
    """J = 1 and equal activations: R = 1, so the M-step is the plain mean and variance."""
    gen = torch.Generator().manual_seed(9)
    votes = torch.randn(3, 1, 11, 1, 16, generator=gen, dtype=F64)
    act = torch.full((3, 1, 11), 0.7, dtype=F64)
    beta_a, beta_v = torch.tensor([0.3], dtype=F64), torch.tensor([-0.2], dtype=F64)
    out = em_routing(votes, act, beta_a, beta_v, iterations=1, schedule=[1.0], eps=0.0, var_floor=1e-9)
    v = votes[:, 0, :, 0]  # (B, I, D)
    mean, var = v.mean(1), v.var(1, unbiased=False) + 1e-9
    torch.testing.assert_close(out.poses[:, 0, 0], mean, rtol=0, atol=1e-12)
    mass = 0.7 * 11
    cost = ((beta_v + 0.5 * var.log()) * mass).sum(-1)
    torch.testing.assert_close(out.activations[:, 0, 0], torch.sigmoid(1.0 * (beta_a - cost)), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.assignments, torch.ones_like(out.assignments))


def test_inverse_temperature_schedules():
    assert inverse_temperatures("fan_in", 3, fan_in=32.0) == pytest.approx((1 / 192, 2 / 192, 1 / 64))
    assert inverse_temperatures("fan_in", 2, fan_in=4.0, final_lambda=1.0) == pytest.approx((1 / 8, 1 / 4))
    assert inverse_temperatures("linear", 3) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert inverse_temperatures("linear", 2, final_lambda=0.5) == pytest.approx((0.25, 0.5))
    assert inverse_temperatures("authors", 3) == pytest.approx((5.0e-4, 9.75e-4, 1.42625e-3))
    assert inverse_temperatures([0.1, 0.2], 2) == (0.1, 0.2)


def test_fan_in_is_pose_size_times_children_per_parent():
    assert children_per_parent(1, 256, 5) == pytest.approx(256 / 5)  # a class layer
    geometry = ConvGeometry((14, 14), (3, 3), (2, 2), 8)  # em_small ConvCaps1: 13 x 13 x 8 covered children
    assert children_per_parent(36, 72, 16, geometry) == pytest.approx(13 * 13 * 8 / (36 * 16))
    votes, act, beta_a, beta_v = random_problem(None, types=4, slots=8, dim=16, seed=10)
    lambdas = inverse_temperatures("fan_in", 3, fan_in=16 * 8 / 4)
    default = em_routing(votes, act, beta_a, beta_v)
    explicit = em_routing(votes, act, beta_a, beta_v, schedule=lambdas)
    torch.testing.assert_close(default.activations, explicit.activations, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="fan_in"):
        inverse_temperatures("fan_in", 3)


def test_authors_schedule_scales_the_cost_by_100_over_children_per_parent():
    votes, act, beta_a, beta_v = random_problem(None, types=4, slots=8, seed=10)
    lambdas = inverse_temperatures("authors", 3)
    named = em_routing(votes, act, beta_a, beta_v, schedule="authors")
    explicit = em_routing(votes, act, beta_a, beta_v, schedule=lambdas, cost_scale=100.0 * 4 / 8)
    for a, b in zip(named, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    unscaled = em_routing(votes, act, beta_a, beta_v, schedule=lambdas)
    assert not torch.allclose(named.activations, unscaled.activations)


def test_gradcheck_conv_routing_float64():
    geometry = ConvGeometry((4, 4), (2, 2), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, types=2, dim=3, seed=11)
    inputs = tuple(t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v))

    def fn(*args):
        return tuple(em_routing(*args, iterations=3, geometry=geometry))

    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_gradcheck_votes_only_and_activations_only():
    votes, act, beta_a, beta_v = random_problem(None, types=3, slots=4, dim=3, seed=12)
    v = votes.clone().requires_grad_()
    a = act.clone().requires_grad_()
    assert gradcheck(lambda x: tuple(em_routing(x, act, beta_a, beta_v)), (v,), atol=1e-6, fast_mode=True)
    assert gradcheck(lambda x: tuple(em_routing(votes, x, beta_a, beta_v)), (a,), atol=1e-6, fast_mode=True)


def test_gradients_flow_through_every_iteration_unless_detached():
    geometry = ConvGeometry((4, 4), (2, 2), (1, 1), 1)
    votes, act, beta_a, beta_v = random_problem(geometry, seed=13)
    grads = {}
    for detach in (False, True):
        v = votes.clone().requires_grad_()
        out = em_routing(v, act, beta_a, beta_v, geometry=geometry, detach_intermediate=detach)
        out.activations.sum().backward()
        grads[detach] = v.grad
        assert torch.isfinite(v.grad).all()
    assert not torch.allclose(grads[False], grads[True])
    same = em_routing(votes, act, beta_a, beta_v, geometry=geometry, detach_intermediate=True)
    torch.testing.assert_close(same.poses, em_routing(votes, act, beta_a, beta_v, geometry=geometry).poses)


def _finite_everywhere(votes, act, beta_a, beta_v, geometry):
    votes = votes.clone().requires_grad_()
    act = act.clone().requires_grad_()
    beta_a = beta_a.clone().requires_grad_()
    beta_v = beta_v.clone().requires_grad_()
    out = em_routing(votes, act, beta_a, beta_v, geometry=geometry)
    for t in out:
        assert torch.isfinite(t).all()
    (out.poses.sum() + out.activations.sum() + out.assignments.sum()).backward()
    for t in (votes, act, beta_a, beta_v):
        assert torch.isfinite(t.grad).all()


GEOMETRY = ConvGeometry((5, 5), (3, 3), (1, 1), 2)


@pytest.mark.parametrize("case", ["zero", "constant", "scaled_1e4", "activations_zero"])
def test_no_nan_or_inf_in_values_or_gradients(case):
    votes, act, beta_a, beta_v = random_problem(GEOMETRY, dtype=torch.float32, dim=16, seed=14)
    if case == "zero":
        votes = torch.zeros_like(votes)
    elif case == "constant":
        votes = torch.full_like(votes, 3.0)  # every vote agrees: zero variance
    elif case == "scaled_1e4":
        votes = votes * 1e4
    else:
        act = torch.zeros_like(act)
    _finite_everywhere(votes, act, beta_a, beta_v, GEOMETRY)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(votes=torch.zeros(2, 3, 4, 5)), "votes must be"),
        (dict(activations=torch.zeros(2, 9, 17)), "activations must be"),
        (dict(beta_a=torch.zeros(4)), "beta_a must be"),
        (dict(beta_v=torch.zeros(2, 3)), "beta_v must be"),
        (dict(iterations=0), "iterations must be"),
        (dict(schedule="cosine"), "schedule must be"),
        (dict(schedule=[1.0, 2.0]), "one lambda per iteration"),
        (dict(geometry=ConvGeometry((5, 5), (3, 3), (2, 2), 2)), "geometry"),
        (dict(var_floor=0.0), "var_floor"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    votes, act, beta_a, beta_v = random_problem(GEOMETRY, seed=15)
    args = dict(votes=votes, activations=act, beta_a=beta_a, beta_v=beta_v, geometry=GEOMETRY)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        em_routing(args.pop("votes"), args.pop("activations"), args.pop("beta_a"), args.pop("beta_v"), **args)


def test_log_child_normaliser_is_stable_for_huge_spreads():
    geometry = ConvGeometry((1, 4), (1, 2), (1, 1), 1)
    s = torch.tensor([[[-1e4, 0.0], [3.0, -2e4], [1e3, 5.0]]], dtype=torch.float32)
    out = log_child_normaliser(s, geometry)
    assert torch.isfinite(out).all()
    # child 1 sits in patch 0 (value 0) and patch 1 (value 3): log(e^0 + e^3)
    assert out[0, 0, 1].item() == pytest.approx(math.log(1 + math.exp(3.0)), rel=1e-6)


def test_em_routing_is_exported_at_the_top_level():
    import capsnet
    import capsnet.routing

    assert capsnet.em_routing is capsnet.routing.em_routing is em_routing
    assert capsnet.EMRoutingResult is capsnet.routing.EMRoutingResult
    assert {"em_routing", "EMRoutingResult"} <= set(capsnet.__all__) & set(capsnet.routing.__all__)



def _softmax_over_parents(log_ap, geometry):
    """``R`` by plain autograd ops, one child at a time: ``exp(ln(a_j p_ij) - ln sum_k a_k p_ik)``
    with the sum over every parent ``k`` (all types, all patches) that holds the child."""
    slots, batch, num_patches, _ = log_ap.shape
    per_slot = torch.logsumexp(log_ap, dim=-1)  # (I, B, L)
    if geometry is None:
        return torch.exp(log_ap - per_slot.unsqueeze(-1))
    children = geometry.types * geometry.in_size[0] * geometry.in_size[1]
    ids = torch.arange(children, dtype=torch.float64).view(1, geometry.types, *geometry.in_size)
    child = to_patches(ids, geometry)[0].long().t().reshape(-1)  # (I L,): the child in each slot, slot-major
    flat = per_slot.permute(1, 0, 2).reshape(batch, -1)  # (B, I L), slot-major like `child`
    log_norm = torch.zeros_like(flat)
    for c in child.unique().tolist():
        held = child == c
        log_norm = log_norm + held * torch.logsumexp(flat[:, held], dim=-1, keepdim=True)
    return torch.exp(log_ap - log_norm.view(batch, slots, num_patches).permute(1, 0, 2).unsqueeze(-1))


@pytest.mark.parametrize("geometry", [None, ConvGeometry((5, 5), (3, 3), (1, 1), 2), ConvGeometry((5, 4), (3, 2), (2, 1), 1)])
@pytest.mark.parametrize("detach, use_r", [(False, True), (False, False), (True, True)])
def test_e_step_assignments_and_their_gradient_match_plain_autograd(geometry, detach, use_r):
    """The E-step's softmax over each child's parents (values of :func:`assignments`, gradient of
    ``_Assign``'s one-pass backward) against autograd through the per-child loop above, float64."""
    gen = torch.Generator().manual_seed(21)
    slots, num_patches = (geometry.slots, geometry.num_patches) if geometry is not None else (6, 3)
    shape = (slots, 2, num_patches, 4)
    log_ap = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    a_in = torch.rand(slots, 2, num_patches, 1, generator=gen, dtype=torch.float64).requires_grad_()
    w_r, w_ra = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)

    expected_r = _softmax_over_parents(log_ap, geometry)
    expected_ra = (expected_r.detach() if detach else expected_r) * a_in
    loss = (w_ra * expected_ra).sum() + ((w_r * expected_r).sum() if use_r and not detach else 0.0)
    expected = torch.autograd.grad(loss, (log_ap, a_in), allow_unused=True)

    with torch.no_grad():
        r = assignments(log_ap, geometry)
    torch.testing.assert_close(r, expected_r.detach(), rtol=1e-12, atol=1e-14)
    r_out, ra = _Assign.apply(log_ap, a_in, r, geometry, detach)
    loss = (w_ra * ra).sum() + ((w_r * r_out).sum() if use_r and not detach else 0.0)  # unused R: its gradient is None
    got = torch.autograd.grad(loss, (log_ap, a_in), allow_unused=True)
    if detach:
        assert got[0] is None and expected[0] is None
    else:
        torch.testing.assert_close(got[0], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-10, atol=1e-12)


def test_gradcheck_e_step_assignments_float64():
    geometry = ConvGeometry((4, 4), (2, 2), (1, 1), 2)
    gen = torch.Generator().manual_seed(22)
    log_ap = torch.randn(geometry.slots, 2, geometry.num_patches, 3, generator=gen, dtype=torch.float64).requires_grad_()
    a_in = torch.rand(geometry.slots, 2, geometry.num_patches, 1, generator=gen, dtype=torch.float64).requires_grad_()

    def fn(x, a):
        with torch.no_grad():
            r = assignments(x, geometry)
        return _Assign.apply(x, a, r, geometry, False)

    assert gradcheck(fn, (log_ap, a_in), eps=1e-6, atol=1e-7)


def test_the_returned_assignments_are_the_callers_to_modify():
    """R is also recorded for the backward pass; the caller's copy may be changed in place."""
    geometry = ConvGeometry((4, 4), (2, 2), (1, 1), 2)
    votes, act, beta_a, beta_v = random_problem(geometry, types=2, dim=3, seed=23)
    v = votes.clone().requires_grad_()
    out = em_routing(v, act, beta_a, beta_v, iterations=3, geometry=geometry)
    out.assignments.detach().clamp_(min=0.5)
    out.activations.sum().backward()
    assert torch.isfinite(v.grad).all()

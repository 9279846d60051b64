"""EM routing's gradients: detached and truncated iterations, plain autograd through Procedure 1, what the hand-written backward rules out."""

from __future__ import annotations

import pytest
import torch
from em_problems import fan_in, random_problem
from em_reference import autograd_em_routing, autograd_em_routing_dense

from capsnet import create_model
from capsnet.routing.em import (
    ConvGeometry,
    em_routing,
    inverse_temperatures,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


GEOMETRY = ConvGeometry((5, 5), (3, 3), (1, 1), 2)


def test_detached_assignments_still_pass_the_gradient_of_the_child_activations():
    """With ``detach_intermediate`` R is a constant, but the last M-step still weighs it by a_i."""
    from capsnet.routing.em import MASS_EPS, VAR_FLOOR

    votes, act, beta_a, beta_v = random_problem(GEOMETRY, seed=21)
    gen = torch.Generator().manual_seed(22)
    a1 = act.clone().requires_grad_()
    out = em_routing(votes, a1, beta_a, beta_v, geometry=GEOMETRY, detach_intermediate=True)
    g_mu, g_a = torch.randn(out.poses.shape, generator=gen, dtype=F64), torch.randn(out.activations.shape, generator=gen, dtype=F64)
    torch.autograd.backward([out.poses, out.activations], [g_mu, g_a])
    # The last M-step by hand, from the final (constant) assignments.
    a2 = act.clone().requires_grad_()
    ra = out.assignments.detach() * a2[..., None]  # (B, L, I, J)
    mass = ra.sum(2)
    mu = (ra[..., None] * votes).sum(2) / (mass + MASS_EPS)[..., None]
    var = (ra[..., None] * (votes - mu[:, :, None]) ** 2).sum(2) / (mass + MASS_EPS)[..., None] + VAR_FLOOR
    cost = (beta_v[:, None] + 0.5 * torch.log(var)) * mass[..., None]
    lam = inverse_temperatures("fan_in", 3, fan_in=fan_in(votes, GEOMETRY))[-1]
    a_out = torch.sigmoid(lam * (beta_a - cost.sum(-1)))
    torch.testing.assert_close(mu, out.poses.detach(), rtol=0, atol=1e-10)
    torch.autograd.backward([mu, a_out], [g_mu, g_a])
    assert a1.grad.abs().max() > 0
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-8, atol=1e-10)


def test_inputs_of_mixed_dtypes_raise_value_error():
    votes, act, beta_a, beta_v = random_problem(GEOMETRY, seed=23)
    with pytest.raises(ValueError, match="activations is torch.float32 but the votes are torch.float64"):
        em_routing(votes, act.float(), beta_a, beta_v, geometry=GEOMETRY)
    with pytest.raises(ValueError, match="beta_v is torch.bfloat16"):
        em_routing(votes, act, beta_a, beta_v.bfloat16(), geometry=GEOMETRY)


def _assert_same_gradients(fast, inputs, plain, plain_inputs):
    """The gradients of one random weighting of the outputs, routing's against plain autograd's, to 1e-8."""
    poses, acts = plain
    weights = torch.randn_like(acts), torch.randn_like(poses)
    fast_grads = torch.autograd.grad((fast.activations * weights[0]).sum() + (fast.poses * weights[1]).sum(), inputs)
    plain_grads = torch.autograd.grad((acts * weights[0]).sum() + (poses * weights[1]).sum(), plain_inputs)
    for name, a, b in zip(("votes", "activations", "beta_a", "beta_v"), fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("activation", ["paper", "centred", "offset"])
def test_dense_gradients_equal_plain_autograd(truncate, activation):
    """Values and gradients of the hand-written backward against plain torch autograd of Procedure 1,
    with and without ``truncate_gradient`` (the Gaussians each E-step reads as constants)."""
    votes, act, beta_a, beta_v = random_problem(None, types=3, num_patches=2, slots=6, dim=4, seed=13)
    lambdas = (0.1, 0.2, 0.3)
    inputs = [t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v)]
    fast = em_routing(*inputs, iterations=3, schedule=lambdas, activation=activation, truncate_gradient=truncate)
    plain_inputs = [t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v)]
    poses, acts = autograd_em_routing_dense(*plain_inputs, lambdas=lambdas, activation=activation, truncate=truncate)
    torch.testing.assert_close(fast.poses, poses, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.activations, acts, rtol=0, atol=1e-10)
    _assert_same_gradients(fast, inputs, (poses, acts), plain_inputs)


def test_truncated_gradient_differs_from_the_full_one_only_through_earlier_iterations():
    votes, act, beta_a, beta_v = random_problem(None, types=3, num_patches=2, slots=6, dim=4, seed=14)
    grads = {}
    for truncate in (False, True):
        v = votes.clone().requires_grad_()
        out = em_routing(v, act, beta_a, beta_v, iterations=3, schedule=(0.1, 0.2, 0.3), truncate_gradient=truncate)
        grads[truncate] = torch.autograd.grad(out.activations.sum(), v)[0]
    assert not torch.allclose(grads[False], grads[True])
    single = {}
    for truncate in (False, True):  # one iteration: no E-step, nothing to truncate
        inputs = [t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v)]
        out = em_routing(*inputs, iterations=1, schedule=(0.3,), truncate_gradient=truncate)
        single[truncate] = torch.autograd.grad(out.activations.sum() + out.poses.square().sum(), inputs)
    for a, b in zip(single[False], single[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.3, 0.0])
@pytest.mark.parametrize("activation", ["paper", "offset"])
def test_scaled_iteration_gradients_equal_plain_autograd_with_hooks(scale, activation):
    """``iteration_grad_scale`` against plain autograd whose E-steps scale the gradient of what they
    read by a hook: same values as the exact routing, gradients to 1e-8 (3 iterations: paths
    through two E-steps carry the scale squared)."""
    votes, act, beta_a, beta_v = random_problem(None, types=3, num_patches=2, slots=6, dim=4, seed=15)
    lambdas = (0.1, 0.2, 0.3)
    inputs = [t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v)]
    fast = em_routing(*inputs, iterations=3, schedule=lambdas, activation=activation, iteration_grad_scale=scale)
    exact = em_routing(votes, act, beta_a, beta_v, iterations=3, schedule=lambdas, activation=activation)
    torch.testing.assert_close(fast.poses, exact.poses, rtol=0, atol=0)
    torch.testing.assert_close(fast.activations, exact.activations, rtol=0, atol=0)
    plain_inputs = [t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v)]
    poses, acts = autograd_em_routing_dense(*plain_inputs, lambdas=lambdas, activation=activation, grad_scale=scale)
    _assert_same_gradients(fast, inputs, (poses, acts), plain_inputs)


def test_iteration_grad_scale_interpolates_between_truncated_and_exact():
    """With 2 iterations one E-step lies on every path: the gradient is truncated + scale x (exact - truncated);
    scale 0 is ``truncate_gradient``, 1 the exact gradient, bit for bit."""
    votes, act, beta_a, beta_v = random_problem(GEOMETRY, seed=16)

    def grads(**options):
        inputs = [t.clone().requires_grad_() for t in (votes, act, beta_a, beta_v)]
        out = em_routing(*inputs, iterations=2, geometry=GEOMETRY, activation="offset", **options)
        return torch.autograd.grad(out.activations.square().sum() + out.poses.square().sum(), inputs)

    exact, truncated = grads(), grads(truncate_gradient=True)
    for a, b in zip(grads(iteration_grad_scale=1.0), exact):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads(iteration_grad_scale=0.0), truncated):  # scale 0 runs as truncate_gradient
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, e, t in zip(grads(iteration_grad_scale=0.25), exact, truncated):
        assert not torch.allclose(e, t)
        torch.testing.assert_close(a, t + 0.25 * (e - t), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"iteration_grad_scale must be a number in \[0, 1\], got 1.5"):
        em_routing(votes, act, beta_a, beta_v, geometry=GEOMETRY, iteration_grad_scale=1.5)


def test_model_passes_iteration_grad_scale_to_every_routed_layer():
    """Through the layers' factored votes (the compiled kernels where they build): scale 0 is
    ``truncate_gradient``, and a scale between changes the gradient, not the outputs."""
    model = create_model("em_tiny", iterations=2, iteration_grad_scale=0.5)
    assert [layer.iteration_grad_scale for layer in model.routed_layers().values()] == [0.5, 0.5, 0.5]
    x = torch.rand(2, 1, 32, 32)
    results = {}
    for name, options in (("exact", {}), ("truncated", dict(truncate_gradient=True)), ("zero", dict(iteration_grad_scale=0.0)),
                          ("half", dict(iteration_grad_scale=0.5))):
        torch.manual_seed(0)
        model = create_model("em_tiny", iterations=2, **options)
        out = model(x)
        results[name] = (out.activations.detach(), torch.autograd.grad(out.activations.square().sum(), model.conv1.weight)[0])
    for name in ("truncated", "zero", "half"):
        torch.testing.assert_close(results[name][0], results["exact"][0], rtol=0, atol=0)
    torch.testing.assert_close(results["zero"][1], results["truncated"][1], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(results["half"][1], results["exact"][1])
    assert not torch.allclose(results["half"][1], results["truncated"][1])


def test_model_passes_e_step_temperature_to_each_routed_layer():
    """One temperature for every routed layer or three; through the layers' factored votes (the compiled
    kernels where they build) T = 1 is the default bit for bit, and T = 2 changes outputs and gradients."""
    model = create_model("em_tiny", iterations=2, e_step_temperature=(1.5, 2.0, 3.0))
    assert [layer.e_step_temperature for layer in model.routed_layers().values()] == [1.5, 2.0, 3.0]
    x = torch.rand(2, 1, 32, 32)
    results = {}
    for name, options in (("default", {}), ("one", dict(e_step_temperature=1.0)), ("two", dict(e_step_temperature=2.0))):
        torch.manual_seed(0)
        model = create_model("em_tiny", iterations=2, **options)
        out = model(x)
        results[name] = (out.activations.detach(), torch.autograd.grad(out.activations.square().sum(), model.conv1.weight)[0])
    for a, b in zip(results["one"], results["default"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(results["two"], results["default"]):
        assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="e_step_temperature must be a number or three numbers"):
        create_model("em_tiny", e_step_temperature=(1.0, 2.0))
    for bad in (0.0, -1.0, float("nan")):  # refused when the model is built, not at its first forward pass
        with pytest.raises(ValueError, match="e_step_temperature must be a finite number > 0"):
            create_model("em_tiny", e_step_temperature=(1.0, bad, 1.0))
    from capsnet.layers.matrix import ConvMatCaps

    with pytest.raises(ValueError, match="e_step_temperature must be a finite number > 0, got True"):
        ConvMatCaps(2, 2, e_step_temperature=True)


def test_em_routing_is_differentiable_once_and_says_so_where_it_is_not():
    # The hand-written backward is once_differentiable (em_routing's docstring); the test
    # reference autograd_em_routing_dense is the path for higher derivatives and torch.func.
    votes, act, beta_a, beta_v = random_problem(None, types=3, slots=4, dim=3, seed=23)
    v = votes.clone().requires_grad_()
    (g,) = torch.autograd.grad(em_routing(v, act, beta_a, beta_v).poses.square().sum(), v, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda x: em_routing(x, act, beta_a, beta_v).poses.sum())(votes)
    lambdas = inverse_temperatures("fan_in", 3, fan_in=fan_in(votes, None))
    assert torch.autograd.gradgradcheck(
        lambda x: autograd_em_routing_dense(x, act, beta_a, beta_v, lambdas=lambdas)[0], (v,), atol=1e-5, fast_mode=True
    )


OPTIONS = {
    "exact": {},
    "detach_intermediate": dict(detach_intermediate=True),
    "truncate_gradient": dict(truncate_gradient=True),
    "iteration_grad_scale": dict(iteration_grad_scale=0.3),
    "e_step_temperature": dict(e_step_temperature=2.5),
    "temperature_and_scale": dict(e_step_temperature=0.6, iteration_grad_scale=0.3),
    "temperature_and_truncate": dict(e_step_temperature=2.5, truncate_gradient=True),
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("activation", ["paper", "standardised", "offset"])
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("geometry", [None, GEOMETRY], ids=["dense", "conv"])
def test_gradients_equal_plain_autograd_end_to_end(geometry, iterations, activation, option):
    """Every input's gradient, from poses, activations and the returned ``R`` at once, against plain
    autograd of Procedure 1, float64, to 1e-8: dense and convolutional layers, 1-3 iterations, betas
    per capsule (conv) or per type (dense), a cost scale, each gradient option."""
    if geometry is None:
        problem = random_problem(None, types=3, num_patches=2, slots=6, dim=4, seed=31)
    else:
        problem = random_problem(GEOMETRY, seed=31, beta_shape=(GEOMETRY.num_patches, 3))
    lambdas = tuple(0.1 * (k + 1) for k in range(iterations))
    kwargs = dict(activation=activation, cost_scale=1.7)
    inputs = [t.clone().requires_grad_() for t in problem]
    fast = em_routing(*inputs, iterations=iterations, schedule=lambdas, geometry=geometry, **kwargs, **OPTIONS[option])
    plain_inputs = [t.clone().requires_grad_() for t in problem]
    reference = dict(detach=option == "detach_intermediate", truncate=OPTIONS[option].get("truncate_gradient", False),
                     grad_scale=OPTIONS[option].get("iteration_grad_scale", 1.0),
                     temperature=OPTIONS[option].get("e_step_temperature", 1.0))
    poses, acts, r = autograd_em_routing(*plain_inputs, lambdas=lambdas, geometry=geometry, **kwargs, **reference)
    for got, want in zip(fast, (poses, acts, r)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    gen = torch.Generator().manual_seed(32)
    weights = [torch.randn(t.shape, generator=gen, dtype=F64) for t in (poses, acts, r)]
    fast_grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(fast, weights)), inputs)
    plain_loss = sum((t * w).sum() for t, w in zip((poses, acts, r), weights) if t.requires_grad)
    plain_grads = torch.autograd.grad(plain_loss, plain_inputs, allow_unused=True)
    for name, a, b in zip(("votes", "activations", "beta_a", "beta_v"), fast_grads, plain_grads):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m, name=name: f"d/d{name}: {m}")

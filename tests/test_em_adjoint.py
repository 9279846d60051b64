"""The hand-written adjoints of EM routing's small steps (``routing/_em_adjoint.py``) against
autograd through the forward steps of ``routing/em_steps.py``, float64."""

from __future__ import annotations

import pytest
import torch

from capsnet.routing._em_adjoint import GaussianGrads, e_step_backward, m_step_backward
from capsnet.routing.em_steps import ACTIVATIONS, EMConfig, Gaussians, e_step_inputs, m_step

F64 = torch.float64
SLOTS, BATCH, PATCHES, TYPES, DIM = 7, 2, 3, 4, 16


def _config(activation: str, cost_scale: float = 1.0) -> EMConfig:
    return EMConfig((0.3,), activation, cost_scale, 5e-4, 1e-6, False, False, None, (SLOTS, BATCH, PATCHES, TYPES, DIM))


def _problem(seed: int, per_capsule: bool):
    """Votes, weights R a and the betas; one parent gets identical votes (variance 0 before the floor)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SLOTS, BATCH * PATCHES * TYPES, DIM, generator=gen, dtype=F64)
    x[:, 0] = x[0, 0]  # parent 0: every child votes the same, so q is 0 up to rounding and the clamp acts
    ra = torch.rand(SLOTS, BATCH * PATCHES * TYPES, generator=gen, dtype=F64)
    shape = (PATCHES, TYPES) if per_capsule else (TYPES,)
    beta_a = torch.randn(shape, generator=gen, dtype=F64)
    beta_v = torch.randn(shape, generator=gen, dtype=F64)
    centre = x.mean(0).view(BATCH, PATCHES, TYPES, DIM)
    return x, ra, beta_a, beta_v, centre


def _moments(x, ra):
    return (ra[..., None] * x).sum(0), (ra[..., None] * x.square()).sum(0), ra.sum(0)


def _betas(beta_a, beta_v):
    """As :func:`~capsnet.routing.em_steps.em_iteration` passes them to the M-step."""
    b_a = beta_a if beta_a.dim() == 1 else beta_a.unsqueeze(0)
    b_v = (beta_v if beta_v.dim() == 1 else beta_v.unsqueeze(0)).unsqueeze(-1)
    return b_a, b_v


@pytest.mark.parametrize("per_capsule", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("used", ["all", "mu", "logit", "var"])
def test_m_step_backward_equals_autograd(activation, per_capsule, used):
    cfg = _config(activation, cost_scale=1.7)
    x, ra, beta_a, beta_v, centre = _problem(seed=1, per_capsule=per_capsule)
    moments = [t.clone().requires_grad_() for t in _moments(x, ra)]
    ba, bv = beta_a.clone().requires_grad_(), beta_v.clone().requires_grad_()
    gaussians, _ = m_step(lambda r, it: moments, 0, ra.view(SLOTS, BATCH, PATCHES, TYPES), *_betas(ba, bv), 0.3, centre, cfg)
    gen = torch.Generator().manual_seed(2)
    grads = GaussianGrads(*(torch.randn(t.shape, generator=gen, dtype=F64) for t in gaussians))
    keep = {"all": GaussianGrads._fields, "mu": ("mu_c",), "logit": ("logit",), "var": ("var", "log_var")}[used]
    grads = GaussianGrads(*(g if name in keep else None for name, g in zip(GaussianGrads._fields, grads)))
    pairs = [(t, g) for t, g in zip(gaussians, grads) if g is not None]
    expected = torch.autograd.grad([t for t, _ in pairs], [*moments, ba, bv], [g for _, g in pairs], allow_unused=True)
    detached = Gaussians(*(t.detach() for t in gaussians))
    got = m_step_backward(grads, [t.detach() for t in moments], detached, beta_a, beta_v, 0.3, cfg, (True, True))
    for name, e, g in zip(("m1", "m2", "mass", "beta_a", "beta_v"), expected, got):
        e = torch.zeros_like(moments[0] if name in ("m1", "m2") else moments[2] if name == "mass" else beta_a) if e is None else e
        g = torch.zeros_like(e) if g is None else g
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d/d{name}: {m}")
    assert got.m1.abs().max() > 0


def test_m_step_backward_passes_nothing_through_the_clamp_below_zero():
    """Where rounding leaves ``q < 0`` the floor alone sets the variance, as ``clamp_min`` says."""
    cfg = _config("paper")
    x, ra, beta_a, beta_v, centre = _problem(seed=3, per_capsule=False)
    m1, m2, mass = _moments(x, ra)
    m2 = m2.clone()
    m2[1] -= 10.0  # q < 0 in every pose element of parent 1
    moments = [t.clone().requires_grad_() for t in (m1, m2, mass)]
    gaussians, _ = m_step(lambda r, it: moments, 0, ra.view(SLOTS, BATCH, PATCHES, TYPES), *_betas(beta_a, beta_v), 0.3, centre, cfg)
    assert torch.all(gaussians.var.view(-1, DIM)[1] == cfg.var_floor)
    grads = GaussianGrads(var=torch.ones_like(gaussians.var))
    expected = torch.autograd.grad(gaussians.var, moments[1], grads.var)[0]
    got = m_step_backward(grads, [t.detach() for t in moments], Gaussians(*(t.detach() for t in gaussians)), beta_a, beta_v,
                          0.3, cfg, (False, False))
    assert torch.all(got.m2[1] == 0)
    torch.testing.assert_close(got.m2, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_e_step_backward_equals_autograd(scale):
    """``u1, u2`` and ``const`` as :func:`~capsnet.routing.em_steps.e_step` builds them, differentiated."""
    gen = torch.Generator().manual_seed(4)
    shape = (BATCH, PATCHES, TYPES, DIM)
    mu = torch.randn(shape, generator=gen, dtype=F64).requires_grad_()
    var = (torch.rand(shape, generator=gen, dtype=F64) + 0.1).requires_grad_()
    log_var = torch.log(var.detach()).requires_grad_()  # a leaf of its own, as in the M-step's outputs
    logit = torch.randn(shape[:-1], generator=gen, dtype=F64).requires_grad_()
    gaussians = Gaussians(mu, var, log_var, logit)
    u1, u2, const = e_step_inputs(gaussians)
    # The E-step's log-likelihood at one vote x, from the inputs and directly (the expansion in X = V - c):
    x = torch.randn(shape, generator=gen, dtype=F64)
    expanded = const + (x.view(-1, DIM) * u1 + x.view(-1, DIM).square() * u2).sum(-1)
    direct = (-(x - mu).square() / (2 * var) - 0.5 * torch.log(2 * torch.pi * var)).sum(-1) + torch.nn.functional.logsigmoid(logit)
    torch.testing.assert_close(expanded, direct.reshape(-1), rtol=1e-10, atol=1e-10)
    g_u1, g_u2 = (torch.randn(u1.shape, generator=gen, dtype=F64) for _ in range(2))
    g_const = torch.randn(const.shape, generator=gen, dtype=F64)
    expected = torch.autograd.grad([u1, u2, const], list(gaussians), [g_u1, g_u2, g_const])
    got = e_step_backward(g_u1.view(-1, DIM), g_u2.view(-1, DIM), g_const.view(-1), Gaussians(*(t.detach() for t in gaussians)),
                          scale)
    for name, e, g in zip(Gaussians._fields, expected, got):
        torch.testing.assert_close(g.expand_as(e), scale * e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"d/d{name}: {m}")


def _compiled():
    from capsnet.ops import kernels

    steps = kernels.em_steps(torch.zeros(1))
    if steps is None:
        pytest.skip("the compiled kernels are off or cannot be built here")
    return steps


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("per_capsule", [False, True])
def test_compiled_m_step_and_its_adjoint_match_the_eager_code(activation, per_capsule):
    """``capsnet_m_step`` / ``capsnet_m_step_backward`` (em_votes.c) against the eager steps, float32:
    the Gaussians, the E-step inputs, and the moments' and betas' gradients from every kind of
    :class:`Upstream` (routing's outputs; the next E-step's inputs, scaled)."""
    from capsnet.routing._em_adjoint import Upstream, m_step_adjoint

    compiled = _compiled()
    cfg = _config(activation, cost_scale=1.7)
    x, ra, beta_a, beta_v, centre = (t.float() for t in _problem(seed=5, per_capsule=per_capsule))
    m1, m2, mass = _moments(x, ra)
    m2[0] -= 10.0  # q < 0: parent 0 sits on the floor
    moments = (m1, m2, mass)
    args = (lambda r, it: moments, 0, ra.view(SLOTS, BATCH, PATCHES, TYPES), *_betas(beta_a, beta_v), 0.3, centre, cfg)
    eager, none = m_step(*args)
    fused, inputs = m_step(*args, compiled=compiled)
    assert none is None
    assert torch.all(fused.var.view(-1, DIM)[0] == torch.tensor(cfg.var_floor, dtype=torch.float32))
    for name, e, g in zip(Gaussians._fields, eager, fused):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    for name, e, g in zip(("u1", "u2", "const"), e_step_inputs(eager), inputs):
        torch.testing.assert_close(g, e, rtol=2e-6, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    gen = torch.Generator().manual_seed(6)
    n = BATCH * PATCHES * TYPES
    ups = [
        Upstream(mu=torch.randn(eager.mu_c.shape, generator=gen), logit=torch.randn(eager.logit.shape, generator=gen)),
        Upstream(mu=torch.randn(eager.mu_c.shape, generator=gen)),
        Upstream(u1=torch.randn(n, DIM, generator=gen), u2=torch.randn(n, DIM, generator=gen), const=torch.randn(n, generator=gen),
                 scale=0.3),
    ]
    for up in ups:
        want = m_step_adjoint(up, moments, eager, beta_a, beta_v, 0.3, cfg, (True, True))
        got = m_step_adjoint(up, moments, eager, beta_a, beta_v, 0.3, cfg, (True, True), compiled)
        for name, e, g in zip(("m1", "m2", "mass", "beta_a", "beta_v"), want, got):
            if e is None:
                assert g is None, name
                continue
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_plain_float32_votes_route_the_same_with_the_compiled_m_step_as_without():
    """Plain (not factored) float32 votes: the vote reads are eager, the M-step compiled; values and
    gradients as with the kernels off, to float32 rounding, with a gradient on the returned ``R``."""
    from em_problems import random_problem

    from capsnet.ops import kernels
    from capsnet.routing.em import ConvGeometry, em_routing

    _compiled()
    geometry = ConvGeometry((5, 5), (3, 3), (1, 1), 2)
    problem = [t.float() for t in random_problem(geometry, seed=7, beta_shape=(geometry.num_patches, 3))]
    results = []
    try:
        for flag in (False, True):
            kernels.set_enabled(flag)
            inputs = [t.clone().requires_grad_() for t in problem]
            out = em_routing(*inputs, iterations=3, geometry=geometry, activation="offset", cost_scale=1.3)
            loss = out.poses.square().sum() + out.activations.sum() + (out.assignments * out.assignments.detach()).sum()
            results.append((out, torch.autograd.grad(loss, inputs)))
    finally:
        kernels.set_enabled(None)
    (eager, eager_grads), (fused, fused_grads) = results
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("votes", "activations", "beta_a", "beta_v"), fused_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d/d{name}: {m}")

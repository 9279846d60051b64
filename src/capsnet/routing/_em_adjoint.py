"""The backward pass of Procedure 1's small steps, written out: no replay, no autograd graph.

:class:`~capsnet.routing._em_engine.EMRoutingFunction` goes through the iterations in reverse
with these functions. Each is the exact adjoint of a forward step of
:mod:`capsnet.routing.em_steps` (checked against autograd in ``tests/test_em_adjoint.py`` and,
end to end, against the loop reference of Procedure 1), computed from what the forward pass
recorded (the moments each M-step read, its Gaussians, the E-steps' ``R``), so backward never
recomputes a forward step. Before session 15 the engine replayed every iteration under
autograd: the small ``(B, L, J, D)`` steps ran three times per training step (forward,
replay, autograd's backward); now twice, in about half the operations.

Axis letters as in :mod:`capsnet.routing.em_steps`; ``N = B L J``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .em_steps import EMConfig, Gaussians, activation_logit

__all__ = ["GaussianGrads", "MStepGrads", "Upstream", "e_step_backward", "m_step_adjoint", "m_step_backward"]


class GaussianGrads(NamedTuple):
    """Gradients of one iteration's :class:`~capsnet.routing.em_steps.Gaussians`; None where nothing
    reaches that part. ``log_var`` may be ``(B, L, J, 1)`` (the same for every pose element)."""

    mu_c: Optional[Tensor] = None
    var: Optional[Tensor] = None
    log_var: Optional[Tensor] = None
    logit: Optional[Tensor] = None


class MStepGrads(NamedTuple):
    """Gradients of what an M-step read and used: its moments ``(N, D), (N, D), (N,)`` and the betas."""

    m1: Tensor
    m2: Tensor
    mass: Tensor
    beta_a: Optional[Tensor]
    beta_v: Optional[Tensor]


def _add(x: Optional[Tensor], y: Tensor) -> Tensor:
    return y if x is None else x + y


def m_step_backward(grads: GaussianGrads, moments, gaussians: Gaussians, beta_a: Tensor, beta_v: Tensor, lam: float,
                    cfg: EMConfig, need_betas: tuple[bool, bool]) -> MStepGrads:
    """Adjoint of :func:`~capsnet.routing.em_steps.m_step` from its moments ``(m1, m2, mass)`` and
    the Gaussians it returned, given the gradients of those Gaussians.

    The forward steps, with ``m = mass + eps`` (``centre`` is a constant):
    ``mu = (m1 - eps c) / m``; ``q = (m2 - 2 mu m1 + mu^2 mass) / m``; ``var = max(q, 0) + floor``;
    ``cost_d = (beta_v + log(var_d) / 2) mass s``; ``logit = f(sum_d cost_d, beta_a)`` with ``f``
    the activation (:func:`~capsnet.routing.em_steps.activation_logit`, differentiated by
    autograd: it is ``(B, L, J)``, 16x smaller than the rest).
    """
    slots, batch, num_patches, types, dim = cfg.shape
    m1, m2, mass = (t.view(batch, num_patches, types, -1) for t in moments)  # mass: (B, L, J, 1)
    mu, var, log_var = gaussians.mu_c, gaussians.var, gaussians.log_var
    denom = mass + cfg.eps
    scale = cfg.cost_scale
    b_v = _b_v(beta_v)
    g_cost = None
    g_log_var = grads.log_var
    g_beta_a = g_beta_v = None
    if grads.logit is not None:
        g_cost, g_beta_a, g_beta_v = _activation_backward(grads.logit, log_var, mass, beta_a, beta_v, lam, cfg, need_betas)
        g_cost = g_cost.unsqueeze(-1)  # (B, L, J, 1): the same for every pose element
        g_log_var = _add(g_log_var, g_cost * (0.5 * scale) * mass)
    g_var = grads.var
    if g_log_var is not None:
        g_var = _add(g_var, g_log_var / var)
    g_mu = grads.mu_c
    g_m2 = g_m1 = g_denom = None
    if g_var is not None:
        q = (m2 - 2.0 * mu * m1 + mu.square() * mass) / denom  # as the forward step computed it
        g_q = torch.where(q >= 0, g_var, 0.0).div_(denom)  # clamp_min(0) passes the gradient where q >= 0
        g_m2 = g_q
        g_mu = _add(g_mu, g_q * (2.0 * (mu * mass - m1)))
        g_m1 = -2.0 * mu * g_q
        g_mass = (g_q * mu.square()).sum(-1, keepdim=True)
        g_denom = -(g_q * q).sum(-1, keepdim=True)
    else:
        g_mass = torch.zeros_like(mass)
    if g_mu is not None:
        g_mu_d = g_mu / denom
        g_m1 = _add(g_m1, g_mu_d)
        g_denom = _add(g_denom, -(g_mu_d * mu).sum(-1, keepdim=True))
    if g_denom is not None:
        g_mass = g_mass + g_denom
    if g_cost is not None:  # d cost / d mass = s sum_d (beta_v + log(var_d) / 2)
        g_mass = g_mass + g_cost * (scale * (dim * b_v + 0.5 * log_var.sum(-1, keepdim=True)))
    g_m1 = torch.zeros_like(mu) if g_m1 is None else g_m1
    g_m2 = torch.zeros_like(mu) if g_m2 is None else g_m2
    return MStepGrads(g_m1.reshape(-1, dim), g_m2.reshape(-1, dim), g_mass.reshape(-1), g_beta_a, g_beta_v)


def e_step_backward(g_u1: Tensor, g_u2: Tensor, g_const: Tensor, gaussians: Gaussians, scale: float,
                    inv_temperature: float = 1.0) -> GaussianGrads:
    """Adjoint of the E-step's inputs ``u1 = k 2 mu / (2 sigma^2)``, ``u2 = -k / (2 sigma^2)`` and
    ``const = k (-sum_d mu^2 / (2 sigma^2) - sum_d ln(2 pi sigma^2) / 2) + ln a`` (``ln a`` =
    logsigmoid(logit), ``k = inv_temperature``, 1 in Procedure 1), given their gradients, as
    gradients of the Gaussians they came from, times ``scale`` (``iteration_grad_scale``)."""
    mu, var = gaussians.mu_c, gaussians.var
    shape = mu.shape
    g_u1, g_u2, g_c = g_u1.view(shape), g_u2.view(shape), g_const.view(*shape[:-1], 1)
    if inv_temperature != 1.0:  # the terms of ln p scale; ln a's gradient (g_logit below) does not
        g_u1, g_u2, g_c = g_u1 * inv_temperature, g_u2 * inv_temperature, g_c * inv_temperature
    inv2var = 0.5 / var
    g_mu = (g_u1 - g_c * mu).mul_(2.0 * inv2var)
    g_inv = 2.0 * mu * g_u1 - g_u2 - g_c * mu.square()  # d/d(1 / (2 sigma^2))
    g_var = g_inv.mul_(inv2var / var).neg_()  # d(1 / (2 sigma^2)) / d sigma^2 = -1 / (2 sigma^4)
    g_log_var = -0.5 * g_c
    g_logit = g_const.view(shape[:-1]) * torch.sigmoid(-gaussians.logit)  # d logsigmoid(x) / dx = sigmoid(-x)
    grads = GaussianGrads(g_mu, g_var, g_log_var, g_logit)
    return grads if scale == 1.0 else GaussianGrads(*(g * scale for g in grads))


def _b_v(beta_v: Tensor) -> Tensor:
    """beta_v as the M-step broadcasts it: ``(J, 1)`` or ``(1, L, J, 1)``."""
    return (beta_v if beta_v.dim() == 1 else beta_v.unsqueeze(0)).unsqueeze(-1)


def _activation_backward(g_logit: Tensor, log_var: Tensor, mass: Tensor, beta_a: Tensor, beta_v: Tensor, lam: float,
                         cfg: EMConfig, need_betas: tuple[bool, bool]):
    """``(d/d cost (B, L, J), d/d beta_a or None, d/d beta_v or None)`` of the activation logit
    ``f(cost, beta_a)`` with ``cost = sum_d (beta_v + log(var_d) / 2) mass s``; ``mass`` ``(B, L, J, 1)``."""
    dim = log_var.shape[-1]
    with torch.enable_grad():
        cost = ((_b_v(beta_v) + 0.5 * log_var) * (mass * cfg.cost_scale)).sum(-1).requires_grad_()  # (B, L, J)
        b_a = beta_a.detach().requires_grad_(need_betas[0])
        logit = activation_logit(cost, b_a if b_a.dim() == 1 else b_a.unsqueeze(0), lam, cfg.activation)
        out = torch.autograd.grad(logit, [cost, b_a] if need_betas[0] else [cost], g_logit)
    g_cost = out[0]
    g_beta_v = None
    if need_betas[1]:  # d cost / d beta_v = D mass s
        g = g_cost * mass.squeeze(-1) * (cfg.cost_scale * dim)
        g_beta_v = g.sum((0, 1)) if beta_v.dim() == 1 else g.sum(0)
    return g_cost, (out[1] if need_betas[0] else None), g_beta_v


class Upstream(NamedTuple):
    """What reaches one iteration's Gaussians from later in the loop: for the last iteration,
    routing's outputs (``mu`` ``(B, L, J, D)`` and ``logit`` ``(B, L, J)``); for the others, the
    next E-step's inputs (``u1``, ``u2`` ``(N, D)``, ``const`` ``(N,)``, see
    :class:`~capsnet.routing.em_steps.EStepInputs`), whose gradient to the Gaussians is scaled by ``scale``."""

    mu: Optional[Tensor] = None
    logit: Optional[Tensor] = None
    u1: Optional[Tensor] = None
    u2: Optional[Tensor] = None
    const: Optional[Tensor] = None
    scale: float = 1.0

    def empty(self) -> bool:
        return all(t is None for t in self[:5])


def m_step_adjoint(up: Upstream, moments, gaussians: Gaussians, beta_a: Tensor, beta_v: Tensor, lam: float, cfg: EMConfig,
                   need_betas: tuple[bool, bool], compiled=None) -> MStepGrads:
    """The gradients of an M-step's moments and of the betas, from what reaches its Gaussians
    (:class:`Upstream`): :func:`e_step_backward` then :func:`m_step_backward`, or with ``compiled``
    (:class:`capsnet.ops.kernels.EMSteps`) both in one pass per parent."""
    if compiled is None:
        if up.u1 is not None:
            grads = e_step_backward(up.u1, up.u2, up.const, gaussians, up.scale, cfg.inv_temperature)
        else:
            grads = GaussianGrads(mu_c=up.mu, logit=up.logit)
        return m_step_backward(grads, moments, gaussians, beta_a, beta_v, lam, cfg, need_betas)
    slots, batch, num_patches, types, dim = cfg.shape
    m1, m2, mass = moments
    logit = gaussians.logit
    g_logit = up.logit
    if up.const is not None:  # d logsigmoid(x) / dx = sigmoid(-x)
        g_logit = _add(g_logit, up.const.view(logit.shape) * torch.sigmoid(-logit) * up.scale)
    g_cost = g_beta_a = g_beta_v = None
    if g_logit is not None:
        mass4 = mass.view(batch, num_patches, types, 1)
        g_cost, g_beta_a, g_beta_v = _activation_backward(g_logit, gaussians.log_var, mass4, beta_a, beta_v, lam, cfg, need_betas)
        g_cost = g_cost.reshape(-1)
    bv = _b_v(beta_v).squeeze(-1).expand(batch, num_patches, types).reshape(-1)
    sum_lv = gaussians.log_var.sum(-1).reshape(-1)
    g_mu = None if up.mu is None else up.mu.reshape(-1, dim)
    g_m1, g_m2, g_mass = compiled.m_step_backward(
        up.u1, up.u2, up.const, up.scale * cfg.inv_temperature, g_mu, g_cost, m1, m2, mass, gaussians.mu_c.reshape(-1, dim),
        gaussians.var.reshape(-1, dim), bv, sum_lv, cfg.eps, cfg.cost_scale,
    )
    return MStepGrads(g_m1, g_m2, g_mass, g_beta_a, g_beta_v)

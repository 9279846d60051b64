"""Procedure 1 of Hinton, Sabour & Frosst 2018 on the small tensors: schedules, M-step, E-step.

Each parent capsule ``j`` is a diagonal Gaussian over the 16 pose elements fitted
to the votes ``V_ij`` of its children, weighted by assignments ``R_ij`` times the
child activations ``a_i`` (M-step); the children are then re-assigned to the
parents that explain their votes best (E-step).

The votes themselves are never touched here. Every step reaches them through two reads
that the caller passes in (:mod:`capsnet.routing._em_engine` gives the chunked reads of
:class:`~capsnet.routing._em_votes.VoteReader`, or the compiled ones), on
the centred votes ``X = V - c`` (``c`` the unweighted mean vote per parent, ``N = B L J``):

* ``moments(r, it) -> (sum_i r_i X_i, sum_i r_i X_i^2, sum_i r_i)``, ``(I, N) -> 2 x (N, D), (N,)``:
  the M-step of iteration ``it``;
* ``quadratic(u1, u2, u0, it) -> u0 + sum_d X u1 + X^2 u2``, ``2 x (N, D), (N,) -> (I, N)``:
  the E-step that reads the Gaussians of iteration ``it``.

Axis letters: ``B`` batch, ``L`` patches (output positions), ``I`` child slots per
patch, ``J`` parent types, ``D`` pose elements (16), ``N = B L J`` all parents.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from .em_geometry import ConvGeometry, child_sum, log_child_normaliser, parent_counts, to_patches

__all__ = [
    "ACTIVATIONS",
    "COST_EPS",
    "LAMBDA_SCHEDULES",
    "MASS_EPS",
    "VAR_FLOOR",
    "EMConfig",
    "Gaussians",
    "VoteReads",
    "activation_argument",
    "activation_logit",
    "assign_backward",
    "EStepInputs",
    "e_step",
    "e_step_inputs",
    "em_iteration",
    "initial_assignments",
    "inverse_temperatures",
    "iteration_stats",
    "m_step",
    "routing_outputs",
]

#: Added to every variance sigma^2 (Google's released code uses this ``min_var``): bounds the
#: Gaussian precision, so ``log sigma`` and ``1 / sigma^2`` stay finite when all votes agree
#: exactly (constant or zero input), and keeps the expanded float32 E-step accurate.
VAR_FLOOR = 5e-4

#: Added to the mass ``sum_i R_ij a_i`` where it divides: a parent that no active child
#: votes for (all ``a_i = 0``) gets mean 0 instead of 0/0.
MASS_EPS = 1e-6

#: Named inverse-temperature schedules, see :func:`inverse_temperatures`.
LAMBDA_SCHEDULES = ("fan_in", "linear", "authors")

#: How the M-step turns the cost into the activation logit, see :func:`~capsnet.routing.em.em_routing`.
#: ``"paper"``: ``lambda (beta_a - sum_h cost^h)`` (Procedure 1); ``"centred"``:
#: ``lambda (beta_a + mean_k cost_k - cost_j)`` over the parents ``k`` of one position;
#: ``"standardised"``: ``lambda (beta_a + (mean_k cost_k - cost_j) / std_k cost_k)`` (gyang274's capsulesEM);
#: ``"offset"``: ``lambda (mean_k cost_k - cost_j) + beta_a``, centred with ``beta_a`` a plain logit offset.
ACTIVATIONS = ("paper", "centred", "standardised", "offset")

#: Added to the variance of the costs over a position's parents before its square root in the
#: ``"standardised"`` activation: finite logits and gradients when every parent costs the same.
COST_EPS = 1e-6

#: ``log(2 pi)``: the Gaussian normaliser in the E-step log-likelihood.
_LOG_2PI = math.log(2.0 * math.pi)


def inverse_temperatures(
    schedule: Union[str, Sequence[float]],
    iterations: int,
    *,
    final_lambda: Optional[float] = None,
    fan_in: Optional[float] = None,
) -> tuple[float, ...]:
    """The inverse temperature ``lambda`` of each routing iteration (the paper: "a fixed schedule").

    ``"fan_in"`` (default of :func:`~capsnet.routing.em.em_routing`): ``lambda_it = final_lambda (it + 1) / iterations
    / fan_in`` with ``final_lambda = 1/2`` and ``fan_in = D x (children per parent)``. The paper's
    cost ``sum_h (beta_v + log sigma^h) sum_i R_ij`` is a sum over ``D`` pose elements and over
    the mass of all children of a parent, so its spread grows with both: tens of nats in a
    ConvCaps layer but several hundred in the class layer at initialisation, which saturates
    every sigmoid at ``lambda = 1``. Dividing by the fan-in makes the logit the description-length
    difference per child and pose element, O(1) in every layer whatever its width, and the
    linear ramp anneals from soft to that (early iterations keep activations away from 0 and 1,
    so the first E-steps follow the Gaussians rather than a premature winner). ``1/2`` was the
    best of 1/4, 1/2, 1, 2, 3 in a 400-step MNIST run (B = C = D = 8, batch 32, Adam 3e-3):
    about 60% batch accuracy by step 300 against 45-49% for 1 and about 41% for 1/4, while 2
    and 3 saturate and stay at chance; the authors' schedule with IBM's scaling reached 43-55%.

    ``"linear"``: the ramp without the fan-in, ``lambda_it = final_lambda (it + 1) /
    iterations``, ``final_lambda = 1`` (lambda rising to 1). With the paper's cost and zero
    betas every capsule starts saturated and the run above stays at chance; kept for
    experiments that rescale the cost or the betas themselves.

    ``"authors"``: the formula the authors gave on OpenReview and both public codes use,
    ``lambda_it = final_lambda (1 - 0.95^(it + 1))``, ``final_lambda = 0.01``
    (5.0e-4, 9.75e-4, 1.43e-3 for three iterations). It only trains together with the IBM cost
    scaling (which :func:`~capsnet.routing.em.em_routing` applies with this schedule) and IBM's large negative
    beta_a initialisation (which the layers apply).

    A sequence of ``iterations`` non-negative floats is used as given.

    Shape:
        returns a tuple of ``iterations`` floats.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if isinstance(schedule, str):
        if schedule == "fan_in":
            if fan_in is None or not fan_in > 0:
                raise ValueError(f"schedule 'fan_in' needs fan_in > 0 (D x children per parent), got {fan_in}")
            final = (0.5 if final_lambda is None else float(final_lambda)) / fan_in
            lambdas = tuple(final * (it + 1) / iterations for it in range(iterations))
        elif schedule == "linear":
            final = 1.0 if final_lambda is None else float(final_lambda)
            lambdas = tuple(final * (it + 1) / iterations for it in range(iterations))
        elif schedule == "authors":
            final = 0.01 if final_lambda is None else float(final_lambda)
            lambdas = tuple(final * (1.0 - 0.95 ** (it + 1)) for it in range(iterations))
        else:
            raise ValueError(f"schedule must be one of {LAMBDA_SCHEDULES} or a sequence of floats, got {schedule!r}")
    else:
        if final_lambda is not None:
            raise ValueError("final_lambda only applies to a named schedule, not to an explicit sequence")
        lambdas = tuple(float(x) for x in schedule)
        if len(lambdas) != iterations:
            raise ValueError(f"schedule must hold one lambda per iteration ({iterations}), got {len(lambdas)}")
    if any(not math.isfinite(x) or x < 0 for x in lambdas):
        raise ValueError(f"inverse temperatures must be finite and >= 0, got {lambdas}")
    return lambdas


class EMConfig(NamedTuple):
    """The options of one :func:`~capsnet.routing.em.em_routing` call, checked, and the votes' shape."""

    lambdas: tuple[float, ...]
    activation: str
    cost_scale: float
    var_floor: float
    eps: float
    detach_intermediate: bool
    truncate_gradient: bool
    geometry: Optional[ConvGeometry]
    shape: tuple[int, int, int, int, int]  # (I, B, L, J, D)
    iteration_grad_scale: float = 1.0  # the gradient an E-step passes back to the previous iteration, scaled
    inv_temperature: float = 1.0  # 1 / e_step_temperature: what the E-steps multiply ln p_ij by


class Gaussians(NamedTuple):
    """What one M-step fits: the parent Gaussians and the activation logits.

    mu_c: ``(B, L, J, D)`` the means less the centre, ``mu - c``; var, log_var: ``(B, L, J, D)``
    ``sigma^2`` (floored) and its log; logit: ``(B, L, J)`` ``lambda (...)``, so ``a_j = sigmoid(logit)``.
    """

    mu_c: Tensor
    var: Tensor
    log_var: Tensor
    logit: Tensor


class VoteReads(NamedTuple):
    """The reads of the votes that the steps make (see the module docstring): ``moments(r, it)``
    for the M-step of iteration ``it``, ``quadratic(u1, u2, u0, it)`` for the E-step that reads
    the Gaussians of iteration ``it``; and, optionally, ``assignments(log_ap, it)``, that E-step's
    ``R`` from the result of its read (default: :func:`assignments`; the engine's forward pass
    passes one that records the ``R`` for the backward pass)."""

    moments: Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]]
    quadratic: Callable[[Tensor, Tensor, Tensor, int], Tensor]
    assignments: Optional[Callable[[Tensor, int], Tensor]] = None


def m_step(moments, it: int, ra: Tensor, b_a: Tensor, b_v: Tensor, lam: float, centre: Tensor, cfg: EMConfig,
           compiled=None) -> tuple[Gaussians, Optional[EStepInputs]]:
    """M-step of Procedure 1 on ``ra = R_ij a_i``: parent Gaussians ``(mu - c, sigma^2, ln sigma^2)``
    and activation logits, as :class:`Gaussians`; with ``compiled`` (:class:`capsnet.ops.kernels.EMSteps`)
    also the :class:`EStepInputs` of the E-step that will read them (None otherwise: the eager
    code computes them when that E-step runs)."""
    slots, batch, num_patches, types, dim = cfg.shape
    ra = ra.expand(slots, batch, num_patches, types)
    # sum_i R a (V - c), sum_i R a (V - c)^2: (N, D); and the mass sum_i R_ij a_i: (N,)
    m1, m2, mass = moments(ra.reshape(slots, -1), it)
    if compiled is not None:  # the same formulas as below, one pass per parent
        mu_c, var, u1, u2, quad = compiled.m_step(m1, m2, mass, centre.reshape(-1, dim), cfg.eps, cfg.var_floor)
        log_var = torch.log(var)
        sum_lv = log_var.sum(-1)  # (N,)
        # cost = sum_h (beta_v + ln sigma^h) mass s, summed before the product: (D beta_v + sum_h ln sigma^h) mass s.
        cost = (dim * b_v.squeeze(-1) + 0.5 * sum_lv.view(batch, num_patches, types)) * (mass.view(batch, num_patches, types) * cfg.cost_scale)
        logit = activation_logit(cost, b_a, lam, cfg.activation)
        const = (0.5 * (sum_lv + dim * _LOG_2PI)).add_(quad).neg_()
        if cfg.inv_temperature != 1.0:  # ln(a_j) + ln(p_ij) / T: every term of ln p scaled, ln a not
            u1, u2, const = u1 * cfg.inv_temperature, u2 * cfg.inv_temperature, const.mul_(cfg.inv_temperature)
        const = const.add_(F.logsigmoid(logit).reshape(-1))
        shape = (batch, num_patches, types, dim)
        return Gaussians(mu_c.view(shape), var.view(shape), log_var.view(shape), logit), EStepInputs(u1, u2, const)
    m1, m2 = m1.view(batch, num_patches, types, dim), m2.view(batch, num_patches, types, dim)
    mass = mass.view(batch, num_patches, types)
    denom = (mass + cfg.eps).unsqueeze(-1)
    # mu_j^h = sum_i R a V / (sum_i R a + eps), kept as mu - c (exactly that, hence the -eps c).
    mu_c = (m1 - cfg.eps * centre) / denom
    # (sigma_j^h)^2 = sum_i R a (V - mu)^2 / (sum_i R a + eps), expanded around c; the clamp only
    # removes float rounding below zero, the floor keeps log and 1 / sigma^2 finite.
    var = ((m2 - 2.0 * mu_c * m1 + mu_c.square() * mass.unsqueeze(-1)) / denom).clamp_min(0.0) + cfg.var_floor
    log_var = torch.log(var)
    # cost^h = (beta_v + log sigma^h) sum_i R_ij, with log sigma = log(sigma^2) / 2.
    cost = (b_v + 0.5 * log_var) * (mass.unsqueeze(-1) * cfg.cost_scale)
    return Gaussians(mu_c, var, log_var, activation_logit(cost.sum(-1), b_a, lam, cfg.activation)), None


def activation_logit(cost: Tensor, b_a: Tensor, lam: float, activation: str) -> Tensor:
    """The logit of ``a_j``, ``(B, L, J)``, from ``cost_j = sum_h cost^h``: ``lambda`` times
    :func:`activation_argument`, or for ``"offset"`` the centred argument times ``lambda`` plus
    ``beta_a`` (a logit offset of order 1 whatever ``lambda`` is)."""
    if activation == "offset":
        return lam * activation_argument(cost, 0.0, "centred") + b_a
    return lam * activation_argument(cost, b_a, activation)


def activation_argument(cost: Tensor, b_a: Union[Tensor, float], activation: str) -> Tensor:
    """What ``lambda`` multiplies in ``a_j = logistic(lambda (...))``, from ``cost_j = sum_h cost^h``.

    (``"offset"`` is ``"centred"`` with ``beta_a`` added after ``lambda``: :func:`m_step`.)

    ``"paper"`` (Procedure 1): ``beta_a - cost_j``. ``"centred"``: ``beta_a + mean_k cost_k - cost_j``
    over the ``J`` parents ``k`` of the same position (last axis), so 0.5 means "as well explained
    as the average parent here". ``"standardised"``: ``beta_a + (mean_k cost_k - cost_j) /
    sqrt(var_k cost_k + COST_EPS)``, so ``beta_a`` and ``lambda`` act on a quantity of order 1
    whatever the fan-in.

    Shape:
        cost: ``(B, L, J)``; b_a broadcasts to it; returns ``(B, L, J)``.
    """
    if activation == "paper":
        return b_a - cost
    mean = cost.mean(-1, keepdim=True)
    if activation == "centred":
        return b_a + (mean - cost)
    spread = torch.sqrt(torch.square(cost - mean).mean(-1, keepdim=True) + COST_EPS)
    return b_a + (mean - cost) / spread


class EStepInputs(NamedTuple):
    """What the E-step that reads one iteration's Gaussians multiplies the votes by, with
    ``k = 1 / e_step_temperature`` (1 in Procedure 1): ``u1 = k (mu - c) / sigma^2``,
    ``u2 = -k / (2 sigma^2)`` ``(N, D)`` and the per-parent terms
    ``const = k (-sum_h (mu - c)^2 / (2 sigma^2) - sum_h ln(2 pi sigma^2) / 2) + ln a`` ``(N,)``, so that
    ``ln a_j + k ln p_ij = const + sum_h X u1 + X^2 u2`` (the log-likelihood expanded in ``X = V - c``)."""

    u1: Tensor
    u2: Tensor
    const: Tensor


def e_step_inputs(gaussians: Gaussians, inv_temperature: float = 1.0) -> EStepInputs:
    """:class:`EStepInputs` from the Gaussians (the compiled M-step returns them itself), for
    ``ln(a_j) + ln(p_ij) / T`` with ``inv_temperature = 1 / T`` (1: Procedure 1's ``ln(a_j p_ij)``)."""
    mu_c, var, log_var, logit = gaussians
    dim = mu_c.shape[-1]
    inv2var = 0.5 / var  # (B, L, J, D)
    # The per-parent terms of ln p, then ln a_j: logsigmoid is the exact ln a_j, finite even where a_j underflows to 0.
    const = -(mu_c.square() * inv2var).sum(-1) - 0.5 * (log_var + _LOG_2PI).sum(-1)  # (B, L, J)
    u1, u2 = 2.0 * mu_c * inv2var, -inv2var
    if inv_temperature != 1.0:
        u1, u2, const = u1 * inv_temperature, u2 * inv_temperature, const * inv_temperature
    const = const + F.logsigmoid(logit)
    return EStepInputs(u1.reshape(-1, dim), u2.reshape(-1, dim), const.reshape(-1))


def e_step(reads: VoteReads, it: int, inputs: EStepInputs, a_in: Tensor, cfg: EMConfig) -> tuple[Tensor, Tensor]:
    """E-step of Procedure 1: ``R_ij = a_j p_ij / sum_k a_k p_ik`` over every parent ``k`` of child ``i``
    (``p^(1/T)`` for ``p`` at ``e_step_temperature`` ``T``),
    from the :class:`EStepInputs` of the Gaussians of iteration ``it`` (read by ``reads.quadratic``).

    Values only (routing's backward pass is :mod:`capsnet.routing._em_adjoint`). Returns ``R`` and
    ``R_ij a_i``, what the next M-step uses: both ``(I, B, L, J)``.
    """
    slots, batch, num_patches, types, dim = cfg.shape
    # ln p_ij = -sum_h (V - mu)^2 / (2 sigma^2) - sum_h ln(2 pi sigma^2) / 2, expanded in X = V - c:
    # (V - mu)^2 = X^2 - 2 X (mu - c) + (mu - c)^2, so one read of the votes gives every child's term.
    log_ap = reads.quadratic(*inputs, it).view(slots, batch, num_patches, types)  # ln a_j + ln p_ij / T
    r = reads.assignments(log_ap, it) if reads.assignments is not None else assignments(log_ap, cfg.geometry)
    return r, r * a_in


def assignments(log_ap: Tensor, geometry: Optional[ConvGeometry]) -> Tensor:
    """``R_ij = a_j p_ij / sum_k a_k p_ik`` from ``ln(a_j p_ij)``, over every parent ``k`` of child ``i``
    (Procedure 1, E-step): a softmax over all types in all patches that hold the child.

    The values only: :func:`assign_backward` gives their gradient (in one pass, without the steps below).

    Shape:
        log_ap: ``(I, B, L, J)``; returns ``(I, B, L, J)``.
    """
    # ln sum_j a_j p_ij within one patch, shifted by the largest term of each slot; the shifted
    # exponentials are reused for R, so the (I, B, L, J) tensor sees one exp, not two.
    shift = log_ap.amax(dim=-1, keepdim=True)  # (I, B, L, 1)
    e = torch.exp(log_ap - shift)  # (I, B, L, J), at most 1
    per_slot = torch.log(e.sum(-1)) + shift.squeeze(-1)  # (I, B, L); the sum is >= 1
    # ln sum_k a_k p_ik over every parent k of child i: all types in all patches that hold it.
    log_norm = log_child_normaliser(per_slot.permute(1, 2, 0), geometry).permute(2, 0, 1)
    return e.mul_(torch.exp(shift.squeeze(-1) - log_norm).unsqueeze(-1))


class _Assign(torch.autograd.Function):
    """``(R, R a_in)`` from ``R`` computed by :func:`assignments` (an input here), with the gradient
    of the softmax over each child's parents: :func:`assign_backward` as an autograd Function, for
    code that differentiates the E-step with autograd (the tests check it through this against
    autograd of a loop over children; routing's own backward calls :func:`assign_backward` directly).

    With ``G_ij = g_(Ra)ij a_i + g_Rij`` the gradient reaching ``ln(a_j p_ij)`` is
    ``R_ij (G_ij - sum_(k over parents of i) R_ik G_ik)``, and ``a_i`` gets ``sum_j g_(Ra)ij R_ij``:
    a few passes over ``(I, B, L, J)`` where autograd through :func:`assignments` takes about a dozen
    (an unused output's gradient arrives as None, not as zeros, and costs nothing). With
    ``detach`` (``detach_intermediate``) ``R`` is a constant and only ``a_i`` gets a gradient.
    """

    @staticmethod
    def forward(ctx, log_ap: Tensor, a_in: Tensor, r: Tensor, geometry: Optional[ConvGeometry], detach: bool):
        ctx.geometry, ctx.detach = geometry, detach
        ctx.set_materialize_grads(False)  # R is an output the caller mostly does not use: no zero gradient for it
        ctx.save_for_backward(r, a_in)
        ra = r * a_in
        if detach:
            ctx.mark_non_differentiable(r)
            return r, ra
        return r.view_as(r), ra

    @staticmethod
    @once_differentiable
    def backward(ctx, g_r: Optional[Tensor], g_ra: Optional[Tensor]):
        r, a_in = ctx.saved_tensors
        g_r = None if ctx.detach else g_r
        need_log = ctx.needs_input_grad[0] and not ctx.detach
        g_log, g_a = assign_backward(r, a_in, g_r, g_ra, ctx.geometry, need_log, ctx.needs_input_grad[1])
        return g_log, g_a, None, None, None


def assign_backward(r: Tensor, a_in: Tensor, g_r: Optional[Tensor], g_ra: Optional[Tensor], geometry: Optional[ConvGeometry],
                    need_log: bool, need_a: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Adjoint of ``(R, R a_in)`` (:class:`_Assign`): the gradients of ``ln(a_j p_ij)`` (None unless
    ``need_log``) and of ``a_in`` (None unless ``need_a``), given those of ``R`` and ``R a_in``
    (either may be None)."""
    # t_i = sum_j g_(Ra)ij R_ij is a_i's gradient, and a_i t_i + sum_j g_Rij R_ij = sum_j R_ij G_ij.
    t = _dot_last(g_ra, r) if g_ra is not None else None  # (I, B, L, 1)
    g_a = t if need_a else None
    if not need_log or (g_ra is None and g_r is None):
        return None, g_a
    s = t * a_in if t is not None else torch.zeros_like(a_in)
    if g_r is not None:
        s += _dot_last(g_r, r)
    if geometry is not None:  # summed over every slot that holds the same child
        per_child = child_sum(s.squeeze(-1).permute(1, 2, 0), geometry)
        s = to_patches(per_child, geometry).permute(2, 0, 1).unsqueeze(-1)
    # R_ij (G_ij - s_i) with G = g_(Ra) a + g_R.
    g = g_r.clone() if g_ra is None else g_ra * a_in
    if g_ra is not None and g_r is not None:
        g += g_r
    return g.sub_(s).mul_(r), g_a


def _dot_last(x: Tensor, y: Tensor) -> Tensor:
    """``sum_j x_j y_j`` over the last axis, kept: ``(..., J) -> (..., 1)``. A batched matrix
    product, several times faster on CPU than ``(x * y).sum(-1)`` over a short axis (J = 16)."""
    return torch.matmul(x.unsqueeze(-2), y.unsqueeze(-1)).squeeze(-1)


def em_iteration(reads: VoteReads, it: int, prev: Optional[tuple[Gaussians, Optional[EStepInputs]]], a_in: Tensor,
                 beta_a: Tensor, beta_v: Tensor, centre: Tensor, cfg: EMConfig,
                 compiled=None) -> tuple[Tensor, tuple[Gaussians, Optional[EStepInputs]]]:
    """Iteration ``it`` of Procedure 1 on the small tensors, values only: the E-step from the
    previous iteration's Gaussians ``prev`` (with their :class:`EStepInputs`, or None to compute
    them; the uniform init when ``it == 0``), then the M-step (compiled with ``compiled``, see :func:`m_step`).

    ``reads`` are the only vote reads. a_in ``(I, B, L, 1)``, beta ``(J,)`` or ``(L, J)``, centre
    ``(B, L, J, D)``; returns ``R (I, B, L, J)`` (or a broadcastable init) and what :func:`m_step` returns.
    """
    if it > 0:
        gaussians, inputs = prev
        r, ra = e_step(reads, it - 1, e_step_inputs(gaussians, cfg.inv_temperature) if inputs is None else inputs, a_in, cfg)
    else:
        r = initial_assignments(cfg, a_in)
        ra = r * a_in  # R_ij <- R_ij a_i
    b_a = beta_a if beta_a.dim() == 1 else beta_a.unsqueeze(0)  # (J,) or (1, L, J)
    b_v = (beta_v if beta_v.dim() == 1 else beta_v.unsqueeze(0)).unsqueeze(-1)  # (J, 1) or (1, L, J, 1)
    return r, m_step(reads.moments, it, ra, b_a, b_v, cfg.lambdas[it], centre, cfg, compiled)


def initial_assignments(cfg: EMConfig, like: Tensor) -> Tensor:
    """Procedure 1's initial ``R_ij = 1 / (number of parents of child i)``, ``(I, 1, L, 1)``
    (``(I, 1, 1, 1)`` broadcast over patches for fully connected layers), of ``like``'s dtype and device."""
    slots, batch, num_patches, types, dim = cfg.shape
    if cfg.geometry is None:
        return like.new_full((slots, 1, num_patches, 1), 1.0 / types)
    # ... = 1 / (J * number of patches that hold child i)
    counts = to_patches(parent_counts(cfg.geometry, like=like), cfg.geometry)  # (1, L, I)
    return rearrange(1.0 / (types * counts), "1 l i -> i 1 l 1")


def iteration_stats(r: Tensor, gaussians: Gaussians, cfg: EMConfig) -> dict[str, float]:
    """What one iteration did, for training logs (see ``stats`` of :func:`~capsnet.routing.em.em_routing`)."""
    var, logit = gaussians.var, gaussians.logit
    a = torch.sigmoid(logit)
    r = r.expand(cfg.shape[:4])
    types = cfg.shape[3]
    # R over the J parent types of each (child slot, patch), renormalised: 1 = uniform, 0 = one parent.
    p = r / r.sum(-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(r.dtype).tiny))).sum(-1)
    quantiles = torch.quantile(logit.detach().flatten().float()[:1 << 20], logit.new_tensor([0.05, 0.5, 0.95]).float())
    return {
        "a_mean": float(a.mean()),
        "a_std": float(a.std()) if a.numel() > 1 else 0.0,
        "var_floor_fraction": float((var < 1.01 * cfg.var_floor).float().mean()),
        "r_entropy": float(entropy.mean() / math.log(types)) if types > 1 else 0.0,
        "logit_p05": float(quantiles[0]),
        "logit_p50": float(quantiles[1]),
        "logit_p95": float(quantiles[2]),
    }


def routing_outputs(r: Tensor, gaussians: Gaussians, centre: Tensor, cfg: EMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """``mu (B, L, J, D)``, ``a (B, L, J)`` and ``R (I, B, L, J)`` of the last M-step."""
    return gaussians.mu_c + centre, torch.sigmoid(gaussians.logit), r.expand(cfg.shape[:4])

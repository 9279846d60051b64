"""EM routing between matrix capsules, Procedure 1 of Hinton, Sabour & Frosst 2018.

Each parent capsule ``j`` is a diagonal Gaussian over the 16 pose elements fitted
to the votes ``V_ij`` of its children, weighted by assignments ``R_ij`` times the
child activations ``a_i`` (M-step); the children are then re-assigned to the
parents that explain their votes best (E-step). :func:`em_routing` is the public
function; it checks its arguments and runs the modules below.

* :mod:`~capsnet.routing.em_geometry`: patch layout, which children a convolutional layer's
  patches hold (:class:`ConvGeometry`), the E-step normaliser over every parent of a child;
* :mod:`~capsnet.routing.em_steps`: Procedure 1 itself on the small tensors (the
  inverse-temperature schedules, the M-step, the activation, the E-step, one iteration);
* ``_em_votes`` and ``_em_engine``: the performance machinery. The votes are read in chunks
  (or by compiled kernels) and, as :class:`FactoredVotes`, never multiplied out whole; an
  autograd Function runs the iterations' hand-written adjoints (``_em_adjoint``) in the
  backward pass and builds the votes' gradient in one pass. See docs/performance.md, "EM routing".

Axis letters: ``B`` batch, ``L`` patches (output positions), ``I`` child slots per
patch, ``J`` parent types, ``D`` pose elements (16), ``T`` child types, ``H W``
child grid, ``N = B L J`` all parents.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

from einops import rearrange
from torch import Tensor

from ..precision import float32_under_autocast
from ._em_engine import EMRoutingFunction
from ._em_votes import FactoredVotes
from .em_geometry import ConvGeometry, child_sum, children_per_parent, log_child_normaliser, parent_counts, to_patches
from .em_steps import ACTIVATIONS, COST_EPS, LAMBDA_SCHEDULES, MASS_EPS, VAR_FLOOR, EMConfig, inverse_temperatures

__all__ = [
    "ConvGeometry",
    "EMRoutingResult",
    "FactoredVotes",
    "ACTIVATIONS",
    "COST_EPS",
    "LAMBDA_SCHEDULES",
    "MASS_EPS",
    "VAR_FLOOR",
    "child_sum",
    "children_per_parent",
    "em_routing",
    "inverse_temperatures",
    "log_child_normaliser",
    "parent_counts",
    "to_patches",
]


class EMRoutingResult(NamedTuple):
    """What EM routing produced, in patch layout.

    poses: ``(B, L, J, D)`` parent means ``mu_j`` of the last M-step (the parent pose matrices, flattened).
    activations: ``(B, L, J)`` parent activations ``a_j`` of the last M-step.
    assignments: ``(B, L, I, J)`` the ``R_ij`` used by the last M-step (before the ``R a`` product);
        summed over every parent of a child (all ``J`` in every patch that holds it) they give 1.
    """

    poses: Tensor
    activations: Tensor
    assignments: Tensor


def _check_beta(beta: Tensor, name: str, num_patches: int, types: int) -> None:
    if beta.shape not in ((types,), (num_patches, types)):
        raise ValueError(
            f"{name} must be ({types},) per parent type or ({num_patches}, {types}) per parent capsule, "
            f"got {tuple(beta.shape)}"
        )


def _factored_shape(votes: FactoredVotes, activations: Tensor, beta_a: Tensor) -> tuple[int, int, int, int, int]:
    """``(B, L, I, J, D)`` of factored votes, checked against the activations ``(B, L, I)`` and beta."""
    poses, transforms, offsets, matrices = votes
    if activations.dim() != 3:
        raise ValueError(f"activations must be (B, L, I), got shape {tuple(activations.shape)}")
    batch, num_patches, slots = activations.shape
    types = beta_a.shape[-1] if beta_a.dim() in (1, 2) else 0
    if poses.dim() != 3 or transforms.dim() != 3 or poses.shape[0] != transforms.shape[0] or poses.shape[2] != transforms.shape[1]:
        raise ValueError(
            f"factored votes need poses (G, R, P) and transforms (G, P, J D), got {tuple(poses.shape)} and {tuple(transforms.shape)}"
        )
    if types < 1 or transforms.shape[2] % types or slots % poses.shape[0] or poses.shape[0] * poses.shape[1] != slots * batch * num_patches:
        raise ValueError(
            f"factored votes {tuple(poses.shape)} @ {tuple(transforms.shape)} do not make (I, B, L, J, D) votes for "
            f"activations (B, L, I) = {tuple(activations.shape)} and J = {types} parent types "
            "(G groups must each hold I / G whole children)"
        )
    dim = transforms.shape[2] // types
    if offsets is not None and offsets.shape != (slots, dim):
        raise ValueError(f"offsets must be (I, D) = {(slots, dim)}, got {tuple(offsets.shape)}")
    if matrices is not None and (dim != 16 or poses.shape[2] != 16 or matrices.shape != (poses.shape[0], types, 4, 4)):
        raise ValueError(
            f"matrices must be (G, J, 4, 4) = {(poses.shape[0], types, 4, 4)} for 4x4 poses (P = D = 16), "
            f"got {tuple(matrices.shape)} with P = {poses.shape[2]}, D = {dim}"
        )
    return batch, num_patches, slots, types, dim


def check_e_step_temperature(value) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (``e_step_temperature``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"e_step_temperature must be a finite number > 0, got {value!r}")


@float32_under_autocast
def em_routing(
    votes: Union[Tensor, FactoredVotes],
    activations: Tensor,
    beta_a: Tensor,
    beta_v: Tensor,
    *,
    iterations: int = 3,
    geometry: Optional[ConvGeometry] = None,
    schedule: Union[str, Sequence[float]] = "fan_in",
    final_lambda: Optional[float] = None,
    activation: str = "paper",
    cost_scale: Optional[float] = None,
    var_floor: float = VAR_FLOOR,
    eps: float = MASS_EPS,
    detach_intermediate: bool = False,
    truncate_gradient: bool = False,
    iteration_grad_scale: float = 1.0,
    e_step_temperature: float = 1.0,
    stats: Optional[list] = None,
) -> EMRoutingResult:
    """Route child votes to parent Gaussians with EM (Procedure 1 of Hinton et al. 2018).

    ``R_ij`` starts uniform over each child's actual parents. Each iteration runs the M-step
    (``R_ij <- R_ij a_i``; weighted mean and variance per pose element; ``cost^h = (beta_v +
    log sigma^h) sum_i R_ij``; ``a_j = logistic(lambda (beta_a - sum_h cost^h))``) and, except
    after the last, the E-step (``R_ij = a_j p_ij / sum_k a_k p_ik`` over every parent ``k`` of
    child ``i``, in log space). Gradients flow through every iteration unless
    ``detach_intermediate``; nothing is kept between calls.

    The votes are read once per step in chunks (see :class:`~capsnet.routing._em_votes.VoteReader`):
    the E-step's Gaussian is expanded so no ``(B, L, I, J, D)`` temporary is built per
    iteration, and the votes' gradient is accumulated in one pass.

    Differentiable once. The backward pass is hand-written and marked ``once_differentiable``
    (:class:`~capsnet.routing._em_engine.EMRoutingFunction`), which rules out: second
    derivatives (``create_graph=True`` then a second backward raises ``RuntimeError: trying to
    differentiate twice`` where the gradient reaching routing carries a graph, and where it does
    not, as for a loss linear in routing's outputs, routing's share of the second derivative is
    silently missing, so ``gradgradcheck`` and Hessian-vector products are not available);
    ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ... raise ``RuntimeError``: the
    Function has no ``setup_context``); forward-mode AD (``NotImplementedError``: no ``jvp``).
    Unlike :func:`~capsnet.routing.dynamic_routing`, the library has no autograd path to fall
    back on; ``autograd_em_routing_dense`` in ``tests/em_reference.py`` is Procedure 1 in plain
    differentiable torch (fully connected layers: no geometry, ``beta`` ``(J,)``), the test
    reference for the gradients, and serves all three.

    Args:
        votes: ``V_ij`` in patch layout, ``(B, L, I, J, D)``. A view of an ``(I, B, L, J, D)``
            contiguous tensor is the fast layout (no copy is made then). Or
            :class:`FactoredVotes`, which the layers pass: the same votes as a product of
            factors, so no vote-sized tensor is kept for the backward pass.
        activations: child activations ``a_i`` in patch layout, ``(B, L, I)``, in ``[0, 1]``.
        beta_a, beta_v: the learned biases of Procedure 1, ``(J,)`` per parent type or
            ``(L, J)`` per parent capsule.
        iterations: EM iterations (the paper: 3).
        geometry: how child slots map to children in a convolutional layer; None when every
            ``(patch, slot)`` is its own child (fully connected layers).
        schedule, final_lambda: inverse temperature per iteration, see :func:`inverse_temperatures`;
            the default ``"fan_in"`` divides by ``D x`` :func:`children_per_parent`.
        activation: ``"paper"`` (default): ``a_j = logistic(lambda (beta_a - sum_h cost^h))`` as
            Procedure 1. ``"centred"``: ``logistic(lambda (beta_a + mean_k cost_k - cost_j))``, the
            cost centred over the ``J`` parents of each position (not in the paper): a parent
            no child votes for is no longer stuck at ``a >= 0.5`` while pose variances are below 1,
            and ``beta_a`` shifts activations relative to the position's average (what the model
            builders use, ``capsnet.models.em.TRAINABLE``; docs/em_training.md). ``"standardised"``: the cost standardised over the ``J`` parents of each
            position first, ``logistic(lambda (beta_a + (mean_k cost_k - cost_j) / std_k cost_k))``
            (gyang274's capsulesEM; not in the paper): the logit is of order 1 in every layer, so
            ``beta_a`` is a real offset and ``lambda`` a real temperature (use it with
            ``schedule="linear"`` and ``final_lambda`` of order 1, not with ``"fan_in"``).
            ``"offset"``: ``logistic(lambda (mean_k cost_k - cost_j) + beta_a)``, ``"centred"`` with
            ``beta_a`` a plain offset of the logit (not in the paper): under the small fan-in
            ``lambda``, ``beta_a`` inside ``lambda (...)`` moves a logit by ``lambda beta_a``, next to
            nothing, so the activations of parents that no child chooses cannot fall below the
            level the position's mean cost sets (docs/em_training.md, session 9).
        cost_scale: multiplies ``cost^h``. None: 1 (the paper's cost), except with
            ``schedule="authors"``, where it is IBM's ``100 / (I / J)`` (100 over children per
            parent), the scaling without which that schedule's small ``lambda`` does not train.
        var_floor: added to every variance, see :data:`VAR_FLOOR`.
        eps: added to the mass where it divides, see :data:`MASS_EPS`.
        detach_intermediate: stop gradients through the assignments of earlier iterations (a
            common shortcut; the authors "do not use stop gradient"). Default False.
        truncate_gradient: treat the Gaussians and activations that each E-step reads as
            constants, so the gradient runs through the last iteration only: its M-step, and its
            assignments ``R`` as functions of the votes and child activations (unlike
            ``detach_intermediate``, ``R`` keeps that gradient; with ``detach_intermediate`` as
            well it changes nothing). Unrolled EM multiplies the gradient by every iteration's
            Jacobian: on ``em_mnist`` at initialisation the full gradient is 1.1-2x the truncated
            one with 2 iterations and up to ~20x with 3. Truncation is a named option, not the
            paper's choice, and learned worse (docs/em_training.md). Default False.
        iteration_grad_scale: multiplies the gradient that each E-step passes back to the
            Gaussians and activations of the iteration before it (the forward values do not
            change): 1 (default) is the exact gradient of Procedure 1, 0 is ``truncate_gradient``,
            and in between the paths through ``k`` E-steps are weighted by the scale to the
            ``k``-th power. Not in the paper: on trained ``em_mnist`` checkpoints the path through
            earlier iterations makes the gradient of the lower layers 8-27x the truncated one and
            close to uncorrelated between batches (docs/em_training.md, session 12).
        e_step_temperature: ``T`` in the E-step ``R_ij = a_j p_ij^(1/T) / sum_k a_k p_ik^(1/T)``
            (computed as ``ln a_j + ln p_ij / T``): 1 (default) is Procedure 1; ``T > 1`` softens
            every E-step's ``R`` (the M-step's formulas do not change; what they return does,
            through ``R``), the tempered posterior of deterministic annealing. Not in
            the paper: with 3 iterations a trained ``em_mnist`` assigns nearly hard after the
            third (normalised entropy of R 0.21 in ConvCaps1, 2 iterations 0.54;
            docs/em_training.md, sessions 17-18).
        stats: a list to append one dict of floats per iteration to (the instruments for
            training logs): ``a_mean``, ``a_std`` of the parent activations; ``var_floor_fraction``,
            the fraction of parent variances within 1% of ``var_floor``; ``r_entropy``, the mean
            entropy of ``R`` over the ``J`` parent types of each child slot, over ``log J`` (1:
            uniform, 0: one parent); ``logit_p05/p50/p95``, percentiles of the logistic's
            argument (``lambda (...)``, plus ``beta_a`` for ``"offset"``). None (default): nothing is measured.

    Shape:
        votes: ``(B, L, I, J, D)``; activations: ``(B, L, I)``; beta_a, beta_v: ``(J,)`` or ``(L, J)``.
        Returns :class:`EMRoutingResult` with poses ``(B, L, J, D)``, activations ``(B, L, J)`` and
        assignments ``(B, L, I, J)``.
    """
    if isinstance(votes, FactoredVotes):
        batch, num_patches, slots, types, dim = _factored_shape(votes, activations, beta_a)
    else:
        if votes.dim() != 5:
            raise ValueError(f"votes must be (B, L, I, J, D), got shape {tuple(votes.shape)}")
        batch, num_patches, slots, types, dim = votes.shape
        if activations.shape != (batch, num_patches, slots):
            raise ValueError(
                f"activations must be (B, L, I) = {(batch, num_patches, slots)} to match votes {tuple(votes.shape)}, "
                f"got {tuple(activations.shape)}"
            )
    _check_beta(beta_a, "beta_a", num_patches, types)
    _check_beta(beta_v, "beta_v", num_patches, types)
    dtype = votes[0].dtype if isinstance(votes, FactoredVotes) else votes.dtype
    for name, t in (("activations", activations), ("beta_a", beta_a), ("beta_v", beta_v), *(
            (f"votes.{k}", getattr(votes, k)) for k in FactoredVotes._fields[1:] if isinstance(votes, FactoredVotes))):
        if t is not None and t.dtype != dtype:
            raise ValueError(f"{name} is {t.dtype} but the votes are {dtype}: pass one floating dtype (or run under autocast)")
    if geometry is not None:
        geometry.check()
        if (geometry.num_patches, geometry.slots) != (num_patches, slots):
            raise ValueError(
                f"geometry {geometry} gives L = {geometry.num_patches}, I = {geometry.slots}; "
                f"votes have L = {num_patches}, I = {slots}"
            )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if var_floor <= 0 or eps < 0:
        raise ValueError(f"var_floor must be > 0 and eps >= 0, got var_floor={var_floor} eps={eps}")
    if isinstance(iteration_grad_scale, bool) or not 0.0 <= iteration_grad_scale <= 1.0:
        raise ValueError(f"iteration_grad_scale must be a number in [0, 1], got {iteration_grad_scale!r}")
    check_e_step_temperature(e_step_temperature)
    # Scale 0 is truncation: said so, the backward skips the earlier iterations (and cuts a
    # non-finite gradient there instead of multiplying it by 0).
    truncate_gradient = truncate_gradient or iteration_grad_scale == 0
    fan_in = dim * children_per_parent(num_patches, slots, types, geometry)
    lambdas = inverse_temperatures(schedule, iterations, final_lambda=final_lambda, fan_in=fan_in)
    if cost_scale is None:
        cost_scale = 100.0 * types / slots if schedule == "authors" else 1.0
    cfg = EMConfig(lambdas, activation, float(cost_scale), var_floor, eps, detach_intermediate, truncate_gradient, geometry,
                  (slots, batch, num_patches, types, dim), float(iteration_grad_scale), 1.0 / float(e_step_temperature))  # fmt: skip
    a_in = rearrange(activations, "b l i -> i b l 1")
    if isinstance(votes, FactoredVotes):
        mu, a_out, r = EMRoutingFunction.apply(*votes, a_in, beta_a, beta_v, cfg, stats)
    else:
        v = votes.permute(2, 0, 1, 3, 4).contiguous()  # (I, B, L, J, D): children outermost
        mu, a_out, r = EMRoutingFunction.apply(v, None, None, None, a_in, beta_a, beta_v, cfg, stats)
    return EMRoutingResult(poses=mu, activations=a_out, assignments=rearrange(r, "i b l j -> b l i j"))

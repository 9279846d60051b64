"""Routing-by-agreement, Procedure 1 of Sabour, Frosst & Hinton 2017.

Two implementations of one function:

* :func:`_dynamic_routing_autograd`: the procedure in plain tensor ops, differentiated
  by autograd. The obvious reference; it also serves higher-order gradients and
  ``torch.func`` transforms.
* :class:`_DynamicRouting`, used by :func:`dynamic_routing` for first-order gradients:
  the same forward without autograd, and a hand-written backward
  (:func:`_routing_vjp`) that walks the iterations in reverse over small ``(B, J, I)``
  and ``(B, J, D)`` tensors and collects every contribution to the gradient of the
  votes as ``K = 2r - 1`` outer products per ``(b, j)``, written in one batched matmul.
  Autograd instead makes ``2r - 1`` full-size ``(B, J, I, D)`` gradients (through slow
  matrix-vector backward kernels) and sums them. ``tests/test_routing_fast.py`` holds
  the two to 1e-10.
"""

from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._compat import functorch_transforms_active, softmax_backward
from ..functional import squash
from ..precision import float32_under_autocast
from ..validation import check_votes

__all__ = ["RoutingResult", "dynamic_routing"]


class RoutingResult(NamedTuple):
    """What routing produced; small enough to return from every forward.

    poses: ``(B, J, D)`` parent capsules ``v_j`` after the last iteration.
    coupling: ``(B, I, J)`` coupling coefficients ``c_ij`` used for the last ``s_j`` (sum to 1 over J).
    logits: ``(B, I, J)`` routing logits ``b_ij`` that gave ``coupling`` (softmax of them over J;
        Procedure 1's final agreement update changes nothing downstream and is skipped).
    """

    poses: Tensor
    coupling: Tensor
    logits: Tensor


@float32_under_autocast
def dynamic_routing(
    votes: Tensor,
    iterations: int = 3,
    *,
    detach_intermediate: bool = False,
    leaky: bool = False,
    eps: float = 0.0,
) -> RoutingResult:
    """Route child votes ``u_hat_{j|i}`` to parents by agreement (Procedure 1).

    Logits ``b_ij`` start at zero for every sample on every call; nothing is kept
    between calls or shared across the batch. Each iteration: ``c_i = softmax(b_i)``
    over parents (Eq. 3), ``s_j = sum_i c_ij u_hat_{j|i}`` (Eq. 2), ``v_j = squash(s_j)``
    (Eq. 1), ``b_ij += u_hat_{j|i} . v_j``.

    First-order gradients come from a hand-written backward equal to autograd through
    the procedure (to rounding); ``create_graph=True`` and ``torch.func`` transforms get
    autograd through the procedure itself.

    Args:
        votes: predictions ``u_hat_{j|i}``, ``(B, I, J, D)``. A view of a ``(B, J, I, D)``
            contiguous tensor is the fast layout (no copy is made then).
        iterations: number of routing iterations ``r`` (>= 1).
        detach_intermediate: if True, gradients reach the votes only through the last
            iteration (a common implementation choice). The paper's official code lets
            gradients flow through every iteration: default False.
        leaky: add an "orphan" parent with a constant zero logit to the softmax
            (leaky routing of the official code, used there for CIFAR-10); off by default.
        eps: passed to :func:`~capsnet.functional.squash`; 0 (default) is Eq. 1 exactly.

    Shape:
        votes: ``(B, I, J, D)``; returns poses ``(B, J, D)``, coupling and logits ``(B, I, J)``.
    """
    _check_routing_args(votes, iterations)
    if _functorch_active():
        return _dynamic_routing_autograd(votes, iterations, detach_intermediate=detach_intermediate, leaky=leaky, eps=eps)
    # (B, J, I, D): parents outermost so every contraction is a batched matmul over
    # contiguous memory; this is a no-op when the caller already built that layout.
    u_hat = votes.transpose(1, 2).contiguous()
    if torch.is_grad_enabled() and u_hat.requires_grad:
        poses, coupling, logits = _DynamicRouting.apply(u_hat, iterations, detach_intermediate, leaky, eps)
    else:
        poses, coupling, logits, _ = _route(u_hat, iterations, leaky=leaky, eps=eps)
    return RoutingResult(poses=poses, coupling=coupling.transpose(1, 2), logits=logits.transpose(1, 2))


def _check_routing_args(votes: Tensor, iterations: int) -> None:
    check_votes(votes)
    _check_iterations(iterations)


def _check_iterations(iterations: int) -> None:
    try:
        count = operator.index(iterations)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        count = None
    if isinstance(iterations, bool) or count is None or count < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")


def _functorch_active() -> bool:
    """Inside ``torch.func.grad`` / ``vmap`` / ...: the hand-written backward has no rules there."""
    return functorch_transforms_active()


def _dynamic_routing_autograd(
    votes: Tensor,
    iterations: int = 3,
    *,
    detach_intermediate: bool = False,
    leaky: bool = False,
    eps: float = 0.0,
) -> RoutingResult:
    """Reference path: Procedure 1 in plain tensor ops, gradients by autograd (same contract as :func:`dynamic_routing`)."""
    _check_routing_args(votes, iterations)
    batch, n_in, n_out, _ = votes.shape
    u_hat = votes.transpose(1, 2).contiguous()  # (B, J, I, D)
    u_hat_detached = u_hat.detach() if detach_intermediate else u_hat
    logits = votes.new_zeros(batch, n_out, n_in)  # b_ij in (B, J, I) layout
    for it in range(iterations):
        last = it == iterations - 1
        u = u_hat if last else u_hat_detached
        coupling = _coupling(logits, leaky)
        s = torch.matmul(coupling.unsqueeze(2), u).squeeze(2)  # Eq. 2: (B, J, D)
        v = squash(s, dim=-1, eps=eps)  # Eq. 1
        if not last:
            agreement = torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)  # (B, J, I): u_hat . v
            logits = logits + agreement
    return RoutingResult(poses=v, coupling=coupling.transpose(1, 2), logits=logits.transpose(1, 2))


def _coupling(logits: Tensor, leaky: bool) -> Tensor:
    """Eq. 3, softmax over the parents ``J`` of ``(B, J, I)`` logits; ``leaky`` adds an orphan parent with logit 0."""
    if not leaky:
        return torch.softmax(logits, dim=1)
    batch, _, n_in = logits.shape
    padded = torch.cat([logits.new_zeros(batch, 1, n_in), logits], dim=1)
    return torch.softmax(padded, dim=1)[:, 1:].contiguous()  # the orphan's share is dropped


class _Step(NamedTuple):
    """What one routing iteration leaves for the backward pass (all small)."""

    coupling: Tensor  # c, (B, J, I)
    s: Tensor  # (B, J, D), before squash
    v: Tensor  # (B, J, D), after squash


def _route(u_hat: Tensor, iterations: int, *, leaky: bool, eps: float, keep: bool = False):
    """Forward of Procedure 1 on contiguous ``(B, J, I, D)`` votes, without autograd.

    Returns ``(poses (B, J, D), coupling (B, J, I), logits (B, J, I), steps)`` where
    ``steps`` lists each iteration's :class:`_Step` when ``keep`` (else empty).
    """
    batch, n_out, n_in, dim = u_hat.shape
    flat = u_hat.view(batch * n_out, n_in, dim)  # one (I, D) matrix per (b, j)
    # The agreement reads the same rows as a (D, I) matrix times a row vector on the
    # left: that orientation is the fast BLAS kernel (about 2.5x the (I, D) @ (D, 1) one).
    flat_t = flat.transpose(1, 2)
    steps: list[_Step] = []
    logits: Optional[Tensor] = None
    for it in range(iterations):
        if logits is None:
            # b = 0: every coupling is 1/J (1/(J+1) with the orphan), Eq. 2 is a plain sum.
            uniform = 1.0 / (n_out + 1 if leaky else n_out)
            coupling = u_hat.new_full((batch, n_out, n_in), uniform)
            s = flat.sum(dim=1).mul_(uniform).view(batch, n_out, dim)
        else:
            coupling = _coupling(logits, leaky)  # Eq. 3
            s = torch.bmm(coupling.view(-1, 1, n_in), flat).view(batch, n_out, dim)  # Eq. 2
        v = squash(s, dim=-1, eps=eps)  # Eq. 1
        if keep:
            steps.append(_Step(coupling, s, v))
        if it < iterations - 1:
            agreement = torch.bmm(v.view(-1, 1, dim), flat_t).view(batch, n_out, n_in)  # u_hat . v
            logits = agreement if logits is None else logits.add_(agreement)  # logits is ours, not saved
    if logits is None:
        logits = u_hat.new_zeros(batch, n_out, n_in)
    return v, coupling, logits, steps


def _squash_vjp(s: Tensor, grad_v: Tensor, eps: float) -> Tensor:
    """``grad_v . dv/ds`` for ``v = squash(s)``, by autograd on the small ``(B, J, D)`` tensor."""
    with torch.enable_grad():
        s = s.detach().requires_grad_(True)
        v = squash(s, dim=-1, eps=eps)
    (grad_s,) = torch.autograd.grad(v, s, grad_v)
    return grad_s


def _routing_vjp(
    u_hat: Tensor,
    steps: list[_Step],
    grad_poses: Optional[Tensor],
    grad_coupling: Optional[Tensor],
    grad_logits: Optional[Tensor],
    *,
    detach_intermediate: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Backward of :func:`_route`: factors ``(A, M)`` of the gradient of the votes.

    ``grad_u_hat[b, j] = A[b, j]^T @ M[b, j]`` with ``A`` ``(B, J, K, I)`` and ``M``
    ``(B, J, K, D)``: iteration ``t`` adds ``c_t (x) grad_s_t`` (through Eq. 2) and, before
    the last, ``grad_b_{t+1} (x) v_t`` (through the agreement ``u_hat . v_t``, as
    ``b_{t+1} = b_t + u_hat . v_t``). Callers contract the factors in the layout they
    need; nothing of size ``(B, J, I, D)`` is built here. ``steps`` are those of
    :func:`_route` (only the last one with ``detach_intermediate``); the gradients of
    the ``(B, J, I)`` outputs, in that layout, may be None.
    """
    batch, n_out, n_in, dim = u_hat.shape
    flat = u_hat.view(batch * n_out, n_in, dim)
    last = len(steps) - 1
    grad_v = grad_poses if grad_poses is not None else torch.zeros_like(steps[last].v)
    if detach_intermediate:
        # Only the last Eq. 2 sees the attached votes, and its coupling is a constant.
        grad_s = _squash_vjp(steps[last].s, grad_v, eps)
        return steps[last].coupling.unsqueeze(2), grad_s.unsqueeze(2)
    # The factors go straight into their slots (2 per iteration, 1 for the last): no list of
    # (B, J, I) tensors stacked at the end, which made the backward's peak of memory 12-30 MB higher.
    n_terms = 2 * last + 1
    left = u_hat.new_empty(batch, n_out, n_terms, n_in)
    right = u_hat.new_empty(batch, n_out, n_terms, dim)
    k = 0
    grad_b = grad_logits  # d loss / d b_{t+1} while at iteration t
    for t in range(last, -1, -1):
        step = steps[t]
        if t < last:
            # grad_b is set here: every iteration t > 0 passes through Eq. 3 below.
            grad_v = torch.bmm(grad_b.reshape(-1, 1, n_in), flat).view(batch, n_out, dim)
            right[:, :, k] = step.v
            k += 1
        grad_s = _squash_vjp(step.s, grad_v, eps)  # Eq. 1
        left[:, :, k] = step.coupling  # Eq. 2
        right[:, :, k] = grad_s
        k += 1
        if t == 0:
            break  # c_0 comes from b_0 = 0, a constant
        grad_c = torch.bmm(grad_s.view(-1, 1, dim), flat.transpose(1, 2)).view(batch, n_out, n_in)
        if t == last and grad_coupling is not None:
            grad_c = grad_c + grad_coupling
        # Eq. 3 backward, c * (grad_c - sum_j c grad_c) over J; with the orphan the same
        # formula holds over the real parents because the orphan's logit is a constant.
        grad_logit = softmax_backward(grad_c, step.coupling, 1)
        # grad_b of iteration t - 1 is a factor too (with v_{t-1}): made in its slot.
        slot = left[:, :, k]
        if grad_b is None:
            slot.copy_(grad_logit)
        else:
            torch.add(grad_b, grad_logit, out=slot)
        grad_b = slot
        del grad_c, grad_logit
    return left, right


def _outputs_differentiable(iterations: int, detach_intermediate: bool) -> bool:
    """Whether coupling and logits depend on the votes through autograd (b_0 = 0 is a constant)."""
    return iterations > 1 and not detach_intermediate


def _present(outputs, grads) -> tuple[list[Tensor], list[Tensor]]:
    """The (output, gradient) pairs that carry a gradient, for ``torch.autograd.grad``."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
    return [o for o, _ in pairs], [g for _, g in pairs]


class _DynamicRouting(torch.autograd.Function):
    """Procedure 1 on ``(B, J, I, D)`` votes with the backward of :func:`_routing_vjp`."""

    @staticmethod
    def forward(ctx, u_hat: Tensor, iterations: int, detach_intermediate: bool, leaky: bool, eps: float):
        poses, coupling, logits, steps = _route(u_hat, iterations, leaky=leaky, eps=eps, keep=True)
        if detach_intermediate:
            steps = steps[-1:]
        ctx.options = dict(iterations=iterations, detach_intermediate=detach_intermediate, leaky=leaky, eps=eps)
        ctx.n_steps = len(steps)
        ctx.save_for_backward(u_hat, *(x for step in steps for x in step))
        if not _outputs_differentiable(iterations, detach_intermediate):
            ctx.mark_non_differentiable(coupling, logits)
        ctx.set_materialize_grads(False)
        return poses, coupling, logits

    @staticmethod
    def backward(ctx, grad_poses, grad_coupling, grad_logits):
        u_hat, *flat_steps = ctx.saved_tensors
        options = ctx.options
        grads = (grad_poses, grad_coupling, grad_logits)
        if torch.is_grad_enabled():
            # create_graph=True: a gradient that is itself differentiable, from autograd
            # through the reference path (u_hat, a saved input, keeps its history).
            ref = _dynamic_routing_autograd(u_hat.transpose(1, 2), **options)
            outputs, present = _present((ref.poses, ref.coupling.transpose(1, 2), ref.logits.transpose(1, 2)), grads)
            (grad_u,) = torch.autograd.grad(outputs, u_hat, present, create_graph=True, allow_unused=True)
            return grad_u, None, None, None, None
        steps = [_Step(*flat_steps[3 * k : 3 * k + 3]) for k in range(ctx.n_steps)]
        left, right = _routing_vjp(
            u_hat, steps, *grads, detach_intermediate=options["detach_intermediate"], eps=options["eps"]
        )
        batch, n_out, n_in, dim = u_hat.shape
        n_terms = left.shape[2]
        grad_u = torch.bmm(
            left.view(-1, n_terms, n_in).transpose(1, 2), right.view(-1, n_terms, dim)
        )  # (B J, I, K) @ (B J, K, D): one write of the full-size gradient
        return grad_u.view(batch, n_out, n_in, dim), None, None, None, None

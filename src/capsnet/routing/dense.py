"""DigitCaps as a function: every child capsule votes for every parent (Eq. 2), then routing by agreement.

:func:`dense_routing` computes ``dynamic_routing(dense_votes(u, W, bias).transpose(1, 2))``
(Sabour, Frosst & Hinton 2017: the votes of Eq. 2, then Procedure 1), fused: the votes are
made per child as one matmul over the batch, slab by slab, and one hand-written backward
(:class:`_DenseRouting`) returns the gradients of ``u``, ``W`` and the bias without
autograd's full-size intermediate gradients. :class:`~capsnet.layers.DenseCaps` is the
module over it. ``tests/test_routing_fast.py`` holds the fused path to the reference path
(``fused=False``) to 1e-10 in float64.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from .. import _slabs as slab_sizes
from ..ops import kernels
from ..precision import float32_under_autocast
from ..validation import check_dtype
from .dynamic import (
    RoutingResult,
    _check_iterations,
    _dynamic_routing_autograd,
    _functorch_active,
    _outputs_differentiable,
    _present,
    _route,
    _routing_vjp,
    _Step,
)

__all__ = ["dense_routing", "dense_votes"]


def dense_votes(u: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Predictions ``u_hat_{j|i} = W_ij u_i`` (Eq. 2, Sabour et al. 2017), plus ``bias_j`` if given, as one ``einsum``.

    The weights carry no batch axis. This is the readable form of what :func:`dense_routing`
    fuses; the ``(B, J, I, D)`` layout is the one routing reads (``.transpose(1, 2)`` gives
    :func:`~capsnet.routing.dynamic_routing`'s ``(B, I, J, D)``).

    Shape:
        u: ``(B, I, E)``; weight: ``(J, I, D, E)``; bias: ``(J, D)``, ``(J, 1, D)`` or None;
        returns ``(B, J, I, D)``.
    """
    bias = _check_dense_args(u, weight, bias)
    u_hat = torch.einsum("jide,bie->bjid", weight, u)
    if bias is not None:
        u_hat = u_hat + bias
    return u_hat


@float32_under_autocast
def dense_routing(
    u: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    iterations: int = 3,
    detach_intermediate: bool = False,
    leaky: bool = False,
    eps: float = 0.0,
    fused: bool = True,
) -> RoutingResult:
    """Every child capsule ``u_i`` votes for every parent through its own ``W_ij``; the parents come from routing by agreement.

    Votes ``u_hat_{j|i} = W_ij u_i`` (+ ``bias_j``, as the official code; the paper has
    none), then Procedure 1 of Sabour et al. 2017 from logits ``b_ij = 0``: each iteration
    ``c_i = softmax(b_i)`` over parents (Eq. 3), ``s_j = sum_i c_ij u_hat_{j|i}`` (Eq. 2),
    ``v_j = squash(s_j)`` (Eq. 1), ``b_ij += u_hat_{j|i} . v_j``. Equal (to rounding) to
    ``dynamic_routing(dense_votes(u, weight, bias).transpose(1, 2), iterations, ...)``.

    The fused path never holds more than the votes at full size, forward or backward.
    Second derivatives (``create_graph=True``) and ``torch.func`` transforms work: they go
    through the reference path by themselves. What the fused backward rules out is
    forward-mode AD with dual tensors (``torch.autograd.forward_ad``) when an input requires
    a gradient: pass ``fused=False`` for that (``torch.func.jvp`` needs nothing).

    Args:
        u: child capsules ``u_i``.
        weight: the matrices ``W_ij``; no batch axis.
        bias: optional per-parent bias added to every vote, ``(J, D)`` or ``(J, 1, D)``.
        iterations, detach_intermediate, leaky, eps: as :func:`~capsnet.routing.dynamic_routing`
            (3, False, False, 0: the paper's procedure).
        fused: True (default), the fused path; False, the reference path: the votes of
            :func:`dense_votes`, then Procedure 1 in plain tensor ops differentiated by
            autograd (every autograd feature; ``2r - 1`` full-size intermediate gradients).
            The same results to rounding, so a speed and memory choice only.

    Shape:
        u: ``(B, I, E)``; weight: ``(J, I, D, E)``; returns a :class:`~capsnet.routing.RoutingResult`
        with poses ``(B, J, D)``, coupling and logits ``(B, I, J)``.
    """
    bias = _check_dense_args(u, weight, bias)
    _check_iterations(iterations)
    iterations = operator.index(iterations)
    routing = dict(detach_intermediate=detach_intermediate, leaky=leaky, eps=eps)
    if not fused or _functorch_active():  # the hand-written backward has no torch.func rules
        return _dynamic_routing_autograd(dense_votes(u, weight, bias).transpose(1, 2), iterations, **routing)
    inputs = [t for t in (u, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        poses, coupling, logits = _DenseRouting.apply(u, weight, bias, iterations, routing)
    else:
        # Inference: the compiled kernel makes each image's votes in cache and routes them there.
        routed = kernels.dense_route(u, weight, bias, iterations, leaky, eps)
        if routed is None:
            u_hat = _votes(u, _weight_by_child(weight), weight.shape[0], bias)
            routed = _route(u_hat, iterations, leaky=leaky, eps=eps)[:3]
        poses, coupling, logits = routed
    return RoutingResult(poses=poses, coupling=coupling.transpose(1, 2), logits=logits.transpose(1, 2))


def _check_dense_args(u: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """Raise ``ValueError`` unless the shapes and dtypes fit :func:`dense_routing`; the bias as ``(J, 1, D)``."""
    if weight.dim() != 4 or min(weight.shape) < 1:
        raise ValueError(f"weight must be (J, I, D, E) with no empty axis, got shape {tuple(weight.shape)}")
    n_out, n_in, dim, in_dim = weight.shape
    if u.dim() != 3 or u.shape[1:] != (n_in, in_dim):
        raise ValueError(f"u must be (B, I, E) = (B, {n_in}, {in_dim}) for weight {tuple(weight.shape)}, got shape {tuple(u.shape)}")
    check_dtype(u, weight.dtype, name="u")
    if bias is not None:
        if bias.shape not in ((n_out, dim), (n_out, 1, dim)):
            raise ValueError(f"bias must be (J, D) = ({n_out}, {dim}) or (J, 1, D), got shape {tuple(bias.shape)}")
        check_dtype(bias, weight.dtype, name="bias")
        bias = bias.unsqueeze(1) if bias.dim() == 2 else bias
    return bias




def _weight_by_child(weight: Tensor) -> Tensor:
    """``(J, I, D, E)`` weights as one ``(E, J D)`` matrix per child: ``(I, E, J D)``."""
    n_out, n_in, dim, in_dim = weight.shape
    return weight.permute(1, 3, 0, 2).reshape(n_in, in_dim, n_out * dim)


def _slabs(batch: int, n_in: int, n_out: int, dim: int, device: torch.device) -> list[tuple[int, int]]:
    """Ranges of children ``i`` whose ``(B, J, I, D)`` slab has about :data:`capsnet._slabs.DENSE_SLAB` elements (one range off CPU)."""
    size = n_in if device.type != "cpu" else max(1, slab_sizes.DENSE_SLAB // max(1, batch * n_out * dim))
    return [(start, min(start + size, n_in)) for start in range(0, n_in, size)]


def _votes(u: Tensor, weight_t: Tensor, n_out: int, bias: Optional[Tensor]) -> Tensor:
    """Votes ``u_hat_{j|i} = W_ij u_i (+ bias_j)`` as a contiguous ``(B, J, I, D)`` tensor, without autograd.

    Per child ``i`` the votes of the whole batch are one matmul ``(B, E) @ (E, J D)``
    (``weight_t`` from :func:`_weight_by_child`); each slab of children is computed that
    way and copied into the layout routing reads, so no full-size temporary is made.
    """
    batch, n_in, _ = u.shape
    dim = weight_t.shape[2] // n_out
    u_hat = u.new_empty(batch, n_out, n_in, dim)
    u_t = u.transpose(0, 1)  # (I, B, E)
    bias_row = bias.reshape(1, 1, n_out * dim) if bias is not None else None
    for start, stop in _slabs(batch, n_in, n_out, dim, u.device):
        if bias_row is None:
            slab = torch.bmm(u_t[start:stop], weight_t[start:stop])  # (i, B, J D)
        else:
            slab = torch.baddbmm(bias_row, u_t[start:stop], weight_t[start:stop])
        u_hat[:, :, start:stop].copy_(slab.view(stop - start, batch, n_out, dim).permute(1, 2, 0, 3))
    return u_hat


def _kept_votes(u: Tensor, weight: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The ``(B, J, I, D)`` votes training's routing keeps: compiled where it can (written in place, no
    copy between layouts), else :func:`_votes`."""
    u_hat = kernels.dense_votes(u, weight, bias)
    return u_hat if u_hat is not None else _votes(u, weight_t, weight.shape[0], bias)


class _DenseRouting(torch.autograd.Function):
    """Votes (Eq. 2) and routing (Procedure 1) as one function of ``(u, W, bias)``.

    The backward forms ``grad_u_hat = A^T M`` from the factors of
    :func:`~capsnet.routing.dynamic._routing_vjp` in one batched matmul, written over the
    votes (dead by then, so no new full-size tensor), then slab by slab of children moves
    it to the per-child layout and contracts it with ``u`` (for ``grad_W``) and ``W``
    (for ``grad_u``) as one ``(B, J D)`` matmul per child.
    """

    @staticmethod
    def forward(ctx, u, weight, bias, iterations, routing):
        n_out = weight.shape[0]
        weight_t = _weight_by_child(weight)  # (I, E, J D)
        u_hat = _kept_votes(u, weight, weight_t, bias)
        poses, coupling, logits, steps = _route(u_hat, iterations, leaky=routing["leaky"], eps=routing["eps"], keep=True)
        if routing["detach_intermediate"]:
            steps = steps[-1:]
        ctx.iterations, ctx.routing, ctx.n_steps, ctx.n_out = iterations, routing, len(steps), n_out
        ctx.save_for_backward(u, weight, bias, weight_t, *(x for step in steps for x in step))
        # Kept outside save_for_backward: the backward overwrites it (see there).
        ctx.u_hat = u_hat
        if not _outputs_differentiable(iterations, routing["detach_intermediate"]):
            ctx.mark_non_differentiable(coupling, logits)
        ctx.set_materialize_grads(False)
        return poses, coupling, logits

    @staticmethod
    def backward(ctx, grad_poses, grad_coupling, grad_logits):
        u, weight, bias, weight_t, *flat_steps = ctx.saved_tensors
        grads = (grad_poses, grad_coupling, grad_logits)
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            return _DenseRouting._differentiable_backward(ctx, (u, weight, bias), grads) + (None, None)
        steps = [_Step(*flat_steps[3 * k : 3 * k + 3]) for k in range(ctx.n_steps)]
        # The votes are only ours; their memory takes grad_u_hat below. A second backward
        # through the same graph (retain_graph=True) finds them gone and recomputes them.
        u_hat, ctx.u_hat = ctx.u_hat, None
        if u_hat is None:
            u_hat = _kept_votes(u, weight, weight_t, bias)
        left, right = _routing_vjp(
            u_hat, steps, *grads, detach_intermediate=ctx.routing["detach_intermediate"], eps=ctx.routing["eps"]
        )
        batch, n_out, n_in, dim = u_hat.shape
        n_terms = left.shape[2]
        grad_u_hat = torch.bmm(
            left.view(-1, n_terms, n_in).transpose(1, 2), right.view(-1, n_terms, dim), out=u_hat.view(-1, n_in, dim)
        ).view(batch, n_out, n_in, dim)  # (B J, I, K) @ (B J, K, D), over the votes
        del left, right  # before the slabs' temporaries: the backward's peak of memory
        u_t = u.transpose(0, 1)  # (I, B, E)
        grad_u_t = u.new_empty(n_in, batch, u.shape[2]) if need[0] else None
        grad_w_t = u.new_empty(n_in, u.shape[2], n_out * dim) if need[1] else None  # as weight_t
        grad_bias = u.new_zeros(n_out * dim) if need[2] else None
        for start, stop in _slabs(batch, n_in, n_out, dim, u.device):
            # This slab of grad_u_hat per child, (i, B, J D): one slab-sized copy.
            per_child = grad_u_hat[:, :, start:stop].permute(2, 0, 1, 3).reshape(stop - start, batch, n_out * dim)
            if need[1]:
                torch.bmm(u_t[start:stop].transpose(1, 2), per_child, out=grad_w_t[start:stop])  # (i, E, J D)
            if need[0]:
                torch.bmm(per_child, weight_t[start:stop].transpose(1, 2), out=grad_u_t[start:stop])  # (i, B, E)
            if need[2]:
                grad_bias += per_child.sum(dim=(0, 1))
        grad_u = grad_u_t.transpose(0, 1) if need[0] else None
        grad_w = grad_w_t.view(n_in, -1, n_out, dim).permute(2, 0, 3, 1) if need[1] else None
        grad_b = grad_bias.view(n_out, 1, dim) if need[2] else None
        return grad_u, grad_w, grad_b, None, None

    @staticmethod
    def _differentiable_backward(ctx, inputs, grads) -> tuple:
        """``create_graph=True``: autograd through the unfused reference (the saved inputs keep their history)."""
        u, weight, bias = inputs
        ref = _dynamic_routing_autograd(dense_votes(u, weight, bias).transpose(1, 2), ctx.iterations, **ctx.routing)
        outputs, present = _present((ref.poses, ref.coupling.transpose(1, 2), ref.logits.transpose(1, 2)), grads)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
        found = iter(torch.autograd.grad(outputs, wanted, present, create_graph=True, allow_unused=True))
        return tuple(next(found) if need else None for need in ctx.needs_input_grad[:3])

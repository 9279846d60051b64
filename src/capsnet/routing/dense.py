"""The fused DigitCaps engine: votes (Eq. 2) and routing (Procedure 1) as one function of ``(u, W, bias)``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dynamic import _dynamic_routing_autograd, _outputs_differentiable, _present, _route, _routing_vjp, _Step

#: Elements of one ``(B, J, slab of I, D)`` slab of votes moved between layouts at a time
#: (8 MiB in float32; twelve slabs for the MNIST model at batch 128). With freed memory kept
#: (capsnet.allocator) 8 MiB slabs are as fast as larger ones and lower the training peak
#: (docs/performance.md, "Where capsnet_mnist's training peak comes from"); one slab makes
#: full-size temporaries. A speed and memory knob only: results do not depend on it.
_SLAB_ELEMENTS = 1 << 21


def _weight_by_child(weight: Tensor) -> Tensor:
    """``(J, I, D, E)`` weights as one ``(E, J D)`` matrix per child: ``(I, E, J D)``."""
    n_out, n_in, dim, in_dim = weight.shape
    return weight.permute(1, 3, 0, 2).reshape(n_in, in_dim, n_out * dim)


def _slabs(batch: int, n_in: int, n_out: int, dim: int, device: torch.device) -> list[tuple[int, int]]:
    """Ranges of children ``i`` whose ``(B, J, I, D)`` slab has about :data:`_SLAB_ELEMENTS` elements (one range off CPU)."""
    size = n_in if device.type != "cpu" else max(1, _SLAB_ELEMENTS // max(1, batch * n_out * dim))
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
        u_hat = _votes(u, weight_t, n_out, bias)
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
            u_hat = _votes(u, weight_t, ctx.n_out, bias)
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
        u_hat = torch.einsum("jide,bie->bjid", weight, u)  # as DenseCaps.votes
        if bias is not None:
            u_hat = u_hat + bias
        ref = _dynamic_routing_autograd(u_hat.transpose(1, 2), ctx.iterations, **ctx.routing)
        outputs, present = _present((ref.poses, ref.coupling.transpose(1, 2), ref.logits.transpose(1, 2)), grads)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
        found = iter(torch.autograd.grad(outputs, wanted, present, create_graph=True, allow_unused=True))
        return tuple(next(found) if need else None for need in ctx.needs_input_grad[:3])

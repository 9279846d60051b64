"""Fully connected capsule layer with routing-by-agreement (DigitCaps of Sabour et al. 2017)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..routing.dynamic import (
    RoutingResult,
    _dynamic_routing_autograd,
    _functorch_active,
    _outputs_differentiable,
    _present,
    _route,
    _routing_vjp,
    _Step,
)
from ..precision import float32_under_autocast
from ..validation import check_dtype

__all__ = ["DenseCaps"]

#: Elements of one ``(B, J, slab of I, D)`` slab of votes moved between layouts at a time
#: (8 MiB in float32; twelve slabs for the MNIST model at batch 128). With freed memory kept
#: (capsnet.allocator) 8 MiB slabs are as fast as larger ones and lower the training peak
#: (docs/performance.md, "Where capsnet_mnist's training peak comes from"); one slab makes
#: full-size temporaries. A speed and memory knob only: results do not depend on it.
_SLAB_ELEMENTS = 1 << 21


class DenseCaps(nn.Module):
    """Every input capsule ``i`` predicts every output capsule ``j`` through its own matrix ``W_ij``.

    Votes ``u_hat_{j|i} = W_ij u_i`` (Eq. 2) come from weights that carry no batch
    axis; the parents come from routing by agreement. ``forward`` computes exactly
    ``dynamic_routing(self.votes(u).transpose(1, 2), ...)`` (to rounding), fused: the
    votes are made per child as one matmul over the batch, and one hand-written
    backward (:class:`_DenseRouting`) returns the gradients of ``u``, ``W`` and the bias
    without autograd's full-size intermediate gradients.

    Args:
        in_caps, in_dim: number ``I`` and dimension of the input capsules.
        out_caps, out_dim: number ``J`` and dimension ``D`` of the output capsules.
        iterations: routing iterations (the paper: 3).
        detach_intermediate, leaky: see :func:`~capsnet.routing.dynamic_routing`.
        bias: add a learned ``(J, D)`` bias to the votes as the official code does
            (+J*D parameters); the paper has none, default False.
        init_std: standard deviation of the normal initialisation of ``W``.

    Shape:
        u: ``(B, I, in_dim)``; returns a :class:`~capsnet.routing.RoutingResult` with
        poses ``(B, J, D)``, coupling and logits ``(B, I, J)``.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        *,
        iterations: int = 3,
        detach_intermediate: bool = False,
        leaky: bool = False,
        bias: bool = False,
        init_std: float = 0.01,
    ):
        super().__init__()
        if min(in_caps, in_dim, out_caps, out_dim, iterations) < 1:
            raise ValueError(
                f"DenseCaps sizes must be positive, got in_caps={in_caps} in_dim={in_dim} "
                f"out_caps={out_caps} out_dim={out_dim} iterations={iterations}"
            )
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"DenseCaps init_std must be finite and >= 0, got {init_std}; pass a small std such as the default 0.01")
        self.in_caps, self.in_dim = in_caps, in_dim
        self.iterations = iterations
        self.detach_intermediate = detach_intermediate
        self.leaky = leaky
        # W_ij stored as (J, I, D, in_dim): parents outermost, as the (B, J, I, D) votes.
        self.weight = nn.Parameter(torch.randn(out_caps, in_caps, out_dim, in_dim) * init_std)
        self.bias = nn.Parameter(torch.zeros(out_caps, 1, out_dim)) if bias else None

    def _check_input(self, u: Tensor) -> None:
        if u.dim() != 3 or u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(
                f"DenseCaps expects input capsules of shape (B, {self.in_caps}, {self.in_dim}), got {tuple(u.shape)}"
            )
        check_dtype(u, self.weight.dtype, name="DenseCaps input")

    def votes(self, u: Tensor) -> Tensor:
        """Predictions ``u_hat_{j|i} = W_ij u_i`` as a ``(B, J, I, D)`` tensor: the readable form of what ``forward`` fuses."""
        self._check_input(u)
        u_hat = torch.einsum("jide,bie->bjid", self.weight, u)
        if self.bias is not None:
            u_hat = u_hat + self.bias
        return u_hat

    @float32_under_autocast
    def forward(self, u: Tensor) -> RoutingResult:
        self._check_input(u)
        routing = dict(detach_intermediate=self.detach_intermediate, leaky=self.leaky, eps=0.0)
        if _functorch_active():
            return _dynamic_routing_autograd(self.votes(u).transpose(1, 2), self.iterations, **routing)
        inputs = [t for t in (u, self.weight, self.bias) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            poses, coupling, logits = _DenseRouting.apply(u, self.weight, self.bias, self.iterations, routing)
        else:
            u_hat = _votes(u, _weight_by_child(self.weight), self.weight.shape[0], self.bias)
            poses, coupling, logits, _ = _route(u_hat, self.iterations, leaky=self.leaky, eps=0.0)
        return RoutingResult(poses=poses, coupling=coupling.transpose(1, 2), logits=logits.transpose(1, 2))


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

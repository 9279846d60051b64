"""The engine of EM routing: an autograd Function that runs Procedure 1 and its adjoint.

Forward runs :func:`~capsnet.routing.em_steps.em_iteration` without autograd on the chunked
vote reads of :class:`~capsnet.routing._em_votes.VoteReader`. Backward goes through the loop in
reverse with the hand-written adjoints of :mod:`capsnet.routing._em_adjoint` and the adjoint
reads, and hands each chunk of the votes' gradient straight to the factors (or, compiled, to
the 4x4 matrices). See :class:`EMRoutingFunction`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ops import kernels
from . import em_steps
from ._em_adjoint import Upstream, m_step_adjoint
from ._em_votes import FactoredVotes, Moments, Term, VoteReader, factored_centre
from .em_steps import (
    Gaussians,
    VoteReads,
    assign_backward,
    em_iteration,
    initial_assignments,
    iteration_stats,
    routing_outputs,
)

__all__ = ["EMRoutingFunction"]

class _Args(NamedTuple):
    """The arguments of :meth:`EMRoutingFunction.forward`, by name: what ``ctx.needs_input_grad``
    says of each, and the gradients backward returns."""

    votes: Any  # plain votes (I, B, L, J, D), or the poses (G, R, P) of factored ones
    transforms: Any
    offsets: Any
    matrices: Any
    a_in: Any
    beta_a: Any
    beta_v: Any
    cfg: Any = None
    stats: Any = None


class _Saved(NamedTuple):
    """The tensors forward keeps for backward besides the per-iteration ones; None where absent."""

    centred: Optional[Tensor]  # plain votes: X = V - c, (I, N, D)
    poses: Optional[Tensor]  # factored votes: their factors
    transforms: Optional[Tensor]
    offsets: Optional[Tensor]
    matrices: Optional[Tensor]
    a_in: Tensor  # (I, B, L, 1)
    beta_a: Tensor
    beta_v: Tensor
    centre: Tensor  # c, (N, D)


class _Step(NamedTuple):
    """What forward recorded of one iteration: its Gaussians, the result of the vote read that
    fitted them and the assignments of the E-step that used them, what backward differentiates at."""

    gaussians: Gaussians
    moments: Moments  # the M-step's read, which fitted them
    assignments: Optional[Tensor]  # the next E-step's R, (I, B, L, J); None after the last iteration


def _read_factors(gaussians: Gaussians, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """``u1, u2`` ``(N, D)`` of the E-step that read ``gaussians`` (:class:`~capsnet.routing.em_steps.EStepInputs`
    without ``const``: the votes' gradient needs only these two), times ``1 / e_step_temperature``."""
    inv2var = 0.5 / gaussians.var
    if inv_temperature != 1.0:
        inv2var = inv2var * inv_temperature
    dim = inv2var.shape[-1]
    return (2.0 * gaussians.mu_c * inv2var).reshape(-1, dim), (-inv2var).reshape(-1, dim)


def _save(ctx, saved: _Saved, steps: list[_Step]) -> None:
    ctx.save_for_backward(*saved, *(t for step in steps for t in (*step.gaussians, *step.moments, step.assignments)))


def _load(ctx, iterations: int) -> tuple[_Saved, list[_Step]]:
    """What :func:`_save` saved, each tensor back under its name."""
    tensors = iter(ctx.saved_tensors)

    def take(kind):
        return kind._make(next(tensors) for _ in kind._fields)

    saved = take(_Saved)
    return saved, [_Step(take(Gaussians), take(Moments), next(tensors)) for _ in range(iterations)]


class EMRoutingFunction(torch.autograd.Function):
    """EM routing with a vote gradient accumulated in one pass.

    Forward runs the iterations without autograd, keeping each iteration's Gaussians, the
    results of its moments read, the assignments ``R`` of each E-step and the centred votes (or,
    for :class:`FactoredVotes`, only their factors). Backward goes through the iterations in
    reverse with no graph at all: each M-step's adjoint (:func:`~capsnet.routing._em_adjoint.m_step_adjoint`,
    from the recorded moments and Gaussians; compiled, one pass per parent), the adjoint of its
    moments read (a quadratic read), the E-step softmax's one-pass adjoint
    (:func:`~capsnet.routing.em_steps.assign_backward`, from the recorded ``R``), the adjoint of
    its quadratic read (a moments read), and so on back to the first iteration; each read's
    adjoint also records an outer product of the votes' gradient (:class:`~capsnet.routing._em_votes.Term`),
    which is built from them in one pass at the end. Plain autograd would instead keep every
    iteration's intermediates and allocate and add one vote-sized gradient per read. (Until
    session 15 backward replayed each iteration under autograd: every small step ran three times.)

    Backward is ``once_differentiable``: it runs without a graph of its own, so no second
    derivative (an error, or routing's share silently missing where the incoming gradient is
    a constant), and the Function, defined with ``forward(ctx, ...)`` and no ``setup_context``
    / ``vmap`` / ``jvp``, works under no ``torch.func`` transform nor forward-mode AD (the
    library has no autograd path of EM routing; the tests' ``em_reference.py`` has one).
    """

    @staticmethod
    def forward(ctx, votes, transforms, offsets, matrices, a_in, beta_a, beta_v, cfg, stats=None):
        slots, batch, num_patches, types, dim = cfg.shape
        factored = transforms is not None
        # c: unweighted mean vote per parent; routing's outputs do not depend on it (it only
        # keeps the expanded moments free of float cancellation), so it carries no gradient.
        if factored:
            centre = factored_centre(votes, transforms, offsets, cfg.shape)
            reader = VoteReader(cfg.shape, factors=FactoredVotes(votes, transforms, offsets, matrices), centre=centre)
        else:
            flat = votes.view(slots, -1, dim)  # (I, N, D): children outermost, N = (B, L, J)
            centre = flat.mean(0)
            reader = VoteReader(cfg.shape, centred=flat - centre)
        recorded_m: dict[int, Moments] = {}  # by the iteration whose Gaussians the read fitted
        recorded_r: dict[int, Tensor] = {}  # R of the E-step, by the iteration whose Gaussians it used

        def moments(r, it):
            recorded_m[it] = reader.moments(r)
            return recorded_m[it]

        def assignments(log_ap, it):
            recorded_r[it] = em_steps.assignments(log_ap, cfg.geometry)
            return recorded_r[it]

        centre_view = centre.view(batch, num_patches, types, dim)
        compiled = kernels.em_steps(centre)  # the M-step and its adjoint in one pass per parent, where they apply
        reads = VoteReads(moments, lambda u1, u2, u0, it: reader.quadratic(u1, u2, u0), assignments)
        fitted, history = None, []
        for it in range(len(cfg.lambdas)):
            r, fitted = em_iteration(reads, it, fitted, a_in, beta_a, beta_v, centre_view, cfg, compiled)
            gaussians = fitted[0]
            history.append(gaussians)
            if stats is not None:
                stats.append(iteration_stats(r, gaussians, cfg))
        ctx.cfg, ctx.factored, ctx.compiled = cfg, factored, compiled is not None
        saved = _Saved(
            centred=None if factored else reader.x,
            poses=votes if factored else None,
            transforms=transforms,
            offsets=offsets,
            matrices=matrices,
            a_in=a_in,
            beta_a=beta_a,
            beta_v=beta_v,
            centre=centre,
        )
        _save(ctx, saved, [_Step(g, recorded_m[it], recorded_r.get(it)) for it, g in enumerate(history)])
        # R is also saved for backward (as the last E-step's record): the caller gets its own copy.
        return routing_outputs(r if ctx.cfg.lambdas[1:] == () else r.clone(), gaussians, centre_view, cfg)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mu, g_a, g_r):
        cfg = ctx.cfg
        slots, batch, num_patches, types, dim = cfg.shape
        iters = len(cfg.lambdas)
        needs = _Args(*ctx.needs_input_grad)
        saved, steps = _load(ctx, iters)
        if ctx.factored:
            factors = FactoredVotes(saved.poses, saved.transforms, saved.offsets, saved.matrices)
            reader = VoteReader(cfg.shape, factors=factors, centre=saved.centre)
        else:
            reader = VoteReader(cfg.shape, centred=saved.centred)
        a_in = saved.a_in
        need_betas = (needs.beta_a, needs.beta_v)
        compiled = kernels.em_steps(saved.centre) if ctx.compiled else None
        grad_a_in = torch.zeros_like(a_in) if needs.a_in else None
        grad_beta_a = torch.zeros_like(saved.beta_a) if needs.beta_a else None
        grad_beta_v = torch.zeros_like(saved.beta_v) if needs.beta_v else None
        # What reaches the last iteration's Gaussians from routing's outputs: mu = mu_c + c, a = sigmoid(logit).
        g_logit = None
        if g_a is not None:
            a = torch.sigmoid(steps[-1].gaussians.logit)
            g_logit = g_a * a * (1.0 - a)
        up = Upstream(mu=g_mu, logit=g_logit)
        g_r = None if iters == 1 else g_r  # one iteration returns the initial R, a constant
        for it in reversed(range(iters)):
            if up.empty() and (it < iters - 1 or g_r is None):
                break  # nothing of iteration `it` reaches the outputs (detach_intermediate, truncate_gradient)
            step = steps[it]
            # The M-step of iteration `it`, then its moments read, weighted by ra = R a_in.
            m = None
            if not up.empty():
                m = m_step_adjoint(up, step.moments, step.gaussians, saved.beta_a, saved.beta_v, cfg.lambdas[it], cfg,
                                   need_betas, compiled)
                if m.beta_a is not None:
                    grad_beta_a += m.beta_a
                if m.beta_v is not None:
                    grad_beta_v += m.beta_v
            r = initial_assignments(cfg, a_in) if it == 0 else steps[it - 1].assignments  # the R this M-step weighted by
            g_ra = None
            if m is not None:
                ra_flat = (r * a_in).expand(slots, batch, num_patches, types).reshape(slots, -1)
                reader.terms.append(Term(left=ra_flat, right1=m.m1, right2=m.m2))
                if needs.a_in or (it > 0 and not cfg.detach_intermediate):  # the read's adjoint: d/d(ra)
                    g_ra = reader.quadratic(m.m1, m.m2, m.mass).view(slots, batch, num_patches, types)
            if it == 0:
                if grad_a_in is not None and g_ra is not None:  # ra = R0 a_in with R0 the same for every parent type
                    grad_a_in += g_ra.sum(-1, keepdim=True).mul_(r)
                break
            # The E-step of iteration `it`: R from the Gaussians of iteration it - 1.
            g_r_here = g_r if it == iters - 1 and not cfg.detach_intermediate else None
            need_log = not cfg.detach_intermediate
            g_log_ap, g_a_in = assign_backward(r, a_in, g_r_here, g_ra, cfg.geometry, need_log, needs.a_in)
            if g_a_in is not None:
                grad_a_in += g_a_in
            if g_log_ap is None:
                break  # R is a constant (detach_intermediate): nothing reaches earlier iterations
            prev = steps[it - 1].gaussians
            u1, u2 = _read_factors(prev, cfg.inv_temperature)
            g_log_flat = g_log_ap.reshape(slots, -1)
            reader.terms.append(Term(left=g_log_flat, right1=u1, right2=u2))
            if cfg.truncate_gradient:
                break  # the Gaussians the E-step read are constants
            g_u1, g_u2, g_const = reader.moments(g_log_flat)  # the read's adjoint
            up = Upstream(u1=g_u1, u2=g_u2, const=g_const, scale=cfg.iteration_grad_scale)
        grad_votes = grad_transforms = grad_matrices = None
        # Straight to the 4x4 matrices, unless only the block transforms want a gradient.
        direct = reader.compiled is not None and reader.compiled.has_matrices
        direct = direct and (needs.matrices or not needs.transforms)
        if direct and (needs.votes or needs.matrices) and reader.terms:
            # Compiled, 4x4 votes: one pass to the poses and the 4x4 matrices (the block
            # transforms are built from the matrices, so their gradient is the matrices').
            grad_votes, grad_matrices = reader.compiled.factor_gradients(reader.compiled_terms(), needs.votes, needs.matrices)
        elif (needs.votes or needs.transforms or needs.matrices) and reader.terms:
            # Eager: the gradient goes to the block transforms; to the matrices (their diagonal
            # blocks, summed) only where the block transforms do not want one themselves.
            to_matrices = needs.matrices and not needs.transforms
            if not ctx.factored:
                grad_votes = torch.empty_like(saved.centred)  # (I, N, D)
                for part, g in reader.grad_chunks():
                    grad_votes[part] = g
                grad_votes = grad_votes.view(cfg.shape)
            else:
                # Each chunk's gradient goes straight to the factors: no vote-sized gradient either.
                poses, transforms = saved.poses, saved.transforms
                grad_votes = torch.empty_like(poses) if needs.votes else None
                grad_transforms = torch.empty_like(transforms) if needs.transforms or to_matrices else None
                for part, g in reader.grad_chunks():
                    groups = slice(part.start // reader.per_group, part.stop // reader.per_group)
                    g = g.view(groups.stop - groups.start, poses.shape[1], -1)  # (g, R, J D)
                    if grad_votes is not None:
                        torch.bmm(g, transforms[groups].transpose(1, 2), out=grad_votes[groups])
                    if grad_transforms is not None:
                        torch.bmm(poses[groups].transpose(1, 2), g, out=grad_transforms[groups])
                if to_matrices:  # V = M W row by row: block (a q, j a r) holds W[j, q, r] for every row a
                    blocks = grad_transforms.view(-1, 4, 4, types, 4, 4)  # (G, a, q, j, a', r)
                    grad_matrices = torch.diagonal(blocks, dim1=1, dim2=4).sum(-1).permute(0, 2, 1, 3)
                    grad_transforms = None
        grads = _Args(
            votes=grad_votes,
            transforms=grad_transforms,
            offsets=None,
            matrices=grad_matrices,
            a_in=grad_a_in,
            beta_a=grad_beta_a,
            beta_v=grad_beta_v,
        )
        return tuple(grads)

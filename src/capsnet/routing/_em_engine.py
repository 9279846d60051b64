"""The engine of EM routing: an autograd Function that replays Procedure 1 backwards.

Forward runs :func:`~capsnet.routing.em_steps.em_iteration` without autograd on the chunked
vote reads of :class:`~capsnet.routing._em_votes.VoteReader`. Backward replays the cheap part
of the loop, one iteration at a time, and hands each chunk of the votes' gradient straight to
the factors (or, compiled, to the 4x4 matrices). See :class:`EMRoutingFunction`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._em_votes import VoteReader, factored_centre
from .em_steps import em_iteration, iteration_stats, routing_outputs

__all__ = ["EMRoutingFunction"]

class _ReplayMoments(torch.autograd.Function):
    """Stands in for :meth:`VoteReader.moments` while the backward pass replays the loop.

    Returns the sums the forward pass computed; its backward is the adjoint read and records
    the outer product that the votes' gradient needs.
    """

    @staticmethod
    def forward(ctx, r, anchor, reader, m1, m2, mass):
        ctx.reader = reader
        ctx.save_for_backward(r)
        return m1.clone(), m2.clone(), mass.clone()

    @staticmethod
    def backward(ctx, g1, g2, g_mass):
        (r,) = ctx.saved_tensors
        # Detached: a term holding r's graph would close a cycle (graph -> ctx -> reader -> r)
        # through C++ autograd nodes that the garbage collector cannot break.
        ctx.reader.terms.append((r.detach(), g1, g2))
        g_mass = g1.new_zeros(g1.shape[0]) if g_mass is None else g_mass  # d sum_i r_i / d r_i = 1
        grad_r = ctx.reader.quadratic(g1, g2, g_mass) if ctx.needs_input_grad[0] else None
        return grad_r, torch.zeros((), dtype=r.dtype, device=r.device), None, None, None, None


class _ReplayQuadratic(torch.autograd.Function):
    """Stands in for :meth:`VoteReader.quadratic` while the backward pass replays the loop."""

    @staticmethod
    def forward(ctx, u1, u2, u0, anchor, reader, q):
        ctx.reader = reader
        ctx.save_for_backward(u1, u2)
        return q.clone()

    @staticmethod
    def backward(ctx, gq):
        u1, u2 = ctx.saved_tensors
        ctx.reader.terms.append((gq, u1.detach(), u2.detach()))  # detached: see _ReplayMoments
        g1, g2, g0 = ctx.reader.moments(gq)
        return g1, g2, g0, torch.zeros((), dtype=u1.dtype, device=u1.device), None, None


class EMRoutingFunction(torch.autograd.Function):
    """EM routing with a vote gradient accumulated in one pass.

    Forward runs the iterations without autograd, keeping each iteration's Gaussians, the
    results of the vote reads and the centred votes (or, for :class:`FactoredVotes`, only their
    factors). Backward goes through the iterations in reverse, replaying one at a time on the
    small tensors with autograd (so only one iteration's intermediates are alive), the reads
    replaced by :class:`_ReplayMoments` / :class:`_ReplayQuadratic` (same values; adjoint reads
    as backward); then it builds the votes' gradient from the recorded outer products. Plain
    autograd would instead keep every iteration's intermediates and allocate and add one
    vote-sized gradient per read.
    """

    @staticmethod
    def forward(ctx, votes, transforms, offsets, matrices, a_in, beta_a, beta_v, cfg, stats=None):
        slots, batch, num_patches, types, dim = cfg.shape
        factored = transforms is not None
        # c: unweighted mean vote per parent; routing's outputs do not depend on it (it only
        # keeps the expanded moments free of float cancellation), so it carries no gradient.
        if factored:
            centre = factored_centre(votes, transforms, offsets, cfg.shape)
            reader = VoteReader(cfg.shape, factors=(votes, transforms, offsets, matrices), centre=centre)
        else:
            flat = votes.view(slots, -1, dim)  # (I, N, D): children outermost, N = (B, L, J)
            centre = flat.mean(0)
            reader = VoteReader(cfg.shape, centred=flat - centre)
        recorded_m, recorded_q = [], []

        def moments(r, it):
            recorded_m.append(reader.moments(r))
            return recorded_m[-1]

        def quadratic(u1, u2, u0, it):
            recorded_q.append(reader.quadratic(u1, u2, u0))
            return recorded_q[-1]

        centre_view = centre.view(batch, num_patches, types, dim)
        gaussians, history = None, []
        for it in range(len(cfg.lambdas)):
            r, gaussians = em_iteration(moments, quadratic, it, gaussians, a_in, beta_a, beta_v, centre_view, cfg)
            history.extend(gaussians)
            if stats is not None:
                stats.append(iteration_stats(r, gaussians, cfg))
        ctx.cfg, ctx.factored = cfg._replace(keep_r=False), factored  # the replay needs no statistics
        ctx.has_offsets, ctx.has_matrices = offsets is not None, matrices is not None
        saved_m = [t for triple in recorded_m for t in triple]
        optional = tuple(t for t in (offsets, matrices) if t is not None)
        sources = (votes, transforms, *optional) if factored else (reader.x,)
        ctx.save_for_backward(*sources, a_in, beta_a, beta_v, centre, *history, *saved_m, *recorded_q)
        return routing_outputs(r, gaussians, centre_view, cfg)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_mu, g_a, g_r):
        cfg = ctx.cfg
        slots, batch, num_patches, types, dim = cfg.shape
        iters = len(cfg.lambdas)
        saved = list(ctx.saved_tensors)
        if ctx.factored:
            poses, transforms = saved.pop(0), saved.pop(0)
            offsets = saved.pop(0) if ctx.has_offsets else None
            matrices = saved.pop(0) if ctx.has_matrices else None
        else:
            centred = saved.pop(0)
        a_in, beta_a, beta_v, centre, *rest = saved
        if ctx.factored:
            reader = VoteReader(cfg.shape, factors=(poses, transforms, offsets, matrices), centre=centre)
        else:
            reader = VoteReader(cfg.shape, centred=centred)
        history = [tuple(rest[4 * k : 4 * k + 4]) for k in range(iters)]
        rest = rest[4 * iters :]
        recorded_m = [tuple(rest[3 * k : 3 * k + 3]) for k in range(iters)]
        recorded_q = rest[3 * iters :]
        centre_view = centre.view(batch, num_patches, types, dim)
        params = [x.detach().requires_grad_(need) for x, need in zip((a_in, beta_a, beta_v), ctx.needs_input_grad[4:7])]
        grad_params = [torch.zeros_like(x) if x.requires_grad else None for x in params]
        outputs_grad = [g_mu, g_a, g_r]
        for it in reversed(range(iters)):
            if all(g is None for g in outputs_grad):
                break  # detach_intermediate / truncate_gradient: earlier iterations do not reach the outputs
            # A leaf every replayed read depends on, so autograd runs each read's backward even
            # when no other input needs a gradient.
            anchor = centre.new_zeros((), requires_grad=True)
            prev = None if it == 0 else tuple(t.detach().requires_grad_() for t in history[it - 1])

            def moments(r, k, anchor=anchor):
                return _ReplayMoments.apply(r, anchor, reader, *recorded_m[k])

            def quadratic(u1, u2, u0, k, anchor=anchor):
                return _ReplayQuadratic.apply(u1, u2, u0, anchor, reader, recorded_q[k])

            with torch.enable_grad():
                r, gaussians = em_iteration(moments, quadratic, it, prev, *params, centre_view, cfg)
                outputs = routing_outputs(r, gaussians, centre_view, cfg) if it == iters - 1 else gaussians
                # R carries no graph when detach_intermediate; outputs without a graph are skipped.
                used = [(out, g) for out, g in zip(outputs, outputs_grad) if out.requires_grad and g is not None]
                inputs = [anchor, *(prev or ()), *(x for x in params if x.requires_grad)]
                grads = list(torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used], allow_unused=True))
            grads.pop(0)  # the anchor's
            outputs_grad = [grads.pop(0) for _ in range(len(prev or ()))]
            for k, x in enumerate(params):
                if x.requires_grad:
                    g = grads.pop(0)
                    if g is not None:
                        grad_params[k] += g
        grad_votes = grad_transforms = grad_matrices = None
        # Straight to the 4x4 matrices, unless only the block transforms want a gradient.
        direct = reader.compiled is not None and reader.compiled.has_matrices
        direct = direct and (ctx.needs_input_grad[3] or not ctx.needs_input_grad[1])
        if direct and (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]) and reader.terms:
            # Compiled, 4x4 votes: one pass to the poses and the 4x4 matrices (the block
            # transforms are built from the matrices, so their gradient is the matrices').
            grad_votes, grad_matrices = reader.compiled.factor_gradients(
                reader.compiled_terms(), ctx.needs_input_grad[0], ctx.needs_input_grad[3]
            )
        elif (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[3]) and reader.terms:
            # Eager: the gradient goes to the block transforms; to the matrices (their diagonal
            # blocks, summed) only where the block transforms do not want one themselves.
            to_matrices = ctx.needs_input_grad[3] and not ctx.needs_input_grad[1]
            if not ctx.factored:
                grad_votes = torch.empty_like(centred)  # (I, N, D)
                for part, g in reader.grad_chunks():
                    grad_votes[part] = g
                grad_votes = grad_votes.view(cfg.shape)
            else:
                # Each chunk's gradient goes straight to the factors: no vote-sized gradient either.
                grad_votes = torch.empty_like(poses) if ctx.needs_input_grad[0] else None
                grad_transforms = torch.empty_like(transforms) if ctx.needs_input_grad[1] or to_matrices else None
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
        return (grad_votes, grad_transforms, None, grad_matrices, *grad_params, None, None)

"""The engine of EM routing: an autograd Function that replays Procedure 1 backwards.

Forward runs :func:`~capsnet.routing.em_steps.em_iteration` without autograd on the chunked
vote reads of :class:`~capsnet.routing._em_votes.VoteReader`. Backward replays the cheap part
of the loop, one iteration at a time, and hands each chunk of the votes' gradient straight to
the factors (or, compiled, to the 4x4 matrices). See :class:`EMRoutingFunction`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import em_steps
from ._em_votes import FactoredVotes, Moments, Term, VoteReader, factored_centre
from .em_steps import Gaussians, VoteReads, em_iteration, iteration_stats, routing_outputs

__all__ = ["EMRoutingFunction"]

class _ReplayMoments(torch.autograd.Function):
    """Stands in for :meth:`VoteReader.moments` while the backward pass replays the loop.

    Returns the sums the forward pass computed (``recorded``); its backward is the adjoint read
    and records the outer product that the votes' gradient needs.
    """

    @staticmethod
    def forward(ctx, r: Tensor, anchor: Tensor, reader: VoteReader, recorded: Moments):
        ctx.reader = reader
        ctx.save_for_backward(r)
        return recorded.m1.clone(), recorded.m2.clone(), recorded.mass.clone()

    @staticmethod
    def backward(ctx, g1, g2, g_mass):
        (r,) = ctx.saved_tensors
        # Detached: a term holding r's graph would close a cycle (graph -> ctx -> reader -> r)
        # through C++ autograd nodes that the garbage collector cannot break.
        ctx.reader.terms.append(Term(left=r.detach(), right1=g1, right2=g2))
        g_mass = g1.new_zeros(g1.shape[0]) if g_mass is None else g_mass  # d sum_i r_i / d r_i = 1
        grad_r = ctx.reader.quadratic(g1, g2, g_mass) if ctx.needs_input_grad[0] else None
        grad_anchor = torch.zeros((), dtype=r.dtype, device=r.device)
        return grad_r, grad_anchor, None, None  # r, anchor, reader, recorded


class _ReplayQuadratic(torch.autograd.Function):
    """Stands in for :meth:`VoteReader.quadratic` while the backward pass replays the loop.

    Returns zeros of the read's shape ``(I, N)`` (one stored float, expanded): the replayed
    E-step takes the ``R`` that forward recorded, so the read's values are never used; its
    backward is the adjoint read.
    """

    @staticmethod
    def forward(ctx, u1: Tensor, u2: Tensor, u0: Tensor, anchor: Tensor, reader: VoteReader, shape: tuple[int, int]):
        ctx.reader = reader
        ctx.save_for_backward(u1, u2)
        return u1.new_zeros(()).expand(shape)

    @staticmethod
    def backward(ctx, gq):
        u1, u2 = ctx.saved_tensors
        ctx.reader.terms.append(Term(left=gq, right1=u1.detach(), right2=u2.detach()))  # detached: see _ReplayMoments
        g1, g2, g0 = ctx.reader.moments(gq)
        grad_anchor = torch.zeros((), dtype=u1.dtype, device=u1.device)
        return g1, g2, g0, grad_anchor, None, None  # u1, u2, u0, anchor, reader, shape


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
    fitted them and the assignments of the E-step that used them, replayed as they were by backward."""

    gaussians: Gaussians
    moments: Moments  # the M-step's read, which fitted them
    assignments: Optional[Tensor]  # the next E-step's R, (I, B, L, J); None after the last iteration


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
    reverse, replaying one at a time on the small tensors with autograd (so only one iteration's
    intermediates are alive), the reads replaced by :class:`_ReplayMoments` /
    :class:`_ReplayQuadratic` (recorded values, or none where the recorded ``R`` stands in; adjoint
    reads as backward) and the E-step's softmax by the recorded ``R`` with its one-pass gradient
    (``em_steps._Assign``); then it builds the votes' gradient from the recorded outer products. Plain
    autograd would instead keep every iteration's intermediates and allocate and add one
    vote-sized gradient per read.

    Backward is ``once_differentiable``: it runs without a graph of its own, so no second
    derivative (an error, or routing's share silently missing where the incoming gradient is
    a constant), and the Function, defined with ``forward(ctx, ...)`` and no ``setup_context``
    / ``vmap`` / ``jvp``, works under no ``torch.func`` transform nor forward-mode AD. See
    :func:`~capsnet.routing.em.em_routing` for the reference path that has all of these.
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
        gaussians, history = None, []
        for it in range(len(cfg.lambdas)):
            reads = VoteReads(moments, lambda u1, u2, u0, it: reader.quadratic(u1, u2, u0), assignments)
            r, gaussians = em_iteration(reads, it, gaussians, a_in, beta_a, beta_v, centre_view, cfg)
            history.append(gaussians)
            if stats is not None:
                stats.append(iteration_stats(r, gaussians, cfg))
        ctx.cfg, ctx.factored = cfg._replace(keep_r=False), factored  # the replay needs no statistics
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
        centre_view = saved.centre.view(batch, num_patches, types, dim)
        params = {
            name: getattr(saved, name).detach().requires_grad_(getattr(needs, name)) for name in ("a_in", "beta_a", "beta_v")
        }
        grad_params = {name: torch.zeros_like(x) for name, x in params.items() if x.requires_grad}
        outputs_grad = (g_mu, g_a, g_r)  # of what iteration `it` produced: routing's outputs, then Gaussians
        for it in reversed(range(iters)):
            if all(g is None for g in outputs_grad):
                break  # detach_intermediate / truncate_gradient: earlier iterations do not reach the outputs
            # A leaf every replayed read depends on, so autograd runs each read's backward even
            # when no other input needs a gradient.
            anchor = saved.centre.new_zeros((), requires_grad=True)
            prev = None if it == 0 else Gaussians._make(t.detach().requires_grad_() for t in steps[it - 1].gaussians)

            def moments(r, k, anchor=anchor):
                return _ReplayMoments.apply(r, anchor, reader, steps[k].moments)

            def quadratic(u1, u2, u0, k, anchor=anchor):
                return _ReplayQuadratic.apply(u1, u2, u0, anchor, reader, (slots, u0.shape[0]))

            def assignments(log_ap, k):
                return steps[k].assignments

            with torch.enable_grad():
                reads = VoteReads(moments, quadratic, assignments)
                r, gaussians = em_iteration(reads, it, prev, **params, centre=centre_view, cfg=cfg)
                outputs = routing_outputs(r, gaussians, centre_view, cfg) if it == iters - 1 else gaussians
                # R carries no graph when detach_intermediate; outputs without a graph are skipped.
                used = [(out, g) for out, g in zip(outputs, outputs_grad) if out.requires_grad and g is not None]
                inputs = {"anchor": anchor, **(prev._asdict() if prev is not None else {})}
                inputs.update((name, x) for name, x in params.items() if x.requires_grad)
                grads = torch.autograd.grad([o for o, _ in used], list(inputs.values()), [g for _, g in used], allow_unused=True)
                grads = dict(zip(inputs, grads))  # the anchor's is not used
            outputs_grad = () if prev is None else Gaussians._make(grads[name] for name in Gaussians._fields)
            for name in grad_params:
                if grads[name] is not None:
                    grad_params[name] += grads[name]
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
            a_in=grad_params.get("a_in"),
            beta_a=grad_params.get("beta_a"),
            beta_v=grad_params.get("beta_v"),
        )
        return tuple(grads)

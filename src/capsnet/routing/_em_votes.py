"""The votes of EM routing, read in chunks: every access routing makes to them.

The votes are by far the largest tensor (``B L I J D``: 85 MB for ConvCaps1 of em_small at
batch 32, 680 MB for em_full). The M-step needs ``sum_i R a (V - c)`` and ``sum_i R a (V - c)^2``
and the E-step's log-likelihood, expanded as ``(V - mu)^2 = X^2 - 2 X (mu - c) + (mu - c)^2``
with ``X = V - c``, needs ``sum_h X u1 + X^2 u2``: both are chunked reads (:class:`VoteReader`),
so no ``(B, L, I, J, D)`` temporary is built per iteration. With :class:`FactoredVotes` (what
the layers pass) the votes never exist whole: every chunk is multiplied out again in cache when
it is read, which on CPU is cheaper than writing a fresh vote-sized tensor (its pages are
faulted in one by one). Where they apply, the compiled one-pass reads of
:mod:`capsnet.ops.kernels` replace the eager chunks. See docs/performance.md, "EM routing".

Axis letters: ``B`` batch, ``L`` patches (output positions), ``I`` child slots per patch,
``J`` parent types, ``D`` pose elements (16), ``N = B L J`` all parents; ``G`` bmm groups,
``P`` pose inputs of the factored votes.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from einops import rearrange
from torch import Tensor

from .. import _slabs as slab_sizes
from ..ops import kernels

__all__ = ["FactoredVotes", "Moments", "Term", "VoteReader", "factored_centre"]


class FactoredVotes(NamedTuple):
    """Votes given by their factors, ``V = poses @ transforms`` (+ offsets), never kept whole.

    ``em_routing`` multiplies out a chunk of children each time it reads them (in cache, the
    unweighted mean vote subtracted by the same product), so no vote-sized tensor exists at
    all (with plain votes a centred copy is made and kept for backward). The product's memory
    order must be routing's ``(I, B, L, J, D)``: ``G R = I B L`` with the bmm batch ``G``
    outermost (``I / G`` children per group).

    poses: ``(G, R, P)``; transforms: ``(G, P, J D)``, no batch axis;
    offsets: ``(I, D)`` constants added to every vote of child slot ``i`` (coordinate addition), or None;
    matrices: for 4x4 poses (``P = D = 16``), the ``(G, J, 4, 4)`` transforms ``W`` with ``V = M W``
    that ``transforms`` is the block form of (``capsnet.layers.matrix._block_weight``), or None.
    Only the compiled reads use them (4 multiply-adds per vote element instead of 16). The
    gradient goes to ``transforms`` on the eager path and to ``matrices`` on the compiled one
    (when ``matrices`` needs one), so ``transforms`` must be computed from ``matrices``.
    """

    poses: Tensor
    transforms: Tensor
    offsets: Optional[Tensor] = None
    matrices: Optional[Tensor] = None


class Moments(NamedTuple):
    """What :meth:`VoteReader.moments` returns for weights ``r`` ``(I, N)``: ``(N, D)``, ``(N, D)``, ``(N,)``."""

    m1: Tensor  # sum_i r_i X_i
    m2: Tensor  # sum_i r_i X_i^2
    mass: Tensor  # sum_i r_i


class Term(NamedTuple):
    """One outer product of the votes' gradient, ``<left (x) right1, X> + <left (x) right2, X^2>``.

    left: ``(I, B, L, J)`` or ``(I, N)``; right1, right2: ``(N, D)``.
    """

    left: Tensor
    right1: Tensor
    right2: Tensor




class VoteReader:
    """Every access routing makes to the votes, in chunks over the children ``I``.

    Routing only needs two linear maps of the centred votes ``X = V - c`` and of ``X^2``
    (``c`` is a constant per parent and pose element, the unweighted mean vote):

    * ``moments(r) = (sum_i r_i X_i, sum_i r_i X_i^2, sum_i r_i)``: the M-step sums, ``(I, N) -> 2 x (N, D), (N,)``;
    * ``quadratic(u1, u2, u0) = u0 + sum_d X u1 + X^2 u2``: the expanded E-step, ``2 x (N, D), (N,) -> (I, N)``.

    Each is the adjoint of the other, so their backward passes are the same two reads; the
    gradient with respect to the votes is a sum of outer products, built chunk by chunk by
    :meth:`grad_chunks`. ``X^2`` is never stored: each chunk of it is rebuilt in cache. ``N``
    flattens the parent axes ``(B, L, J)``.

    The votes are either a stored ``X`` ``(I, N, D)`` or :class:`FactoredVotes` with the centre
    ``c``: then every chunk of ``X`` is multiplied out again in cache when it is read. That costs
    a small matrix product per chunk but no vote-sized tensor ever exists, and writing a fresh
    one (hundreds of MB, every page faulted in) took longer than the products it saved.
    """

    def __init__(self, shape, *, centred: Optional[Tensor] = None, factors: Optional[FactoredVotes] = None,
                 centre: Optional[Tensor] = None):
        slots, batch, num_patches, types, dim = shape
        self.x, self.factors, self.centre = centred, factors, centre  # X (I, N, D); c (N, D)
        self.shape = (slots, batch * num_patches * types, dim)
        device = (centred if centred is not None else centre).device
        limit = slab_sizes.EM_CHUNK if device.type == "cpu" else slab_sizes.EM_CHUNK_GPU
        step = max(1, limit // (batch * num_patches * types * dim))
        # A chunk of factored votes is whole bmm groups (G groups of I / G children each).
        self.per_group = 1 if factors is None else slots // factors.poses.shape[0]
        self.step = -(-step // self.per_group) * self.per_group
        self.terms: list[Term] = []  # the outer products of the votes' gradient
        # The compiled one-pass reads (capsnet.ops.kernels) where they apply, else None: eager chunks.
        self.compiled = None if factors is None else kernels.em_votes(
            factors.poses, factors.transforms, factors.offsets, factors.matrices, centre, shape
        )
        if factors is not None and self.compiled is None:  # -c for every row (child block, b, l) of a bmm group
            rows, cols = batch * num_patches, types * dim
            self.neg_centre = (-centre).view(1, rows, cols).expand(self.per_group, rows, cols).reshape(-1, cols)

    def _chunks(self):
        """``(children, X chunk, scratch)``: the X chunk is a view of ``X`` or multiplied out in cache."""
        slots, n, d = self.shape
        size = min(self.step, slots)
        buffer = self.centre.new_empty((size, n, d)) if self.x is None else self.x.new_empty((size, n, d))
        votes = buffer.new_empty((size, n, d)) if self.x is None else None
        for start in range(0, slots, self.step):
            part = slice(start, min(start + self.step, slots))
            count = part.stop - part.start
            if self.x is not None:
                x = self.x[part]
            else:
                poses, transforms, offsets = self.factors.poses, self.factors.transforms, self.factors.offsets
                groups = slice(part.start // self.per_group, part.stop // self.per_group)
                x = votes[:count]
                product = x.view(groups.stop - groups.start, poses.shape[1], -1)
                torch.baddbmm(self.neg_centre, poses[groups], transforms[groups], out=product)  # V - c
                if offsets is not None:
                    x += offsets[part].unsqueeze(1)
            yield part, x, buffer[:count]

    def moments(self, r: Tensor) -> Moments:
        """``sum_i r_i X_i``, ``sum_i r_i X_i^2`` (``(N, D)`` each) and ``sum_i r_i`` (``(N,)``) for ``r`` ``(I, N)``."""
        if self.compiled is not None:
            return Moments(*self.compiled.moments(r))
        m1 = self.centre.new_zeros(self.shape[1:]) if self.x is None else self.x.new_zeros(self.shape[1:])
        m2 = torch.zeros_like(m1)
        for part, x, buf in self._chunks():
            w = r[part].unsqueeze(-1)  # (c, N, 1)
            x2 = torch.square(x, out=buf)
            if x.shape[0] == 1:  # one child per chunk: fused multiply-adds
                m1.addcmul_(w[0], x[0])
                m2.addcmul_(w[0], x2[0])
            else:
                m1 += (w * x).sum(0)
                m2 += (w * x2).sum(0)
        return Moments(m1, m2, r.sum(0))

    def quadratic(self, u1: Tensor, u2: Tensor, u0: Tensor) -> Tensor:
        """``u0 + sum_d X u1 + X^2 u2`` for ``u1, u2`` of shape ``(N, D)`` and ``u0`` ``(N,)``; returns ``(I, N)``."""
        if self.compiled is not None:
            return self.compiled.quadratic(u1, u2, u0)
        out = u1.new_empty(self.shape[:2])
        ones = u1.new_ones(self.shape[-1])
        for part, x, buf in self._chunks():
            t = torch.addcmul(u1, x, u2, out=buf).mul_(x)  # X u1 + X^2 u2
            # Summed over D (mv beats sum(-1)), u0 added by the same call.
            torch.addmv(u0.expand(x.shape[0], -1).reshape(-1), t.view(-1, t.shape[-1]), ones, out=out[part].view(-1))
        return out

    def grad_chunks(self):
        """``(children, d/dV chunk)`` of ``sum_k <left_k (x) right1_k, X> + <left_k (x) right2_k, X^2>``
        over :attr:`terms`, chunk by chunk (each chunk is scratch, valid until the next)."""
        slots, n, d = self.shape
        if self.compiled is not None:
            yield from self._compiled_grad_chunks()
            return
        first, *others = [term._replace(left=term.left.reshape(slots, n)) for term in self.terms]
        scratch = None
        for part, x, buf in self._chunks():
            if scratch is None:
                scratch = torch.empty_like(buf)
            g1 = torch.mul(first.left[part].unsqueeze(-1), first.right1, out=scratch[: x.shape[0]])
            g2 = torch.mul(first.left[part].unsqueeze(-1), first.right2, out=buf)
            for term in others:
                w = term.left[part].unsqueeze(-1)
                g1.addcmul_(w, term.right1)
                g2.addcmul_(w, term.right2)
            yield part, g1.addcmul_(x, g2, value=2.0)  # dX^2/dV = 2 X; c is a constant

    def compiled_terms(self) -> list[Term]:
        """:attr:`terms` with the lefts as ``(I, N)`` (the kernels make everything contiguous float32)."""
        slots, n, _ = self.shape
        return [term._replace(left=term.left.reshape(slots, n)) for term in self.terms]

    def _compiled_grad_chunks(self):
        """:meth:`grad_chunks` by the compiled kernel, same chunks."""
        slots, n, d = self.shape
        terms = self.compiled_terms()
        out = terms[0].right1.new_empty((min(self.step, slots), n, d))
        for start in range(0, slots, self.step):
            stop = min(start + self.step, slots)
            yield slice(start, stop), self.compiled.gradient(terms, start, stop, out[: stop - start])


def factored_centre(poses: Tensor, transforms: Tensor, offsets: Optional[Tensor], shape) -> Tensor:
    """The unweighted mean vote per parent, ``c (N, D)``, of factored votes, without multiplying them out.

    ``sum_i V_i`` is one matrix product that contracts children and pose inputs together:
    ``(rows, I P) @ (I P, J D)`` (per bmm group, the group's children summed first).
    """
    slots, dim = shape[0], shape[-1]
    groups, rows, p = poses.shape
    per_group = slots // groups
    # Child i = (group g, k-th block of R / per_group rows): the group's children summed first.
    pooled = rearrange(poses, "g (k n) p -> k n (g p)", k=per_group).sum(0)  # (B L, G P)
    total = pooled @ transforms.reshape(groups * p, -1)  # (N / J, J D): sum over children of V
    centre = total.view(-1, dim) / slots
    return centre if offsets is None else centre + offsets.mean(0)

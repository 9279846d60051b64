"""EM routing between matrix capsules, Procedure 1 of Hinton, Sabour & Frosst 2018.

Each parent capsule ``j`` is a diagonal Gaussian over the 16 pose elements fitted
to the votes ``V_ij`` of its children, weighted by assignments ``R_ij`` times the
child activations ``a_i`` (M-step); the children are then re-assigned to the
parents that explain their votes best (E-step).

Layout. Votes arrive in *patch layout*: ``L`` patches (one per output position,
``L = 1`` for a fully connected layer), ``I`` child slots per patch and ``J``
parent types per position. In a convolutional layer one child sits in several
overlapping patches; :class:`ConvGeometry` says which. The E-step normaliser of a
child sums over *every* parent of that child, i.e. all ``J`` types at every
position whose receptive field holds the child (the paper: "corner ones
receiving only one feedback per capsule type"). It is computed in patch layout,
scattered back to child positions with ``F.fold`` (col2im) and gathered into
patch layout again with ``F.unfold``: no Python loop over positions.

Speed and memory. The votes are by far the largest tensor (``B L I J D``: 85 MB for
ConvCaps1 of em_small at batch 32, 680 MB for em_full). The M-step needs ``sum_i R a (V - c)``
and ``sum_i R a (V - c)^2`` and the E-step's log-likelihood, expanded as
``(V - mu)^2 = X^2 - 2 X (mu - c) + (mu - c)^2`` with ``X = V - c``, needs
``sum_h X u1 + X^2 u2``: both are chunked reads (:class:`_VoteReader`), so no
``(B, L, I, J, D)`` temporary is built per iteration. With :class:`FactoredVotes` (what the
layers pass) the votes never exist whole: every chunk is multiplied out again in cache when it
is read, which on CPU is cheaper than writing a fresh vote-sized tensor (its pages are faulted
in one by one). A custom autograd function replays the cheap part of the loop in the backward
pass, one iteration at a time, and hands each chunk of the votes' gradient straight to the
factors. See docs/performance.md, "EM routing".

Axis letters: ``B`` batch, ``L`` patches (output positions), ``I`` child slots per
patch, ``J`` parent types, ``D`` pose elements (16), ``T`` child types, ``H W``
child grid, ``N = B L J`` all parents.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._shapes import conv_output_size
from ..ops import kernels
from ..precision import float32_under_autocast

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

#: Added to every variance sigma^2 (Google's released code uses this ``min_var``): bounds the
#: Gaussian precision, so ``log sigma`` and ``1 / sigma^2`` stay finite when all votes agree
#: exactly (constant or zero input), and keeps the expanded float32 E-step accurate.
VAR_FLOOR = 5e-4

#: Added to the mass ``sum_i R_ij a_i`` where it divides: a parent that no active child
#: votes for (all ``a_i = 0``) gets mean 0 instead of 0/0.
MASS_EPS = 1e-6

#: Named inverse-temperature schedules, see :func:`inverse_temperatures`.
LAMBDA_SCHEDULES = ("fan_in", "linear", "authors")

#: How the M-step turns the cost into the activation logit, see :func:`em_routing`.
#: ``"paper"``: ``lambda (beta_a - sum_h cost^h)`` (Procedure 1); ``"centred"``:
#: ``lambda (beta_a + mean_k cost_k - cost_j)`` over the parents ``k`` of one position;
#: ``"standardised"``: ``lambda (beta_a + (mean_k cost_k - cost_j) / std_k cost_k)`` (gyang274's capsulesEM).
ACTIVATIONS = ("paper", "centred", "standardised")

#: Added to the variance of the costs over a position's parents before its square root in the
#: ``"standardised"`` activation: finite logits and gradients when every parent costs the same.
COST_EPS = 1e-6

#: ``log(2 pi)``: the Gaussian normaliser in the E-step log-likelihood.
_LOG_2PI = math.log(2.0 * math.pi)


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


class ConvGeometry(NamedTuple):
    """Where the children of a convolutional capsule layer sit in its patches (VALID padding).

    Child slot ``i`` of a patch enumerates ``(kernel row, kernel column, child type)`` with the type
    fastest: ``I = kernel[0] * kernel[1] * types``. Patches enumerate output positions row-major.

    in_size: ``(H, W)`` of the child grid; kernel, stride: ``(rows, columns)``; types: child types ``T``.
    """

    in_size: tuple[int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    types: int

    @property
    def out_size(self) -> tuple[int, int]:
        """``(H', W')`` of the parent grid."""
        return tuple(conv_output_size(n, k, s) for n, k, s in zip(self.in_size, self.kernel, self.stride))

    @property
    def num_patches(self) -> int:
        """``L = H' W'``."""
        h, w = self.out_size
        return h * w

    @property
    def slots(self) -> int:
        """Child slots per patch, ``I = kh kw T``."""
        return self.kernel[0] * self.kernel[1] * self.types

    def check(self) -> None:
        """Raise ``ValueError`` unless every size is positive and the kernel fits in the grid."""
        sizes = (*self.in_size, *self.kernel, *self.stride, self.types)
        if len(sizes) != 7 or min(sizes) < 1:
            raise ValueError(f"ConvGeometry sizes must be positive (H, W), (kh, kw), (sh, sw), T; got {self}")
        if self.kernel[0] > self.in_size[0] or self.kernel[1] > self.in_size[1]:
            raise ValueError(f"kernel {self.kernel} does not fit in the child grid {self.in_size}")


def to_patches(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """Copy a per-child map into patch layout (``F.unfold``, im2col).

    Shape:
        x: ``(B, T, H, W)``; returns ``(B, L, I)`` with ``I`` ordered ``(kh, kw, t)``.
    """
    if x.dim() != 4 or x.shape[1] != geometry.types or tuple(x.shape[2:]) != tuple(geometry.in_size):
        raise ValueError(
            f"to_patches expects (B, {geometry.types}, {geometry.in_size[0]}, {geometry.in_size[1]}), got {tuple(x.shape)}"
        )
    cols = F.unfold(x, geometry.kernel, stride=geometry.stride)  # (B, T kh kw, L)
    return rearrange(cols, "b (t k) l -> b l (k t)", t=geometry.types)


def child_sum(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """Sum patch-layout values over all patches that hold each child (``F.fold``, col2im).

    The 1D example of the EM implementation notes: children ``[1, 2, 3, 4]``, patches of 2 with
    stride 1 hold ``[[1, 2], [2, 3], [3, 4]]`` and the per-child sums are ``[1, 4, 6, 4]``.

    Shape:
        x: ``(B, L, I)``; returns ``(B, T, H, W)``.
    """
    if x.dim() != 3 or x.shape[1:] != (geometry.num_patches, geometry.slots):
        raise ValueError(
            f"child_sum expects (B, {geometry.num_patches}, {geometry.slots}) in patch layout, got {tuple(x.shape)}"
        )
    cols = rearrange(x, "b l (k t) -> b (t k) l", t=geometry.types)
    return F.fold(cols, geometry.in_size, geometry.kernel, stride=geometry.stride)


def parent_counts(geometry: ConvGeometry, *, like: Tensor) -> Tensor:
    """Number of patches holding each child (0 for children VALID padding leaves out).

    Shape:
        returns ``(1, T, H, W)`` with ``like``'s dtype and device.
    """
    ones = like.new_ones(1, geometry.num_patches, geometry.slots)
    return child_sum(ones, geometry)


def _child_index(geometry: ConvGeometry, device: torch.device) -> Tensor:
    """Flat index ``t H W + y W + x`` of the child in each patch slot, ``(L I,)``."""
    (h, w), (kh, kw), (sh, sw), t = geometry.in_size, geometry.kernel, geometry.stride, geometry.types
    oh, ow = geometry.out_size
    def ar(n: int) -> Tensor:
        return torch.arange(n, device=device)

    rows = ar(oh)[:, None, None, None, None] * sh + ar(kh)[None, None, :, None, None]  # (oh, 1, kh, 1, 1)
    cols = ar(ow)[None, :, None, None, None] * sw + ar(kw)[None, None, None, :, None]  # (1, ow, 1, kw, 1)
    types = ar(t)[None, None, None, None, :]
    return (types * (h * w) + rows * w + cols).reshape(-1)  # (oh ow kh kw t) = (L I)


def log_child_normaliser(s: Tensor, geometry: Optional[ConvGeometry]) -> Tensor:
    """``log sum exp`` of ``s`` over every patch slot holding the same child, back in patch layout.

    With ``s_{l,i} = log sum_j a_j p_{l,i,j}`` this is the log of the E-step denominator
    ``sum_k a_k p_ik`` over all parents ``k`` of the child (Procedure 1, E-step). Stable in log
    space: each child's terms are shifted by their (detached) maximum, found with one
    ``scatter_reduce``, so ``exp`` never overflows and the largest term is exactly 1. Without a
    geometry every slot is its own child and ``s`` is returned unchanged.

    Shape:
        s: ``(B, L, I)``; returns ``(B, L, I)``.
    """
    if geometry is None:
        return s
    batch = s.shape[0]
    index = _child_index(geometry, s.device)
    with torch.no_grad():
        shift = s.new_full((batch, geometry.types * geometry.in_size[0] * geometry.in_size[1]), -math.inf)
        shift.scatter_reduce_(1, index.expand(batch, -1), s.reshape(batch, -1), "amax")
        # Children no patch covers (VALID padding) keep -inf; they are never gathered back.
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        shift = shift.view(batch, geometry.types, *geometry.in_size)
        uncovered = (parent_counts(geometry, like=s) == 0).to(s.dtype)
    total = child_sum(torch.exp(s - to_patches(shift, geometry)), geometry)  # (B, T, H, W), >= 1 where covered
    # +1 on uncovered children only: their total is 0 and log(0) would poison the backward pass.
    log_total = torch.log(total + uncovered) + shift
    return to_patches(log_total, geometry)


def inverse_temperatures(
    schedule: Union[str, Sequence[float]],
    iterations: int,
    *,
    final_lambda: Optional[float] = None,
    fan_in: Optional[float] = None,
) -> tuple[float, ...]:
    """The inverse temperature ``lambda`` of each routing iteration (the paper: "a fixed schedule").

    ``"fan_in"`` (default of :func:`em_routing`): ``lambda_it = final_lambda (it + 1) / iterations
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
    scaling (which :func:`em_routing` applies with this schedule) and IBM's large negative
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


def children_per_parent(num_patches: int, slots: int, types: int, geometry: Optional[ConvGeometry] = None) -> float:
    """Number of child capsules over number of parent capsules of a routing layer.

    With uniform assignments and all ``a_i = 1`` this is every parent's mass ``sum_i R_ij``
    on average. Children are the covered grid positions times types in a convolutional layer,
    every ``(patch, slot)`` otherwise; parents are ``L J``.

    Shape:
        sizes in, a float out.
    """
    if geometry is None:
        children = num_patches * slots
    else:
        children = int((parent_counts(geometry, like=torch.zeros(())) > 0).sum())
    return children / (num_patches * types)


def _check_beta(beta: Tensor, name: str, num_patches: int, types: int) -> None:
    if beta.shape not in ((types,), (num_patches, types)):
        raise ValueError(
            f"{name} must be ({types},) per parent type or ({num_patches}, {types}) per parent capsule, "
            f"got {tuple(beta.shape)}"
        )


#: Elements of one chunk of votes in the chunked reads (about 1 MB of float32): large enough to
#: amortise Python overhead, small enough that the chunk's temporaries stay in cache.
_CHUNK_ELEMENTS = 1 << 18
#: The same on a GPU (about 256 MB): there the cost is one kernel launch per operation and chunk,
#: not cache misses, so every layer of the registered models is read in one chunk.
_CHUNK_ELEMENTS_GPU = 1 << 26


class _VoteReader:
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

    def __init__(self, shape, *, centred: Optional[Tensor] = None, factors=None, centre: Optional[Tensor] = None):
        slots, batch, num_patches, types, dim = shape
        self.x, self.factors, self.centre = centred, factors, centre  # X (I, N, D); c (N, D)
        self.shape = (slots, batch * num_patches * types, dim)
        device = (centred if centred is not None else centre).device
        limit = _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS_GPU
        step = max(1, limit // (batch * num_patches * types * dim))
        # A chunk of factored votes is whole bmm groups (G groups of I / G children each).
        self.per_group = 1 if factors is None else slots // factors[0].shape[0]
        self.step = -(-step // self.per_group) * self.per_group
        self.terms: list[tuple[Tensor, Tensor, Tensor]] = []  # (left, right1, right2) outer products
        # The compiled one-pass reads (capsnet.ops.kernels) where they apply, else None: eager chunks.
        self.compiled = None if factors is None else kernels.em_votes(*factors, centre, shape)
        self.factors = factors = None if factors is None else factors[:3]  # the eager chunks' (poses, transforms, offsets)
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
                poses, transforms, offsets = self.factors
                groups = slice(part.start // self.per_group, part.stop // self.per_group)
                x = votes[:count]
                product = x.view(groups.stop - groups.start, poses.shape[1], -1)
                torch.baddbmm(self.neg_centre, poses[groups], transforms[groups], out=product)  # V - c
                if offsets is not None:
                    x += offsets[part].unsqueeze(1)
            yield part, x, buffer[:count]

    def moments(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``sum_i r_i X_i``, ``sum_i r_i X_i^2`` (``(N, D)`` each) and ``sum_i r_i`` (``(N,)``) for ``r`` ``(I, N)``."""
        if self.compiled is not None:
            return self.compiled.moments(r)
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
        return m1, m2, r.sum(0)

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
        lefts = [t[0].reshape(slots, n) for t in self.terms]
        (a0, b0), rest = self.terms[0][1:], [(t[1], t[2]) for t in self.terms[1:]]
        first = None
        for part, x, buf in self._chunks():
            if first is None:
                first = torch.empty_like(buf)
            g1 = torch.mul(lefts[0][part].unsqueeze(-1), a0, out=first[: x.shape[0]])
            g2 = torch.mul(lefts[0][part].unsqueeze(-1), b0, out=buf)
            for left, (right1, right2) in zip(lefts[1:], rest):
                w = left[part].unsqueeze(-1)
                g1.addcmul_(w, right1)
                g2.addcmul_(w, right2)
            yield part, g1.addcmul_(x, g2, value=2.0)  # dX^2/dV = 2 X; c is a constant


    def _compiled_terms(self):
        """:attr:`terms` with the lefts as ``(I, N)`` (the kernels make everything contiguous float32)."""
        slots, n, _ = self.shape
        return [(t[0].reshape(slots, n), t[1], t[2]) for t in self.terms]

    def _compiled_grad_chunks(self):
        """:meth:`grad_chunks` by the compiled kernel, same chunks."""
        slots, n, d = self.shape
        terms = self._compiled_terms()
        out = terms[0][1].new_empty((min(self.step, slots), n, d))
        for start in range(0, slots, self.step):
            stop = min(start + self.step, slots)
            yield slice(start, stop), self.compiled.gradient(terms, start, stop, out[: stop - start])


class _ReplayMoments(torch.autograd.Function):
    """Stands in for :meth:`_VoteReader.moments` while the backward pass replays the loop.

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
    """Stands in for :meth:`_VoteReader.quadratic` while the backward pass replays the loop."""

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


class _Config(NamedTuple):
    lambdas: tuple[float, ...]
    activation: str
    cost_scale: float
    var_floor: float
    eps: float
    detach_intermediate: bool
    truncate_gradient: bool
    geometry: Optional[ConvGeometry]
    shape: tuple[int, int, int, int, int]  # (I, B, L, J, D)
    keep_r: bool = False  # R of every iteration (for statistics), not only the last


def _m_step(moments, it: int, ra: Tensor, b_a: Tensor, b_v: Tensor, lam: float, centre: Tensor, cfg: _Config):
    """M-step of Procedure 1 on ``ra = R_ij a_i``: parent Gaussians ``(mu - c, sigma^2, ln sigma^2)``
    and activation logits."""
    slots, batch, num_patches, types, dim = cfg.shape
    ra = ra.expand(slots, batch, num_patches, types)
    # sum_i R a (V - c), sum_i R a (V - c)^2: (N, D); and the mass sum_i R_ij a_i: (N,)
    m1, m2, mass = moments(ra.reshape(slots, -1), it)
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
    return mu_c, var, log_var, lam * _activation_argument(cost.sum(-1), b_a, cfg.activation)


def _activation_argument(cost: Tensor, b_a: Tensor, activation: str) -> Tensor:
    """What ``lambda`` multiplies in ``a_j = logistic(lambda (...))``, from ``cost_j = sum_h cost^h``.

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


def _e_step(quadratic, it: int, mu_c: Tensor, var: Tensor, log_var: Tensor, logit: Tensor, a_in: Tensor, need_r: bool,
            cfg: _Config) -> tuple[Optional[Tensor], Tensor]:
    """E-step of Procedure 1: ``R_ij = a_j p_ij / sum_k a_k p_ik`` over every parent ``k`` of child ``i``.

    Returns ``R`` (None unless ``need_r``) and ``R_ij a_i``, what the next M-step uses: both
    ``(I, B, L, J)``, the product taken with the per-child factor so it costs no extra pass.
    """
    slots, batch, num_patches, types, dim = cfg.shape
    if cfg.truncate_gradient:  # the previous iteration's Gaussians and activations are constants here
        mu_c, var, log_var, logit = mu_c.detach(), var.detach(), log_var.detach(), logit.detach()
    # ln p_ij = -sum_h (V - mu)^2 / (2 sigma^2) - sum_h ln(2 pi sigma^2) / 2, expanded in X = V - c:
    # (V - mu)^2 = X^2 - 2 X (mu - c) + (mu - c)^2, so one read of the votes gives every child's term.
    inv2var = 0.5 / var  # (B, L, J, D)
    # The per-parent terms, plus ln a_j: logsigmoid is the exact ln a_j, finite even where a_j underflows to 0.
    const = -(mu_c.square() * inv2var).sum(-1) - 0.5 * (log_var + _LOG_2PI).sum(-1) + F.logsigmoid(logit)  # (B, L, J)
    u1, u2 = (2.0 * mu_c * inv2var).reshape(-1, dim), (-inv2var).reshape(-1, dim)
    log_ap = quadratic(u1, u2, const.reshape(-1), it).view(slots, batch, num_patches, types)  # ln(a_j p_ij)
    # ln sum_j a_j p_ij within one patch, shifted by the (constant) largest term of each slot; the
    # shifted exponentials are reused for R, so the (I, B, L, J) tensor sees one exp, not two.
    shift = log_ap.detach().amax(dim=-1, keepdim=True)  # (I, B, L, 1)
    e = torch.exp(log_ap - shift)  # (I, B, L, J), at most 1
    per_slot = torch.log(e.sum(-1)) + shift.squeeze(-1)  # (I, B, L); the sum is >= 1
    # ln sum_k a_k p_ik over every parent k of child i: all types in all patches that hold it.
    log_norm = log_child_normaliser(per_slot.permute(1, 2, 0), cfg.geometry).permute(2, 0, 1)
    scale = torch.exp(shift.squeeze(-1) - log_norm).unsqueeze(-1)  # (I, B, L, 1)
    if cfg.detach_intermediate:  # R is a constant, R a still depends on a_i
        r = (e * scale).detach()
        return (r if need_r else None), r * a_in
    r = e * scale if need_r else None  # R_ij = a_j p_ij / sum_k a_k p_ik, (I, B, L, J)
    return r, e * (scale * a_in)  # and R_ij a_i, the per-child factor taken first


def _iteration(moments, quadratic, it: int, prev, a_in: Tensor, beta_a: Tensor, beta_v: Tensor, centre: Tensor, cfg: _Config):
    """Iteration ``it`` of Procedure 1 on the small tensors: the E-step from the previous
    Gaussians ``prev`` (the uniform init when ``it == 0``), then the M-step.

    ``moments`` and ``quadratic`` are the only vote reads. a_in ``(I, B, L, 1)``, beta ``(J,)``
    or ``(L, J)``, centre ``(B, L, J, D)``; returns ``R (I, B, L, J)`` (or a broadcastable init;
    None before the last iteration unless ``cfg.keep_r``, for statistics) and the Gaussians ``(mu - c, sigma^2,
    ln sigma^2, logit)``.
    """
    slots, batch, num_patches, types, dim = cfg.shape
    if it > 0:
        r, ra = _e_step(quadratic, it - 1, *prev, a_in, cfg.keep_r or it == len(cfg.lambdas) - 1, cfg)
    else:
        if cfg.geometry is None:  # Procedure 1 init: R_ij = 1 / (number of parents of child i)
            r = a_in.new_full((slots, 1, num_patches, 1), 1.0 / types)
        else:  # ... = 1 / (J * number of patches that hold child i)
            counts = to_patches(parent_counts(cfg.geometry, like=a_in), cfg.geometry)  # (1, L, I)
            r = rearrange(1.0 / (types * counts), "1 l i -> i 1 l 1")
        ra = r * a_in  # R_ij <- R_ij a_i
    b_a = beta_a if beta_a.dim() == 1 else beta_a.unsqueeze(0)  # (J,) or (1, L, J)
    b_v = (beta_v if beta_v.dim() == 1 else beta_v.unsqueeze(0)).unsqueeze(-1)  # (J, 1) or (1, L, J, 1)
    return r, _m_step(moments, it, ra, b_a, b_v, cfg.lambdas[it], centre, cfg)


def _iteration_stats(r: Tensor, gaussians, cfg: _Config) -> dict[str, float]:
    """What one iteration did, for training logs (see ``stats`` of :func:`em_routing`)."""
    _, var, _, logit = gaussians
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


def _outputs(r: Tensor, gaussians, centre: Tensor, cfg: _Config):
    """``mu (B, L, J, D)``, ``a (B, L, J)`` and ``R (I, B, L, J)`` of the last M-step."""
    mu_c, _, _, logit = gaussians
    return mu_c + centre, torch.sigmoid(logit), r.expand(cfg.shape[:4])


def _factored_centre(poses: Tensor, transforms: Tensor, offsets: Optional[Tensor], shape) -> Tensor:
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


class _EMRoutingFunction(torch.autograd.Function):
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
            centre = _factored_centre(votes, transforms, offsets, cfg.shape)
            reader = _VoteReader(cfg.shape, factors=(votes, transforms, offsets, matrices), centre=centre)
        else:
            flat = votes.view(slots, -1, dim)  # (I, N, D): children outermost, N = (B, L, J)
            centre = flat.mean(0)
            reader = _VoteReader(cfg.shape, centred=flat - centre)
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
            r, gaussians = _iteration(moments, quadratic, it, gaussians, a_in, beta_a, beta_v, centre_view, cfg)
            history.extend(gaussians)
            if stats is not None:
                stats.append(_iteration_stats(r, gaussians, cfg))
        ctx.cfg, ctx.factored = cfg._replace(keep_r=False), factored  # the replay needs no statistics
        ctx.has_offsets, ctx.has_matrices = offsets is not None, matrices is not None
        saved_m = [t for triple in recorded_m for t in triple]
        optional = tuple(t for t in (offsets, matrices) if t is not None)
        sources = (votes, transforms, *optional) if factored else (reader.x,)
        ctx.save_for_backward(*sources, a_in, beta_a, beta_v, centre, *history, *saved_m, *recorded_q)
        return _outputs(r, gaussians, centre_view, cfg)

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
            reader = _VoteReader(cfg.shape, factors=(poses, transforms, offsets, matrices), centre=centre)
        else:
            reader = _VoteReader(cfg.shape, centred=centred)
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
                r, gaussians = _iteration(moments, quadratic, it, prev, *params, centre_view, cfg)
                outputs = _outputs(r, gaussians, centre_view, cfg) if it == iters - 1 else gaussians
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
                reader._compiled_terms(), ctx.needs_input_grad[0], ctx.needs_input_grad[3]
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
    stats: Optional[list] = None,
) -> EMRoutingResult:
    """Route child votes to parent Gaussians with EM (Procedure 1 of Hinton et al. 2018).

    ``R_ij`` starts uniform over each child's actual parents. Each iteration runs the M-step
    (``R_ij <- R_ij a_i``; weighted mean and variance per pose element; ``cost^h = (beta_v +
    log sigma^h) sum_i R_ij``; ``a_j = logistic(lambda (beta_a - sum_h cost^h))``) and, except
    after the last, the E-step (``R_ij = a_j p_ij / sum_k a_k p_ik`` over every parent ``k`` of
    child ``i``, in log space). Gradients flow through every iteration unless
    ``detach_intermediate``; nothing is kept between calls.

    The votes are read once per step in chunks (see :class:`_VoteReader`): the E-step's
    Gaussian is expanded so no ``(B, L, I, J, D)`` temporary is built per iteration, and the
    votes' gradient is accumulated in one pass.

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
        stats: a list to append one dict of floats per iteration to (the instruments for
            training logs): ``a_mean``, ``a_std`` of the parent activations; ``var_floor_fraction``,
            the fraction of parent variances within 1% of ``var_floor``; ``r_entropy``, the mean
            entropy of ``R`` over the ``J`` parent types of each child slot, over ``log J`` (1:
            uniform, 0: one parent); ``logit_p05/p50/p95``, percentiles of the logistic's
            argument ``lambda (...)``. None (default): nothing is measured.

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
    fan_in = dim * children_per_parent(num_patches, slots, types, geometry)
    lambdas = inverse_temperatures(schedule, iterations, final_lambda=final_lambda, fan_in=fan_in)
    if cost_scale is None:
        cost_scale = 100.0 * types / slots if schedule == "authors" else 1.0
    cfg = _Config(lambdas, activation, float(cost_scale), var_floor, eps, detach_intermediate, truncate_gradient, geometry,
                  (slots, batch, num_patches, types, dim), stats is not None)  # fmt: skip
    a_in = rearrange(activations, "b l i -> i b l 1")
    if isinstance(votes, FactoredVotes):
        mu, a_out, r = _EMRoutingFunction.apply(*votes, a_in, beta_a, beta_v, cfg, stats)
    else:
        v = votes.permute(2, 0, 1, 3, 4).contiguous()  # (I, B, L, J, D): children outermost
        mu, a_out, r = _EMRoutingFunction.apply(v, None, None, None, a_in, beta_a, beta_v, cfg, stats)
    return EMRoutingResult(poses=mu, activations=a_out, assignments=rearrange(r, "i b l j -> b l i j"))

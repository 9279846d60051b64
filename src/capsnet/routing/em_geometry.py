"""Where the children of a convolutional capsule layer sit in its patches, for EM routing.

Layout. Votes arrive in *patch layout*: ``L`` patches (one per output position,
``L = 1`` for a fully connected layer), ``I`` child slots per patch and ``J``
parent types per position. In a convolutional layer one child sits in several
overlapping patches; :class:`ConvGeometry` says which. The E-step normaliser of a
child sums over *every* parent of that child, i.e. all ``J`` types at every
position whose receptive field holds the child (the paper: "corner ones
receiving only one feedback per capsule type"). It is computed in patch layout,
scattered back to child positions with ``F.fold`` (col2im) and gathered into
patch layout again with ``F.unfold``: no Python loop over positions.

Axis letters: ``B`` batch, ``L`` patches (output positions), ``I`` child slots per
patch, ``J`` parent types, ``T`` child types, ``H W`` child grid.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._shapes import conv_output_size

__all__ = ["ConvGeometry", "child_sum", "children_per_parent", "log_child_normaliser", "parent_counts", "to_patches"]


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

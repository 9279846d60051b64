"""Random EM routing problems shared by the EM test files (the library's shapes, float64 by default)."""

from __future__ import annotations

import torch

from capsnet.routing.em import ConvGeometry, children_per_parent, to_patches

F64 = torch.float64


def random_problem(geometry: ConvGeometry | None, *, batch=2, types=3, dim=4, seed=0, beta_shape=None, dtype=F64,
                   num_patches=2, slots=5):
    """Random votes, child activations (consistent across the patches that share a child) and betas."""
    gen = torch.Generator().manual_seed(seed)
    if geometry is None:
        act = torch.rand(batch, num_patches, slots, generator=gen, dtype=dtype)
    else:
        num_patches, slots = geometry.num_patches, geometry.slots
        grid = torch.rand(batch, geometry.types, *geometry.in_size, generator=gen, dtype=dtype)
        act = to_patches(grid, geometry)
    votes = torch.randn(batch, num_patches, slots, types, dim, generator=gen, dtype=dtype)
    shape = (types,) if beta_shape is None else beta_shape
    beta_a = torch.randn(shape, generator=gen, dtype=dtype)
    beta_v = torch.randn(shape, generator=gen, dtype=dtype)
    return votes, act, beta_a, beta_v


def fan_in(votes, geometry):
    _, num_patches, slots, types, dim = votes.shape
    return dim * children_per_parent(num_patches, slots, types, geometry)

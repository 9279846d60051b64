"""EM routing on factored votes (``FactoredVotes``: poses x transforms, never multiplied out): equal to the votes multiplied out."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from capsnet.routing.em import (
    ConvGeometry,
    FactoredVotes,
    em_routing,
    to_patches,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _factored_problem(seed=16, offsets=True):
    """Conv-layer-like factors: poses (I, B L, P) @ transforms (I, P, J D) + offsets (I, D)."""
    geometry = ConvGeometry((4, 4), (2, 2), (2, 2), 2)
    gen = torch.Generator().manual_seed(seed)
    batch, types, dim, p = 2, 3, 4, 5
    slots, num_patches = geometry.slots, geometry.num_patches
    poses = torch.randn(slots, batch * num_patches, p, generator=gen, dtype=F64)
    transforms = torch.randn(slots, p, types * dim, generator=gen, dtype=F64)
    off = torch.randn(slots, dim, generator=gen, dtype=F64) if offsets else None
    act = to_patches(torch.rand(batch, 2, 4, 4, generator=gen, dtype=F64), geometry)
    beta_a, beta_v = torch.randn(types, generator=gen, dtype=F64), torch.randn(types, generator=gen, dtype=F64)
    return geometry, FactoredVotes(poses, transforms, off), act, beta_a, beta_v


def _multiply_out(factored, batch, num_patches, types):
    votes = torch.bmm(factored.poses, factored.transforms)  # (I, B L, J D)
    votes = votes.view(votes.shape[0], batch, num_patches, types, -1)
    if factored.offsets is not None:
        votes = votes + factored.offsets[:, None, None, None, :]
    return votes.permute(1, 2, 0, 3, 4)  # (B, L, I, J, D)


def test_factored_votes_equal_multiplied_out_votes_values_and_gradients():
    geometry, factored, act, beta_a, beta_v = _factored_problem()
    poses, transforms = (t.clone().requires_grad_() for t in factored[:2])
    fast = em_routing(FactoredVotes(poses, transforms, factored.offsets), act, beta_a, beta_v, geometry=geometry)
    (fast.poses.sum() + fast.activations.sum()).backward()
    poses2, transforms2 = (t.clone().requires_grad_() for t in factored[:2])
    votes = _multiply_out(FactoredVotes(poses2, transforms2, factored.offsets), 2, geometry.num_patches, 3)
    plain = em_routing(votes, act, beta_a, beta_v, geometry=geometry)
    (plain.poses.sum() + plain.activations.sum()).backward()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(poses.grad, poses2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(transforms.grad, transforms2.grad, rtol=0, atol=1e-10)


def test_gradcheck_factored_votes():
    geometry, factored, act, beta_a, beta_v = _factored_problem(offsets=False)
    inputs = tuple(t.clone().requires_grad_() for t in (factored.poses, factored.transforms, act))

    def fn(p, w, a):
        return tuple(em_routing(FactoredVotes(p, w), a, beta_a, beta_v, geometry=geometry))

    assert gradcheck(fn, inputs, atol=1e-6, fast_mode=True)


def test_factored_votes_of_the_wrong_shape_raise_value_error():
    geometry, factored, act, beta_a, beta_v = _factored_problem()
    with pytest.raises(ValueError, match="factored votes"):
        em_routing(FactoredVotes(factored.poses[:, :-1], factored.transforms), act, beta_a, beta_v, geometry=geometry)
    with pytest.raises(ValueError, match="offsets"):
        em_routing(FactoredVotes(factored.poses, factored.transforms, factored.offsets[:, :2]), act, beta_a, beta_v,
                   geometry=geometry)  # fmt: skip


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_factored_votes_read_in_small_chunks_match_one_chunk(monkeypatch, chunk):
    # Real layers read their votes in many chunks; the test problems fit in one by default.

    geometry, factored, act, beta_a, beta_v = _factored_problem()

    def run():
        poses, transforms = (t.clone().requires_grad_() for t in factored[:2])
        out = em_routing(FactoredVotes(poses, transforms, factored.offsets), act, beta_a, beta_v, geometry=geometry)
        (out.poses.sum() + out.activations.sum()).backward()
        return (*out, poses.grad, transforms.grad)

    whole = run()
    monkeypatch.setattr("capsnet._slabs.EM_CHUNK", chunk)
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_factored_groups_must_hold_whole_children():
    geometry, factored, act, beta_a, beta_v = _factored_problem()
    slots, rows, p = factored.poses.shape
    poses = factored.poses.reshape(slots * 2, rows // 2, p)  # G = 2 I groups: more groups than children
    transforms = factored.transforms.repeat_interleave(2, dim=0)
    with pytest.raises(ValueError, match="whole children"):
        em_routing(FactoredVotes(poses, transforms), act, beta_a, beta_v, geometry=geometry)


def test_grouped_factored_votes_equal_multiplied_out_votes_values_and_gradients():
    """Several children per bmm group (the class layer's shared transforms), with offsets."""
    gen = torch.Generator().manual_seed(17)
    groups, per_group, batch, types, dim, p = 2, 3, 2, 3, 4, 5
    slots = groups * per_group
    poses = torch.randn(groups, per_group * batch, p, generator=gen, dtype=F64, requires_grad=True)
    transforms = torch.randn(groups, p, types * dim, generator=gen, dtype=F64, requires_grad=True)
    offsets = torch.randn(slots, dim, generator=gen, dtype=F64)
    act = torch.rand(batch, 1, slots, generator=gen, dtype=F64)
    beta_a, beta_v = torch.randn(types, generator=gen, dtype=F64), torch.randn(types, generator=gen, dtype=F64)
    fast = em_routing(FactoredVotes(poses, transforms, offsets), act, beta_a, beta_v)
    (fast.poses.sum() + fast.activations.sum()).backward()
    poses2, transforms2 = poses.detach().clone().requires_grad_(), transforms.detach().clone().requires_grad_()
    votes = torch.bmm(poses2, transforms2).view(slots, batch, 1, types, dim) + offsets[:, None, None, None, :]
    plain = em_routing(votes.permute(1, 2, 0, 3, 4), act, beta_a, beta_v)
    (plain.poses.sum() + plain.activations.sum()).backward()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(poses.grad, poses2.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(transforms.grad, transforms2.grad, rtol=0, atol=1e-10)

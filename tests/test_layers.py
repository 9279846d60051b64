"""Capsule layers: PrimaryCaps, DenseCaps votes and the decoder's mask."""

from __future__ import annotations

import pytest
import torch
from reference import reference_squash

from capsnet.layers import CapsuleDecoder, DenseCaps, PrimaryCaps, mask_poses

# --------------------------------------------------------------------------- PrimaryCaps


def test_primary_caps_mnist_output_shape():
    torch.manual_seed(0)
    layer = PrimaryCaps(256)
    u = layer(torch.randn(2, 256, 20, 20))
    assert u.shape == (2, 1152, 8)  # 32 types x 6 x 6 positions, 8-D


def test_primary_caps_output_norms_below_one():
    torch.manual_seed(0)
    layer = PrimaryCaps(256)
    norms = layer(torch.randn(2, 256, 20, 20) * 3).norm(dim=-1)
    assert bool((norms < 1).all()), f"max norm {norms.max().item()}"
    assert bool((norms > 0).all())


def test_primary_caps_orders_capsules_type_major():
    # Capsule index (t, h, w) holds the squashed channels t*D .. t*D + D - 1 at pixel (h, w).
    torch.manual_seed(0)
    layer = PrimaryCaps(3, types=2, dim=4, kernel_size=3, stride=2).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    u = layer(x)  # (B, 2 * 3 * 3, 4)
    conv = layer.conv(x)  # (B, 8, 3, 3)
    for t in range(2):
        for h in range(3):
            for w in range(3):
                expected = reference_squash(conv[:, t * 4 : (t + 1) * 4, h, w])
                torch.testing.assert_close(u[:, t * 9 + h * 3 + w], expected, rtol=0, atol=1e-6)


def test_primary_caps_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="types=0"):
        PrimaryCaps(256, types=0)


# --------------------------------------------------------------------------- DenseCaps


def _dense(*, in_caps=5, in_dim=3, out_caps=4, out_dim=6, **kwargs):
    torch.manual_seed(0)
    return DenseCaps(in_caps, in_dim, out_caps, out_dim, init_std=0.5, **kwargs).double()


def test_dense_caps_votes_equal_explicit_matrix_products():
    layer = _dense()
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    votes = layer.votes(u)  # (B, J, I, D)
    assert votes.shape == (2, 4, 5, 6)
    for b in range(2):
        for i in range(5):
            for j in range(4):
                expected = layer.weight[j, i] @ u[b, i]  # Eq. 2: u_hat_j|i = W_ij u_i
                torch.testing.assert_close(votes[b, j, i], expected, rtol=0, atol=1e-12)


def test_dense_caps_votes_add_the_optional_bias_per_parent():
    layer = _dense(bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.randn_like(layer.bias))
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    without_bias = torch.einsum("jide,bie->bjid", layer.weight, u)
    torch.testing.assert_close(layer.votes(u), without_bias + layer.bias.view(1, 4, 1, 6))


def test_dense_caps_weights_have_no_batch_axis():
    layer = _dense()
    shapes_before = {name: p.shape for name, p in layer.named_parameters()}
    assert shapes_before == {"weight": (4, 5, 6, 3)}  # (J, I, D, in_dim)
    for batch in (1, 7):
        out = layer(torch.randn(batch, 5, 3, dtype=torch.float64))
        assert out.poses.shape == (batch, 4, 6)
        assert {name: p.shape for name, p in layer.named_parameters()} == shapes_before


def test_dense_caps_votes_of_a_sample_depend_only_on_that_sample():
    layer = _dense()
    u = torch.randn(3, 5, 3, dtype=torch.float64)
    perturbed = u.clone()
    perturbed[1] += torch.randn(5, 3, dtype=torch.float64)
    before, after = layer.votes(u), layer.votes(perturbed)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=0, atol=0)
    assert not torch.allclose(after[1], before[1])


def test_dense_caps_routed_poses_of_a_sample_depend_only_on_that_sample():
    layer = _dense()
    u = torch.randn(3, 5, 3, dtype=torch.float64)
    batched = layer(u)
    for b in range(3):
        torch.testing.assert_close(batched.poses[b : b + 1], layer(u[b : b + 1]).poses, rtol=0, atol=1e-12)


def test_dense_caps_rejects_input_of_wrong_shape():
    layer = _dense()
    with pytest.raises(ValueError, match=r"\(B, 5, 3\)"):
        layer(torch.randn(2, 5, 4, dtype=torch.float64))


# --------------------------------------------------------------------------- decoder


def test_mask_poses_zeroes_every_capsule_but_the_chosen_one():
    torch.manual_seed(0)
    poses = torch.randn(3, 10, 16) + 5  # no accidental zeros
    labels = torch.tensor([0, 7, 9])
    masked = mask_poses(poses, labels).view(3, 10, 16)
    for b in range(3):
        for j in range(10):
            if j == labels[b]:
                assert torch.equal(masked[b, j], poses[b, j])
            else:
                assert bool((masked[b, j] == 0).all())


def test_decoder_output_shape_and_range():
    torch.manual_seed(0)
    decoder = CapsuleDecoder(10, 16, (1, 28, 28))
    out = decoder(torch.randn(2, 10, 16), torch.tensor([3, 4]))
    assert out.shape == (2, 1, 28, 28)
    assert bool(((out >= 0) & (out <= 1)).all())  # sigmoid output


def test_decoder_ignores_unchosen_capsules():
    torch.manual_seed(0)
    decoder = CapsuleDecoder(10, 16, (1, 28, 28))
    poses = torch.randn(2, 10, 16)
    labels = torch.tensor([3, 4])
    changed = poses.clone()
    changed[:, [0, 1, 2, 5, 6, 7, 8, 9]] = torch.randn(2, 8, 16)
    torch.testing.assert_close(decoder(changed, labels), decoder(poses, labels), rtol=0, atol=0)

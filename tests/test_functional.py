"""Properties of the pure functions in ``capsnet.functional``: squash, norms and the losses."""

from __future__ import annotations

import pytest
import torch
from reference import reference_margin_loss, reference_squash
from torch.autograd import gradcheck

from capsnet import margin_loss, reconstruction_loss, safe_norm, spread_loss, squash
from capsnet.functional import activation_cross_entropy

DTYPES = [torch.float32, torch.float64]


# --------------------------------------------------------------------------- squash


def test_squash_matches_reference_float64():
    torch.manual_seed(0)
    s = torch.randn(4, 7, 8, dtype=torch.float64) * torch.logspace(-2, 2, 7, dtype=torch.float64).view(1, 7, 1)
    torch.testing.assert_close(squash(s), reference_squash(s), rtol=0, atol=1e-6)


def test_squash_along_non_last_dim_squashes_that_axis():
    torch.manual_seed(0)
    s = torch.randn(3, 8, 5, dtype=torch.float64)  # capsule dimension D = 8 at dim 1
    expected = reference_squash(s.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(squash(s, dim=1), expected, rtol=0, atol=1e-6)


def test_squash_norm_is_below_one_for_moderate_inputs():
    torch.manual_seed(0)
    s = torch.randn(1000, 16) * 10.0  # norms up to ~60
    norms = squash(s).norm(dim=-1)
    assert bool((norms < 1).all()), f"max squashed norm {norms.max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_squash_norm_is_at_most_one_at_huge_inputs(dtype):
    s = torch.full((3, 16), 1e6, dtype=dtype)
    s[1] = -1e6
    s[2, ::2] = 0.0
    norms = squash(s).norm(dim=-1)
    assert bool((norms <= 1).all()), f"squashed norms {norms.tolist()}"
    assert bool((norms > 0.999).all()), f"squashed norms {norms.tolist()}"


def test_squash_norm_grows_monotonically_with_input_norm():
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(16, dtype=torch.float64), dim=0)
    input_norms = torch.logspace(-3, 3, 200, dtype=torch.float64)
    out_norms = squash(input_norms[:, None] * direction).norm(dim=-1)
    assert bool((out_norms[1:] > out_norms[:-1]).all()), "squashed norm must increase with the input norm"


def test_squash_preserves_direction():
    torch.manual_seed(0)
    s = torch.randn(50, 8, dtype=torch.float64) * 3
    v = squash(s)
    cosine = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    torch.testing.assert_close(cosine, torch.ones(50, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, 1e6, -1e6])
def test_squash_values_and_gradients_finite_at_zero_and_huge(dtype, value):
    s = torch.full((2, 3, 8), value, dtype=dtype, requires_grad=True)
    v = squash(s)
    # Distinct upstream weights, non-zero at v = 0, so a 0/0 or inf in the backward would show.
    weights = torch.arange(1, 49, dtype=dtype).view(2, 3, 8)
    (v * weights).sum().backward()
    assert bool(torch.isfinite(v).all())
    assert s.grad is not None and bool(torch.isfinite(s.grad).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_squash_of_zero_is_exactly_zero(dtype):
    assert bool((squash(torch.zeros(2, 8, dtype=dtype)) == 0).all())


# Rounding of a few float operations, relative: squash of float32 / float64 against Eq. 1 in float64.
EQ1_RTOL = {torch.float32: 4 * torch.finfo(torch.float32).eps, torch.float64: 16 * torch.finfo(torch.float64).eps}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [1e-2, 1e-3, 1e-4, 1e-6, 1e-12])
def test_squash_is_eq1_to_rounding_for_short_vectors(dtype, length):
    # An eps added to |s|^2 (1e-8) turned |s| = 1e-4 into 1.4e-4 (29% off) and 1e-6 into 1e-4 (99%).
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    s = (length * direction).to(dtype)
    expected = reference_squash(s)  # Eq. 1 in float64 on the very same (rounded) input
    torch.testing.assert_close(squash(s).double(), expected, rtol=EQ1_RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_squash_gradient_at_zero_is_exactly_zero(dtype):
    # Eq. 1 is |s| s / (1 + |s|^2): second order at 0, so its Jacobian there is 0 (not NaN, not eps-dependent).
    s = torch.zeros(2, 3, 8, dtype=dtype, requires_grad=True)
    weights = torch.arange(1, 49, dtype=dtype).view(2, 3, 8)
    (squash(s) * weights).sum().backward()
    assert bool((s.grad == 0).all()), f"gradient at 0: {s.grad.unique().tolist()}"


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_routing_and_digit_caps_squash_short_vectors_by_eq1(grad):
    # Both routing paths call squash with their own eps; an untrained capsnet_mnist has
    # |s_j| of 3e-3 to 9e-3, where eps = 1e-8 was off by 0.5% or more. With one iteration
    # the coupling is uniform, so s_j = sum_i c_ij u_hat_{j|i} (Eq. 2) with the returned c.
    from capsnet import dynamic_routing
    from capsnet.layers import DenseCaps

    torch.manual_seed(0)
    votes = (torch.randn(2, 6, 3, 8, dtype=torch.float64) * 1e-4).requires_grad_(grad)
    routed = dynamic_routing(votes, 1)
    s = torch.einsum("bij,bijd->bjd", routed.coupling, votes)
    torch.testing.assert_close(routed.poses.detach(), reference_squash(s), rtol=EQ1_RTOL[torch.float64], atol=0)

    layer = DenseCaps(6, 4, 3, 8, iterations=1).double().requires_grad_(grad)
    u = torch.randn(2, 6, 4, dtype=torch.float64) * 1e-2
    routed = layer(u)
    s = torch.einsum("bij,bjid->bjd", routed.coupling, layer.votes(u))
    torch.testing.assert_close(routed.poses.detach(), reference_squash(s), rtol=EQ1_RTOL[torch.float64], atol=0)


def test_squash_gradcheck_float64_at_short_vectors():
    # Lengths 1e-3 .. 1e-1, where the old eps bent the curve; gradcheck's step (1e-6) stays below them.
    torch.manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1) * torch.tensor([1e-3, 1e-2, 3e-2, 1e-1], dtype=torch.float64)[:, None]
    assert gradcheck(squash, (s.requires_grad_(),))


@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_norm_gradient_finite_at_zero(dtype):
    x = torch.zeros(3, 8, dtype=dtype, requires_grad=True)
    n = safe_norm(x)
    n.sum().backward()
    assert bool(torch.isfinite(n).all())
    assert bool(torch.isfinite(x.grad).all())


def test_safe_norm_matches_plain_norm_away_from_zero():
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(safe_norm(x), x.norm(dim=-1), rtol=1e-7, atol=0)


def test_squash_gradcheck_float64():
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(squash, (s,))


# --------------------------------------------------------------------------- margin loss


def test_margin_loss_hand_computed_example():
    lengths = torch.tensor([[0.95, 0.3, 0.05]], dtype=torch.float64)
    # class 0 present: max(0, 0.9 - 0.95)^2 = 0
    # class 1 absent:  0.5 * max(0, 0.3 - 0.1)^2 = 0.5 * 0.04 = 0.02
    # class 2 absent:  0.5 * max(0, 0.05 - 0.1)^2 = 0
    # total 0.02
    loss = margin_loss(lengths, torch.tensor([0]))
    torch.testing.assert_close(loss, torch.tensor(0.02, dtype=torch.float64))


def test_margin_loss_hand_computed_batch_mean():
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.2, 0.0]], dtype=torch.float64)
    # sample 0, label 0: 0 + 0.5 * 0.2^2 + 0                    = 0.02
    # sample 1, label 1: 0.5 * 0.4^2 + (0.9 - 0.2)^2 + 0       = 0.08 + 0.49 = 0.57
    # sum over classes, mean over batch: (0.02 + 0.57) / 2      = 0.295
    loss = margin_loss(lengths, torch.tensor([0, 1]))
    torch.testing.assert_close(loss, torch.tensor(0.295, dtype=torch.float64))


def test_margin_loss_matches_reference():
    torch.manual_seed(0)
    lengths = torch.rand(6, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    torch.testing.assert_close(margin_loss(lengths, labels), reference_margin_loss(lengths, labels), rtol=0, atol=1e-6)


def test_margin_loss_multi_hot_matches_reference():
    torch.manual_seed(0)
    lengths = torch.rand(4, 10, dtype=torch.float64)
    targets = torch.zeros(4, 10, dtype=torch.float64)
    targets[torch.arange(4), torch.tensor([1, 3, 5, 7])] = 1
    targets[torch.arange(4), torch.tensor([2, 4, 6, 8])] = 1
    expected = reference_margin_loss(lengths, targets)
    torch.testing.assert_close(margin_loss(lengths, targets), expected, rtol=0, atol=1e-6)


def test_margin_loss_multi_hot_is_sum_of_one_hot_pieces():
    # Eq. 4 is affine in T: L(e_a + e_b) = L(e_a) + L(e_b) - L(0), where L(0) counts every class as absent.
    torch.manual_seed(0)
    lengths = torch.rand(5, 10, dtype=torch.float64)
    a = torch.tensor([0, 1, 2, 3, 4])
    b = torch.tensor([9, 8, 7, 6, 5])
    multi_hot = torch.nn.functional.one_hot(a, 10) + torch.nn.functional.one_hot(b, 10)
    none = torch.zeros(5, 10, dtype=torch.float64)
    expected = margin_loss(lengths, a) + margin_loss(lengths, b) - margin_loss(lengths, none)
    torch.testing.assert_close(margin_loss(lengths, multi_hot.double()), expected)


def test_margin_loss_gradcheck_float64():
    # Lengths kept away from the kinks of relu at m+ = 0.9 and m- = 0.1.
    lengths = torch.tensor([[0.3, 0.05, 0.6, 0.95], [0.5, 0.2, 0.02, 0.7]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, 0])
    assert gradcheck(lambda x: margin_loss(x, labels), (lengths,))


@pytest.mark.parametrize("bad", [-1, 10])
def test_margin_loss_rejects_out_of_range_labels(bad):
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        margin_loss(torch.rand(2, 10), torch.tensor([0, bad]))


def test_margin_loss_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        margin_loss(torch.rand(2, 10), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("shape", [(10,), (2, 10, 1)])
def test_margin_loss_rejects_lengths_that_are_not_2d(shape):
    with pytest.raises(ValueError, match=r"\(B, J\)"):
        margin_loss(torch.rand(shape), torch.tensor([0, 1]))


def test_margin_loss_rejects_multi_hot_of_wrong_shape():
    with pytest.raises(ValueError, match=r"\(2, 10\)"):
        margin_loss(torch.rand(2, 10), torch.zeros(2, 9))


@pytest.mark.parametrize("n_labels", [1, 3])
def test_margin_loss_rejects_labels_whose_batch_differs(n_labels):
    # One label for a batch of two must not broadcast silently to both samples.
    with pytest.raises(ValueError):
        margin_loss(torch.rand(2, 10), torch.zeros(n_labels, dtype=torch.long))


# --------------------------------------------------------------------------- reconstruction loss


def test_reconstruction_loss_hand_computed_example():
    images = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    recon = torch.tensor([[[[0.1, 0.2], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    # image 0: 0.1^2 + 0.2^2 = 0.05; image 1: 4 * 1^2 = 4
    # mean over batch (0.05 + 4) / 2 = 2.025; times 0.0005 = 0.0010125
    torch.testing.assert_close(reconstruction_loss(recon, images), torch.tensor(0.0010125, dtype=torch.float64))


def test_reconstruction_loss_is_weighted_sum_of_squares_mean_over_batch():
    torch.manual_seed(0)
    recon, images = torch.rand(3, 1, 28, 28, dtype=torch.float64), torch.rand(3, 1, 28, 28, dtype=torch.float64)
    per_image = [((recon[b] - images[b]) ** 2).sum() for b in range(3)]
    expected = 0.0005 * sum(per_image) / 3
    torch.testing.assert_close(reconstruction_loss(recon, images), expected)


def test_reconstruction_loss_accepts_flat_reconstruction():
    torch.manual_seed(0)
    recon, images = torch.rand(2, 784, dtype=torch.float64), torch.rand(2, 1, 28, 28, dtype=torch.float64)
    expected = reconstruction_loss(recon.view(2, 1, 28, 28), images)
    torch.testing.assert_close(reconstruction_loss(recon, images), expected)


def test_reconstruction_loss_gradcheck_float64():
    torch.manual_seed(0)
    recon = torch.rand(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    images = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    assert gradcheck(lambda r: reconstruction_loss(r, images), (recon,))


@pytest.mark.parametrize("recon_shape", [(3, 1, 28, 28), (2, 1, 27, 28)])
def test_reconstruction_loss_rejects_mismatched_shapes(recon_shape):
    with pytest.raises(ValueError, match="same pixels per sample"):
        reconstruction_loss(torch.rand(recon_shape), torch.rand(2, 1, 28, 28))


# --------------------------------------------------------------------------- spread loss


def test_spread_loss_hand_computed_example():
    activations = torch.tensor([[0.8, 0.5, 0.1]], dtype=torch.float64)
    # target 0, margin 0.4: class 1: max(0, 0.4 - (0.8 - 0.5))^2 = 0.1^2 = 0.01
    #                       class 2: max(0, 0.4 - (0.8 - 0.1))^2 = 0
    loss = spread_loss(activations, torch.tensor([0]), margin=0.4)
    torch.testing.assert_close(loss, torch.tensor(0.01, dtype=torch.float64))


def test_spread_loss_gradcheck_float64():
    # a_t - a_i kept away from the margin 0.5, where relu has its kink.
    activations = torch.tensor([[0.9, 0.6, 0.1, 0.7], [0.2, 0.3, 0.95, 0.05]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2])
    assert gradcheck(lambda a: spread_loss(a, labels, margin=0.5), (activations,))


def test_spread_loss_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        spread_loss(torch.rand(2, 5), torch.tensor([0, 5]), margin=0.2)


def test_spread_loss_rejects_activations_that_are_not_2d():
    with pytest.raises(ValueError, match=r"\(B, J\)"):
        spread_loss(torch.rand(2, 5, 1), torch.tensor([0, 1]), margin=0.2)


def test_spread_loss_rejects_labels_whose_batch_differs():
    with pytest.raises(ValueError):
        spread_loss(torch.rand(2, 5), torch.zeros(1, dtype=torch.long), margin=0.2)


def test_squash_and_safe_norm_of_zero_are_finite_in_float16():
    # eps = 1e-8 is 0 in float16: the norm's guard must be raised to a representable value.
    s = torch.zeros(3, 4, dtype=torch.float16, requires_grad=True)
    v = squash(s)
    v.sum().backward()
    assert torch.isfinite(v).all() and (v == 0).all() and torch.isfinite(s.grad).all()
    s.grad = None
    n = safe_norm(s)
    n.sum().backward()
    assert torch.isfinite(n).all() and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- activation cross-entropy (EM option)


def test_activation_cross_entropy_is_cross_entropy_on_the_logistic_logits_float64():
    torch.manual_seed(0)
    z = (4 * torch.randn(6, 10, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 3, 9, 1, 1, 5])
    ours = activation_cross_entropy(torch.sigmoid(z), labels)
    ref = -sum(torch.log(torch.exp(z[b, labels[b]]) / torch.exp(z[b]).sum()) for b in range(6)) / 6  # the definition
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert abs(ours.item() - ref.item()) < 1e-12 and torch.allclose(g_ours, g_ref, atol=1e-12, rtol=0)
    a = torch.sigmoid(torch.randn(6, 10, dtype=torch.float64)).requires_grad_()  # away from 0 and 1, where 1e-6 steps are steep
    assert gradcheck(lambda a: activation_cross_entropy(a, labels), (a,))


def test_activation_cross_entropy_stays_finite_where_activations_saturate():
    a = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]], requires_grad=True)  # float32 sigmoid of +-100
    loss = activation_cross_entropy(a, torch.tensor([1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and loss > 50 and torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match=r"must be \(B, J\)"):
        activation_cross_entropy(torch.rand(2, 3, 1), torch.tensor([0, 1]))

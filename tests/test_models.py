"""Registered models: paper parameter counts, forward shapes, gradients and boundary checks."""

from __future__ import annotations

import pytest
import torch

import capsnet
from capsnet import create_model, list_models, margin_loss, reconstruction_loss
from capsnet.models import CapsNet, CapsNetOutput


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def mnist_model() -> CapsNet:
    torch.manual_seed(0)
    model = create_model("capsnet_mnist").eval()
    with torch.no_grad():
        # Class capsules of length ~0.05 instead of ~5e-4 at initialisation, so that decoding
        # a different capsule visibly changes the reconstruction.
        model.digits.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def mnist_batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 1, 28, 28)


def _tiny_with_long_capsules(**overrides) -> CapsNet:
    """capsnet_tiny with DigitCaps weights x100: class capsules of length ~0.1 and a routing that
    visibly moves the coupling (at initialisation they are ~1e-5 long and routing barely acts)."""
    torch.manual_seed(0)
    model = create_model("capsnet_tiny", **overrides).eval()
    with torch.no_grad():
        model.digits.weight.mul_(100)
    return model


@pytest.fixture(scope="module")
def tiny_model() -> CapsNet:
    return _tiny_with_long_capsules()


# --------------------------------------------------------------------------- parameter counts


def test_capsnet_mnist_has_the_papers_parameter_count():
    assert _n_params(create_model("capsnet_mnist")) == 8_215_568  # Sabour et al. 2017: 8.2M


def test_capsnet_mnist_without_decoder_has_the_papers_parameter_count():
    assert _n_params(create_model("capsnet_mnist", decoder=False)) == 6_804_224  # 6.8M


def test_capsnet_mnist_class_bias_adds_one_bias_per_class_dimension():
    assert _n_params(create_model("capsnet_mnist", class_bias=True)) == 8_215_728  # official code: +10 x 16


# --------------------------------------------------------------------------- every registered model


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CapsNet: margin + reconstruction loss; any other model: the sum of its output's first field."""
    if isinstance(model, CapsNet):
        out = model(x, y)
        loss = margin_loss(out.lengths, y)
        if out.reconstruction is not None:
            loss = loss + reconstruction_loss(out.reconstruction, x)
        return loss
    out = model(x)
    first = out[0] if isinstance(out, (tuple, list)) else out
    return first.sum()


# Every registered model is kept; the full-size EM models are marked slow so `-m "not slow"` can drop them.
_ALL_MODELS = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("em_full") else n for n in list_models()]


@pytest.mark.parametrize("name", _ALL_MODELS)
def test_registered_model_runs_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = create_model(name)
    for attr in ("in_channels", "image_size"):
        if not hasattr(model, attr):
            pytest.skip(f"{name} has no `{attr}` attribute, so its input shape is unknown to this test")
    model.train()
    x = torch.rand(2, model.in_channels, model.image_size, model.image_size)
    y = torch.tensor([3, 7]) % getattr(model, "num_classes", 10)

    loss = _loss(model, x, y)
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    loss.backward()

    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"{name}: parameter {pname} has a non-finite gradient"
        assert bool((p.grad != 0).any()), f"{name}: parameter {pname} has an all-zero gradient"


# --------------------------------------------------------------------------- forward outputs


def test_capsnet_mnist_output_shapes(mnist_model, mnist_batch):
    with torch.no_grad():
        out = mnist_model(mnist_batch)
    assert isinstance(out, CapsNetOutput)
    assert out.lengths.shape == (2, 10)
    assert out.poses.shape == (2, 10, 16)
    assert out.reconstruction.shape == (2, 1, 28, 28)
    assert out.coupling.shape == (2, 1152, 10)
    assert out.primary.shape == (2, 1152, 8)


def test_capsnet_lengths_are_below_one(mnist_model, mnist_batch):
    with torch.no_grad():
        out = mnist_model(mnist_batch)
    assert bool((out.lengths > 0).all() and (out.lengths < 1).all())


def test_capsnet_lengths_are_the_norms_of_the_poses_at_initialisation(mnist_batch):
    # CapsNetOutput documents lengths as |v_j|. Freshly initialised class capsules are short
    # (~1e-5 in capsnet_tiny), so an eps-guarded norm that floors at sqrt(eps) = 1e-4 would show here.
    torch.manual_seed(0)
    model = create_model("capsnet_tiny").eval()
    with torch.no_grad():
        out = model(mnist_batch)
    torch.testing.assert_close(out.lengths, out.poses.norm(dim=-1), rtol=1e-3, atol=1e-7)


def test_capsnet_coupling_sums_to_one_over_classes(tiny_model, mnist_batch):
    with torch.no_grad():
        out = tiny_model(mnist_batch)
    torch.testing.assert_close(out.coupling.sum(dim=2), torch.ones(out.coupling.shape[:2]))


def test_capsnet_without_decoder_returns_no_reconstruction():
    torch.manual_seed(0)
    model = create_model("capsnet_tiny", decoder=False).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.reconstruction is None
    with pytest.raises(ValueError, match="decoder=False"):
        model.reconstruct(out.poses, torch.tensor([0, 1]))


def test_capsnet_eval_without_labels_masks_by_longest_capsule(mnist_model, mnist_batch):
    with torch.no_grad():
        out = mnist_model(mnist_batch)
        longest = out.lengths.argmax(dim=1)
        expected = mnist_model.reconstruct(out.poses, longest)
        other = mnist_model.reconstruct(out.poses, (longest + 1) % 10)
    torch.testing.assert_close(out.reconstruction, expected, rtol=0, atol=0)
    # The decoder must actually depend on which capsule is kept, or the check above proves nothing.
    assert (other - expected).abs().max() > 1e-5


def test_capsnet_with_labels_masks_by_the_given_labels(mnist_model, mnist_batch):
    with torch.no_grad():
        unlabelled = mnist_model(mnist_batch)
        labels = (unlabelled.lengths.argmax(dim=1) + 1) % 10  # never the longest capsule
        out = mnist_model(mnist_batch, labels)
        expected = mnist_model.reconstruct(out.poses, labels)
    torch.testing.assert_close(out.reconstruction, expected, rtol=0, atol=0)
    assert (out.reconstruction - unlabelled.reconstruction).abs().max() > 1e-5


def test_capsnet_forward_is_independent_per_sample(tiny_model):
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        batched = tiny_model(x)
        single = tiny_model(x[1:2])
    torch.testing.assert_close(batched.poses[1:2], single.poses, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched.coupling[1:2], single.coupling, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- boundary checks


def _images_with_one_pixel(value: float) -> torch.Tensor:
    x = torch.rand(2, 1, 28, 28)
    x[1, 0, 5, 5] = value
    return x



@pytest.mark.parametrize(
    ("x", "message"),
    [
        pytest.param(torch.rand(2, 28, 28), r"\(B, 1, 28, 28\).*\(2, 28, 28\)", id="three-dims"),
        pytest.param(torch.rand(1, 2, 1, 28, 28), r"\(B, 1, 28, 28\).*\(1, 2, 1, 28, 28\)", id="five-dims"),
        pytest.param(torch.rand(2, 3, 28, 28), r"1 channel.*\(2, 3, 28, 28\)", id="channels"),
        pytest.param(torch.rand(2, 1, 32, 32), r"28x28.*\(2, 1, 32, 32\)", id="spatial-size"),
        pytest.param(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), r"floating.*uint8", id="integer-dtype"),
        pytest.param(_images_with_one_pixel(float("nan")), r"1 NaN or infinite", id="nan"),
        pytest.param(_images_with_one_pixel(float("inf")), r"1 NaN or infinite", id="inf"),
    ],
)
def test_capsnet_rejects_bad_images_with_informative_message(tiny_model, x, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(x)


@pytest.mark.parametrize(
    ("y", "message"),
    [
        pytest.param(torch.tensor([0, 10]), r"\[0, 9\].*max 10", id="too-large"),
        pytest.param(torch.tensor([-1, 3]), r"\[0, 9\].*min -1", id="negative"),
        pytest.param(torch.tensor([0, 1, 2]), r"\(2,\).*\(3,\)", id="wrong-batch"),
        pytest.param(torch.tensor([[0], [1]]), r"\(2,\).*\(2, 1\)", id="two-dims"),
        pytest.param(torch.tensor([0.0, 1.0]), r"integer.*float32", id="float-dtype"),
    ],
)
def test_capsnet_rejects_bad_labels_with_informative_message(tiny_model, mnist_batch, y, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(mnist_batch, y)


# --------------------------------------------------------------------------- registry


def test_list_models_includes_the_paper_model():
    assert "capsnet_mnist" in list_models()
    assert list_models() == sorted(list_models())


def test_create_model_with_unknown_name_lists_registered_models():
    with pytest.raises(ValueError, match="no_such_model") as info:
        create_model("no_such_model")
    for name in list_models():
        assert name in str(info.value)


def test_register_model_refuses_a_duplicate_name():
    def capsnet_mnist(**overrides):  # same name as the registered paper model
        return CapsNet(**overrides)

    with pytest.raises(ValueError, match="capsnet_mnist"):
        capsnet.register_model(capsnet_mnist)


def test_create_model_overrides_reach_the_model():
    one = _tiny_with_long_capsules(routing_iterations=1)
    three = _tiny_with_long_capsules()
    assert torch.equal(one.digits.weight, three.digits.weight)
    assert one.digits.iterations == 1
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        coupling_one, coupling_three = one(x).coupling, three(x).coupling
    # One routing iteration leaves the coupling at its uniform start 1 / J; the default three move it.
    torch.testing.assert_close(coupling_one, torch.full_like(coupling_one, 0.1))
    assert (coupling_three - 0.1).abs().max() > 1e-3


def test_create_model_overrides_change_the_architecture():
    model = create_model("capsnet_mnist", image_size=36)  # MultiMNIST: 10 x 10 x 32 primary capsules
    assert model.num_primary == 3200
    assert _n_params(model) == 11_361_808  # Sabour et al. 2017: 11.36M

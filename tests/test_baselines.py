"""The paper's baseline CNNs (Sabour et al. 2017, Sec. 5, 5.2 and 6): parameter counts, shapes, gradients."""

from __future__ import annotations

import pytest
import torch

from capsnet import create_model
from capsnet.models.baselines import BaselineCNN, CNNOutput


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("cnn_mnist", 35_445_522),  # the paper's 35.4M (SAME padding, no pooling)
        ("cnn_multimnist", 24_563_978),  # the paper's 24.56M (SAME padding)
        ("cnn_affine", 6_728_466),  # ours: capsnet_mnist without decoder has 6,804,224
    ],
)
def test_parameter_counts(name, count):
    assert _n_params(create_model(name)) == count


def test_multimnist_baseline_with_the_official_codes_first_kernel():
    assert _n_params(create_model("cnn_multimnist", kernels=(5, 5))) == 24_535_306


def test_cnn_affine_is_close_to_capsnet_without_its_decoder():
    capsnet = _n_params(create_model("capsnet_mnist", decoder=False))
    assert abs(_n_params(create_model("cnn_affine")) / capsnet - 1) < 0.02


@pytest.mark.parametrize(("name", "size"), [("cnn_mnist", 28), ("cnn_multimnist", 36), ("cnn_affine", 40)])
def test_forward_shape_and_every_parameter_gets_a_gradient(name, size):
    torch.manual_seed(0)
    model = create_model(name)
    assert (model.in_channels, model.image_size, model.num_classes) == (1, size, 10)
    out = model(torch.rand(2, 1, size, size), torch.tensor([3, 7]))
    assert isinstance(out, CNNOutput) and out.logits.shape == (2, 10)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([3, 7])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and bool((p.grad != 0).any()), pname


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = create_model("cnn_mnist", channels=(4, 4, 4), hidden=(32, 32))
    x = torch.rand(2, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    no_dropout = create_model("cnn_multimnist", channels=(4, 4), hidden=(8,))  # the official code has none
    assert not any(isinstance(m, torch.nn.Dropout) for m in no_dropout.modules())


def test_max_pools_halve_the_grid():
    model = create_model("cnn_affine", hidden=(8, 8))
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2
    first_fc = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert first_fc.in_features == 128 * 10 * 10  # 40 -> 20 -> 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kernels=(4, 5, 5)), r"odd kernel sizes.*\(4, 5, 5\)"),
        (dict(channels=(8, 8)), r"one entry per convolution, got 2, 3 and 3"),
        (dict(dropout=1.0), r"\[0, 1\).*1.0"),
        (dict(image_size=1, pool=(True, True, True)), r"too small"),
    ],
)
def test_bad_hyper_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BaselineCNN(**kwargs)


def test_bad_input_is_named():
    model = create_model("cnn_multimnist", channels=(4, 4), hidden=(8,))
    with pytest.raises(ValueError, match=r"36x36.*\(2, 1, 28, 28\)"):
        model(torch.rand(2, 1, 28, 28))

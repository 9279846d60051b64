"""capsnet.backends: process-wide speed choices that leave results (and checkpoints) alone."""

from __future__ import annotations

import pytest
import torch

import capsnet.backends
from capsnet.layers import Conv2d
from capsnet.models import create_model
from capsnet.ops import conv as conv_module


@pytest.fixture
def dft_calls(monkeypatch):
    """Count the calls that reach the DFT algorithm."""
    calls = []
    real = conv_module.dft_conv2d

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_module, "dft_conv2d", spy)
    return calls


@pytest.fixture(autouse=True)
def _backend_restored():
    """Every test leaves the process-wide settings as it found them, whatever it asserts."""
    saved = capsnet.backends.conv.algorithm, capsnet.backends.conv.weight_grad
    yield
    capsnet.backends.conv._algorithm, capsnet.backends.conv._weight_grad = saved


def test_defaults_are_todays_choices():
    assert (capsnet.backends.conv.algorithm, capsnet.backends.conv.weight_grad) == ("auto", "auto")
    assert Conv2d(1, 8, 9).weight_grad == "im2col" and Conv2d(256, 8, 9).weight_grad == "conv"
    assert Conv2d(1, 8, 9).algorithm == "auto"


def test_flags_choose_the_algorithm_inside_the_block_only(dft_calls):
    primary = Conv2d(256, 256, 9, stride=2)  # PrimaryCaps: "auto" takes the DFT from batch 25
    batch = torch.empty(128, 256, 20, 20)
    assert primary._use_dft(batch)
    with capsnet.backends.conv.flags(algorithm="direct"):
        assert primary.algorithm == "direct" and not primary._use_dft(batch)
    assert primary._use_dft(batch) and capsnet.backends.conv.algorithm == "auto", "restored after the block"
    torch.manual_seed(0)
    small, x = Conv2d(3, 4, 3), torch.randn(2, 3, 7, 7)  # "auto" never takes the DFT here
    direct = small(x)
    assert not dft_calls
    with capsnet.backends.conv.flags(algorithm="dft"):
        by_dft = small(x)
    assert len(dft_calls) == 1
    torch.testing.assert_close(by_dft, direct, rtol=1e-4, atol=1e-5)  # the same result, up to float32 rounding


def test_flags_are_restored_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with capsnet.backends.conv.flags(algorithm="dft", weight_grad="native"):
            raise RuntimeError("inside")
    assert (capsnet.backends.conv.algorithm, capsnet.backends.conv.weight_grad) == ("auto", "auto")


def test_a_layers_own_choice_wins_over_the_backend(dft_calls):
    torch.manual_seed(0)
    pinned = Conv2d(32, 32, 9, stride=2, algorithm="direct")
    pinned(torch.randn(32, 32, 20, 20))
    assert not dft_calls
    with capsnet.backends.conv.flags(algorithm="dft"):
        pinned(torch.randn(32, 32, 20, 20))
        assert not dft_calls and pinned.algorithm == "direct"
        # an explicit weight gradient is a choice of the direct algorithm, the backend's DFT or not
        assert Conv2d(32, 32, 9, stride=2, weight_grad="conv").algorithm == "direct"
    with capsnet.backends.conv.flags(weight_grad="native"):
        assert Conv2d(1, 8, 9).weight_grad == "native" and Conv2d(1, 8, 9, weight_grad="im2col").weight_grad == "im2col"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(algorithm="fft"), "algorithm must be one of"),
        (dict(weight_grad="magic"), "weight_grad must be one of"),
        (dict(algorithm="dft", weight_grad="conv"), "is a choice of the direct algorithm"),
    ],
)
def test_bad_choices_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        with capsnet.backends.conv.flags(**kwargs):
            pass
    with pytest.raises(ValueError, match=message):
        Conv2d(1, 8, 3, **kwargs)
    assert (capsnet.backends.conv.algorithm, capsnet.backends.conv.weight_grad) == ("auto", "auto")


def test_attributes_refuse_bad_values_and_bad_combinations():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        capsnet.backends.conv.algorithm = "fft"
    with capsnet.backends.conv.flags(algorithm="dft"):
        with pytest.raises(ValueError, match="is a choice of the direct algorithm"):
            capsnet.backends.conv.weight_grad = "conv"
    assert (capsnet.backends.conv.algorithm, capsnet.backends.conv.weight_grad) == ("auto", "auto")
    layer = Conv2d(1, 8, 3)
    layer.algorithm = "direct"
    assert layer.algorithm == "direct"
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        layer.weight_grad = "magic"


def test_models_follow_the_backend_and_old_keywords_still_build():
    """Configs and checkpoints that name conv_algorithm / conv_weight_grad still build their model."""
    model = create_model("capsnet_tiny")
    assert model.conv1._algorithm is None and model.primary.conv._weight_grad is None
    pinned = create_model("capsnet_tiny", conv_algorithm="direct", conv_weight_grad="native")
    assert pinned.conv1.algorithm == "direct" and pinned.primary.conv.weight_grad == "native"
    assert model.state_dict().keys() == pinned.state_dict().keys()
    x = torch.rand(2, model.in_channels, model.image_size, model.image_size)
    pinned.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(pinned(x).lengths, model(x).lengths, rtol=1e-5, atol=1e-6)

"""Mixed precision (``torch.autocast``): routing stays float32, training runs and resumes.

Run on CPU autocast here (bfloat16 and float16); ``tests/test_cuda.py`` repeats the
training step on a GPU when one is present.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from capsnet import dynamic_routing
from capsnet.layers import DenseCaps
from capsnet.layers.matrix import ConvMatCaps, PrimaryMatCaps
from capsnet.models import create_model
from capsnet.train import TrainConfig, train
from capsnet.train.checkpoint import load_checkpoint

LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW)
def test_dense_caps_routes_in_float32_under_autocast(dtype):
    """Same float32 input: the layer's result under autocast is its float32 result, bit for bit."""
    layer = DenseCaps(12, 4, 3, 5)
    u = torch.randn(2, 12, 4)
    expected = layer(u)
    with torch.autocast("cpu", dtype=dtype):
        got = layer(u)
        low = layer(u.to(dtype))  # a half-precision input (a layer below under autocast) is widened
    assert got.poses.dtype == got.coupling.dtype == low.poses.dtype == torch.float32
    assert torch.equal(got.poses, expected.poses) and torch.equal(got.coupling, expected.coupling)
    torch.testing.assert_close(low.poses, layer(u.to(dtype).float()).poses, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_dynamic_routing_function_under_autocast(dtype):
    votes = torch.randn(2, 6, 3, 4)
    with torch.autocast("cpu", dtype=dtype):
        got = dynamic_routing(votes.to(dtype))
    assert got.poses.dtype == torch.float32
    torch.testing.assert_close(got.poses, dynamic_routing(votes.to(dtype).float()).poses, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_matrix_capsules_route_in_float32_under_autocast(dtype):
    primary, caps = PrimaryMatCaps(8, 4), ConvMatCaps(4, 3, kernel_size=3, stride=1)
    x = torch.randn(2, 8, 5, 5)
    inputs = primary(x)
    expected = caps(inputs.poses, inputs.activations)
    with torch.autocast("cpu", dtype=dtype):
        got = caps(inputs.poses, inputs.activations)
        low = caps(inputs.poses.to(dtype), inputs.activations.to(dtype))
    assert got.poses.dtype == got.activations.dtype == low.poses.dtype == torch.float32
    assert torch.equal(got.poses, expected.poses) and torch.equal(got.activations, expected.activations)
    assert torch.isfinite(low.poses).all() and torch.isfinite(low.activations).all()


def test_whole_models_give_float32_outputs_and_finite_gradients_under_bf16():
    for name, kwargs in (("capsnet_tiny", {}), ("em_tiny", {})):
        model = create_model(name, **kwargs)
        size = model.image_size
        x = torch.rand(3, model.in_channels, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, torch.tensor([0, 1, 2]))
        head = out.lengths if name == "capsnet_tiny" else out.activations
        assert head.dtype == torch.float32, name
        head.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), name


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_resumes_bit_identically(tmp_path, amp):
    """With amp (and fp16's loss scaler) a resumed run equals the straight one."""
    straight = TrainConfig(**TINY, amp=amp, max_steps=6)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "a", progress=False, final_test=False)
    train(TrainConfig(**TINY, amp=amp, max_steps=3), data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False)
    train(straight, data_root=tmp_path, out_dir=tmp_path / "b", progress=False, final_test=False, resume=True)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    for name, tensor in a["model"].items():
        assert torch.isfinite(tensor).all() and torch.equal(tensor, b["model"][name]), name
    if amp == "fp16":
        assert a["scaler"]["scale"] == b["scaler"]["scale"] and a["scaler"]["_growth_tracker"] == b["scaler"]["_growth_tracker"]
    else:
        assert a["scaler"] == {}, "no loss scaling for bfloat16"


def test_amp_config_is_checked():
    with pytest.raises(ValueError, match="'amp' must be one of"):
        TrainConfig(amp="fp32")

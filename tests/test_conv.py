"""``capsnet.layers.Conv2d`` against ``torch.nn.functional.conv2d``.

The layer computes PyTorch's convolution with a different weight gradient on CPU (a
convolution over the batch, or a matmul over ``unfold``-ed columns). Values, first and
second derivatives must equal ``F.conv2d``'s in float64, for strides, paddings, kernel
shapes, with and without bias, and whichever inputs require gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from capsnet.layers import Conv2d
from capsnet.models import create_model
from capsnet.ops.conv import _Conv2d

# (in_channels, out_channels, kernel, stride, padding, input side)
SHAPES = [(3, 4, 3, 2, 1, 9), (2, 5, 3, 1, 0, 7), (3, 4, (4, 3), (3, 2), (2, 1), 10), (1, 6, 5, 2, 0, 11), (4, 3, 9, 2, 0, 20)]
STRATEGIES = ["conv", "im2col"]
TOL = dict(rtol=1e-10, atol=1e-10)


def _layer(shape, strategy, bias=True):
    c_in, c_out, kernel, stride, padding, _ = shape
    return Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias, weight_grad=strategy).double()


def _input(shape, batch=3, requires_grad=True):
    side = shape[-1]
    return torch.randn(batch, shape[0], side, side + 1, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_conv2d(shape, strategy, bias):
    layer = _layer(shape, strategy, bias)
    x = _input(shape)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_Conv2dBackward", "the fast path, not nn.Conv2d's"
    ref = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
    torch.testing.assert_close(out, ref, **TOL)
    upstream = torch.randn_like(ref)
    wanted = [x, layer.weight] + ([layer.bias] if bias else [])
    got = torch.autograd.grad(out, wanted, upstream)
    expected = torch.autograd.grad(ref, wanted, upstream)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_input_without_gradient(strategy):
    """The model's Conv1: the images need no gradient; only the weights get one."""
    shape = SHAPES[3]
    layer = _layer(shape, strategy)
    x = _input(shape, requires_grad=False)
    layer(x).square().sum().backward()
    ref = _layer(shape, "native")
    ref.load_state_dict(layer.state_dict())
    ref(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **TOL)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, **TOL)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_gradcheck_and_second_order(shape, strategy):
    layer = _layer(shape, strategy)
    x = _input(shape, batch=2)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def fn(x, weight, bias):
        return _Conv2d.apply(x, weight, bias, layer.stride, layer.padding, strategy)

    assert gradcheck(fn, (x, weight, bias))
    assert gradgradcheck(fn, (x, weight, bias))


def test_auto_strategy_and_bad_name():
    assert Conv2d(1, 256, 9).weight_grad == "im2col"  # Conv1: 81 rows per column
    assert Conv2d(256, 256, 9, stride=2).weight_grad == "conv"  # PrimaryCaps
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        Conv2d(1, 2, 3, weight_grad="fast")


def test_no_grad_and_functorch_paths_match():
    layer = _layer(SHAPES[0], "im2col")
    x = _input(SHAPES[0], requires_grad=False)
    ref = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, **TOL)
    per_sample = torch.func.vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(per_sample, ref, **TOL)


def test_wrong_channels_get_pytorch_message():
    with pytest.raises(RuntimeError, match="channels"):
        Conv2d(3, 4, 3)(torch.randn(1, 2, 8, 8))


def test_capsnet_gradients_do_not_depend_on_strategy():
    """The paper model with its fast convolutions trains exactly like nn.Conv2d's (float64)."""
    grads = {}
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([3, 7])
    for strategy in ("native", "auto"):
        torch.manual_seed(0)
        model = create_model("capsnet_tiny", conv_weight_grad=strategy).double()
        out = model(x, y)
        (out.lengths.sum() + out.reconstruction.sum()).backward()
        grads[strategy] = {name: p.grad for name, p in model.named_parameters()}
    assert grads["native"].keys() == grads["auto"].keys()
    for name in grads["native"]:
        torch.testing.assert_close(grads["auto"][name], grads["native"][name], **TOL, msg=name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_several_slabs_channels_last_and_empty_batches(monkeypatch, strategy):
    """Slabs of channels smaller than C (as PrimaryCaps at batch 128), the input gradient in chunks
    of images, channels-last input, batch 0."""
    monkeypatch.setattr("capsnet._slabs.CONV_SLAB", 500)  # 2 channels per slab, 1 image per chunk here
    shape = SHAPES[4]
    layer = _layer(shape, strategy)
    for x in (_input(shape), _input(shape).detach().to(memory_format=torch.channels_last).requires_grad_()):
        out = layer(x)
        ref = F.conv2d(x, layer.weight, layer.bias, layer.stride)
        torch.testing.assert_close(out, ref, **TOL)
        got = torch.autograd.grad(out.square().sum(), [x, layer.weight])
        expected = torch.autograd.grad(ref.square().sum(), [x, layer.weight])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL)
    empty = torch.zeros(0, shape[0], 20, 20, dtype=torch.float64, requires_grad=True)
    assert layer(empty).shape == (0, shape[1], 6, 6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autocast_uses_pytorchs_convolution(strategy):
    """Under CPU autocast the layer is nn.Conv2d: bfloat16 output, float32 gradients."""
    layer = Conv2d(4, 6, 3, stride=2, weight_grad=strategy)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("algorithm", ["auto", "direct", "dft"])
def test_functional_conv2d_is_the_layers_computation(algorithm):
    """``capsnet.ops.conv.conv2d`` owns the per-call choice: the layer's values and gradients bit for bit, and F.conv2d's in float64."""
    from capsnet.ops.conv import conv2d

    torch.manual_seed(0)
    layer = Conv2d(3, 4, 3, stride=2, padding=1, algorithm=algorithm).double()
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    by_layer = layer(x)
    (gx_layer,) = torch.autograd.grad(by_layer.square().sum(), x)
    by_function = conv2d(x, layer.weight, layer.bias, 2, 1, algorithm=algorithm)
    (gx_function,) = torch.autograd.grad(by_function.square().sum(), x)
    assert torch.equal(by_function, by_layer) and torch.equal(gx_function, gx_layer)
    torch.testing.assert_close(by_function, F.conv2d(x, layer.weight, layer.bias, 2, 1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="conv2d: algorithm must be one of"):
        conv2d(x, layer.weight, algorithm="fft")

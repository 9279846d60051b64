"""The bilinear DFT convolution (``capsnet.ops.dft``) against ``torch.nn.functional.conv2d``.

In float64 the algorithm is exact up to rounding: values, first and second derivatives
must equal ``F.conv2d``'s to 1e-10 for strides, paddings, rectangular and strided kernels,
with and without bias. In float32 it must be as close to the float64 result as PyTorch's
own direct convolution.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from capsnet.layers import Conv2d
from capsnet.models import create_model
from capsnet.ops.dft import _DFTConv2d, dft_conv2d, dft_macs, direct_macs, plan

# (in_channels, out_channels, kernel, stride, padding, (H, W))
SHAPES = [
    (3, 4, 3, 2, 1, (9, 10)),
    (2, 5, 3, 1, 0, (7, 8)),
    (3, 4, (4, 3), (3, 2), (2, 1), (10, 11)),
    (1, 6, 5, 2, 0, (11, 12)),
    (4, 3, 9, 2, 0, (20, 21)),
    (2, 3, (1, 7), (1, 3), (0, 2), (5, 17)),
]
TOL = dict(rtol=1e-10, atol=1e-10)


def _case(shape, batch=3, bias=True, dtype=torch.float64):
    c_in, c_out, kernel, stride, padding, (h, w) = shape
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(batch, c_in, h, w, dtype=dtype, requires_grad=True)
    weight = torch.randn(c_out, c_in, kh, kw, dtype=dtype, requires_grad=True)
    b = torch.randn(c_out, dtype=dtype, requires_grad=True) if bias else None
    return x, weight, b, stride, padding


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_conv2d(shape, bias):
    x, weight, b, stride, padding = _case(shape, bias=bias)
    out = dft_conv2d(x, weight, b, stride, padding)
    assert type(out.grad_fn).__name__ == "_DFTConv2dBackward"
    ref = F.conv2d(x, weight, b, stride, padding)
    torch.testing.assert_close(out, ref, **TOL)
    upstream = torch.randn_like(ref)
    wanted = [x, weight] + ([b] if bias else [])
    for got, expected in zip(torch.autograd.grad(out, wanted, upstream), torch.autograd.grad(ref, wanted, upstream)):
        torch.testing.assert_close(got, expected, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(dft_conv2d(x, weight, b, stride, padding), ref, **TOL)


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_gradcheck_and_second_order(shape):
    x, weight, b, stride, padding = _case(shape, batch=2)

    def fn(x, weight, b):
        return _DFTConv2d.apply(x, weight, b, stride if isinstance(stride, tuple) else (stride,) * 2,
                                padding if isinstance(padding, tuple) else (padding,) * 2)

    assert gradcheck(fn, (x, weight, b))
    assert gradgradcheck(fn, (x, weight, b))


@pytest.mark.parametrize("need", ["x", "weight"])
def test_only_one_input_needs_a_gradient(need):
    x, weight, b, stride, padding = _case(SHAPES[4], bias=False)
    x.requires_grad_(need == "x")
    weight.requires_grad_(need == "weight")
    leaf = x if need == "x" else weight
    (got,) = torch.autograd.grad(dft_conv2d(x, weight, None, stride, padding).square().sum(), [leaf])
    (expected,) = torch.autograd.grad(F.conv2d(x, weight, None, stride, padding).square().sum(), [leaf])
    torch.testing.assert_close(got, expected, **TOL)


def test_only_the_bias_needs_a_gradient_also_with_create_graph():
    x, weight, b, stride, padding = _case(SHAPES[0])
    x.requires_grad_(False)
    weight.requires_grad_(False)
    for create_graph in (False, True):
        (got,) = torch.autograd.grad(dft_conv2d(x, weight, b, stride, padding).square().sum(), [b], create_graph=create_graph)
        (expected,) = torch.autograd.grad(F.conv2d(x, weight, b, stride, padding).square().sum(), [b])
        torch.testing.assert_close(got, expected, **TOL)


def test_second_order_through_the_layer():
    layer = Conv2d(3, 4, 5, stride=2, padding=1, algorithm="dft").double()
    x = torch.randn(2, 3, 11, 12, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, layer.weight, layer.bias, 2, 1)
    got = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight], create_graph=True)
    expected = torch.autograd.grad(ref.square().sum(), [x, layer.weight], create_graph=True)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, **TOL)
    hvp = torch.autograd.grad(sum(g.sum() for g in got), [x, layer.weight])
    hvp_ref = torch.autograd.grad(sum(g.sum() for g in expected), [x, layer.weight])
    for a, e in zip(hvp, hvp_ref):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 2, 3, 0, (7, 8)),  # kernel smaller than the stride: a 1 x 1 polyphase kernel
        (2, 3, 3, 2, 4, (3, 5)),  # padding larger than the kernel
        (2, 3, (3, 2), (4, 5), 0, (3, 2)),  # input the kernel's size: a 1 x 1 grid
        (2, 3, 3, 3, 0, (10, 11)),  # rows and columns no output reads
    ],
)
def test_edge_shapes(shape):
    x, weight, b, stride, padding = _case(shape)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()  # also a non-contiguous layout
    out = dft_conv2d(x, weight, b, stride, padding)
    ref = F.conv2d(x, weight, b, stride, padding)
    torch.testing.assert_close(out, ref, **TOL)
    upstream = torch.randn_like(ref)
    for got, expected in zip(torch.autograd.grad(out, [x, weight, b], upstream), torch.autograd.grad(ref, [x, weight, b], upstream)):
        torch.testing.assert_close(got, expected, **TOL)


def test_empty_batch_and_bad_arguments():
    weight = torch.randn(4, 3, 3, 3)
    assert dft_conv2d(torch.randn(0, 3, 8, 8), weight, None, 2).shape == (0, 4, 3, 3)
    with pytest.raises(ValueError, match="integer strides >= 1"):
        dft_conv2d(torch.randn(1, 3, 8, 8), weight, None, 0)
    with pytest.raises(ValueError, match="paddings >= 0"):
        dft_conv2d(torch.randn(1, 3, 8, 8), weight, None, 1, -1)
    with pytest.raises(ValueError, match="one dtype"):
        dft_conv2d(torch.randn(1, 3, 8, 8), weight, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="MAX_GRID"):
        dft_conv2d(torch.randn(1, 3, 40, 40), weight)


def test_cached_transforms_are_read_only():
    tx, _, _ = plan((6, 6), (9, 9), (2, 2)).transforms()
    with pytest.raises(ValueError):
        tx[0, 0] = 1.0


def test_many_slabs_equal_one(monkeypatch):
    """Slabs of input channels (as PrimaryCaps' 10 at batch 128) accumulate to the same result."""
    x, weight, b, stride, padding = _case((8, 5, 9, 2, 0, (20, 20)))
    monkeypatch.setattr("capsnet._slabs.DFT_SLAB", 1)  # one channel of the polyphase input per slab
    out = dft_conv2d(x, weight, b, stride, padding)
    ref = F.conv2d(x, weight, b, stride, padding)
    torch.testing.assert_close(out, ref, **TOL)
    got = torch.autograd.grad(out.square().sum(), [x, weight])
    expected = torch.autograd.grad(ref.square().sum(), [x, weight])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, **TOL)


def test_float32_is_about_as_accurate_as_the_direct_convolution():
    """PrimaryCaps' shape with 64 input channels: values and gradients against float64, within
    twice the error of PyTorch's direct convolution (measured: below it for the values)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64, 20, 20, dtype=torch.float64)
    weight = torch.randn(32, 64, 9, 9, dtype=torch.float64) * 0.05
    upstream = torch.randn(4, 32, 6, 6, dtype=torch.float64)

    def run(conv, dtype):
        xs, ws = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        out = conv(xs, ws)
        return [t.double() for t in (out, *torch.autograd.grad(out, [xs, ws], upstream.to(dtype)))]

    exact = run(lambda a, w: F.conv2d(a, w, stride=2), torch.float64)
    dft_32 = run(lambda a, w: dft_conv2d(a, w, None, 2), torch.float32)
    direct_32 = run(lambda a, w: F.conv2d(a, w, stride=2), torch.float32)
    for name, e, d, r in zip(("values", "input gradient", "weight gradient"), exact, dft_32, direct_32):
        dft_error, direct_error = (d - e).abs().max(), (r - e).abs().max()
        assert dft_error <= 2 * direct_error, (name, dft_error, direct_error)


def test_plan_is_the_dft_with_three_real_products_per_complex_frequency():
    """PrimaryCaps: a 10 x 10 polyphase input, 5 x 5 polyphase kernel, 6 x 6 outputs.

    The real input's spectrum has 52 distinct frequencies, 4 of them real, so 48 * 3 + 4
    = 148 components. Each component's output share applied to the product of its input and
    kernel transforms must rebuild the correlation for delta inputs.
    """
    p = plan((6, 6), (9, 9), (2, 2))
    assert p.grid == (10, 10) and p.kernel == (5, 5) and p.components == 148
    tx, tw, ty = p.transforms()
    assert tx.shape == (148, 100) and tw.shape == (148, 25) and ty.shape == (148, 36)
    # y[u] = sum_m ty[m, u] (tx[m] . x) (tw[m] . w) is the correlation: check it as a bilinear form.
    form = np.einsum("mu,mi,mk->uik", ty, tx, tw)  # (outputs, inputs, taps)
    expected = np.zeros_like(form)
    for u in range(36):
        r, c = divmod(u, 6)
        for k in range(25):
            kr, kc = divmod(k, 5)
            expected[u, (r + kr) * 10 + (c + kc), k] = 1
    np.testing.assert_allclose(form, expected, atol=1e-12)


def test_multiply_adds():
    shapes = ((128, 256, 20, 20), (256, 256, 9, 9), (2, 2), (0, 0))
    assert direct_macs(*shapes) == 128 * 256 * 256 * 81 * 36
    assert dft_macs(*shapes) == 148 * (128 * 1024 * 100 + 256 * 1024 * 25 + 128 * 256 * 36 + 128 * 256 * 1024)


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match="expects x"):
        dft_conv2d(torch.randn(2, 3, 8, 8), torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="smaller than kernel"):
        dft_conv2d(torch.randn(2, 3, 4, 4), torch.randn(4, 3, 5, 5))


def test_layer_chooses_by_batch_and_shape():
    primary = Conv2d(256, 256, 9, stride=2)
    assert primary.algorithm == "auto"
    assert primary._use_dft(torch.empty(128, 256, 20, 20))
    assert primary._use_dft(torch.empty(25, 256, 20, 20))  # the threshold: half the multiply-adds
    assert not primary._use_dft(torch.empty(24, 256, 20, 20))  # the kernel's transform would dominate
    assert not primary._use_dft(torch.empty(128, 256, 20, 20, dtype=torch.bfloat16))  # half precision
    assert not Conv2d(1, 256, 9)._use_dft(torch.empty(128, 1, 28, 28))  # Conv1: one input channel
    assert Conv2d(256, 256, 9, stride=2, weight_grad="conv").algorithm == "direct"
    assert Conv2d(2, 3, 3, algorithm="dft")._use_dft(torch.empty(1, 2, 5, 5))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        Conv2d(1, 2, 3, algorithm="fft")
    with pytest.raises(ValueError, match="choice of the direct algorithm"):
        Conv2d(1, 2, 3, weight_grad="conv", algorithm="dft")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's forward-AD internals
def test_layer_keeps_pytorchs_errors_and_forward_mode():
    """Too small an input gets nn.Conv2d's RuntimeError; with dual tensors the layer is nn.Conv2d."""
    with pytest.raises(RuntimeError, match="Kernel size can't be greater|padded input size"):
        Conv2d(256, 256, 9, stride=2)(torch.randn(32, 256, 4, 4))
    layer = Conv2d(4, 3, 9, stride=2, algorithm="dft").double()
    x = torch.randn(2, 4, 20, 20, dtype=torch.float64)
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        out = layer(torch.autograd.forward_ad.make_dual(x, tangent))
        jvp = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(jvp, F.conv2d(tangent, layer.weight, None, 2), **TOL)


def test_layer_paths():
    layer = Conv2d(4, 3, 9, stride=2, algorithm="dft").double()
    x = torch.randn(2, 4, 20, 20, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_DFTConv2dBackward"
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, 2), **TOL)
    native = Conv2d(4, 3, 9, stride=2, weight_grad="native", algorithm="dft").double()
    assert type(native(x).grad_fn).__name__ == "ConvolutionBackward0", "weight_grad='native' is nn.Conv2d"
    # Under torch.func the layer is nn.Conv2d (functorch cannot see through the custom backward).
    per_sample = torch.func.vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x.detach())
    torch.testing.assert_close(per_sample, out.detach(), **TOL)


def test_capsnet_gradients_do_not_depend_on_algorithm():
    """The paper model's convolutions by the DFT train like PyTorch's (float64)."""
    grads = {}
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([3, 7])
    for algorithm in ("direct", "dft"):
        torch.manual_seed(0)
        model = create_model("capsnet_tiny", conv_algorithm=algorithm).double()
        out = model(x, y)
        (out.lengths.sum() + out.reconstruction.sum()).backward()
        grads[algorithm] = {name: p.grad for name, p in model.named_parameters()}
    for name in grads["direct"]:
        torch.testing.assert_close(grads["dft"][name], grads["direct"][name], **TOL, msg=name)


# --------------------------------------------------------------------------- the kernel cache of inference


def _cache_calls(monkeypatch) -> list:
    """Counts kernel transforms computed from here on."""
    import capsnet.ops.dft as dft

    calls, original = [], dft._kernel_transform
    monkeypatch.setattr(dft, "_kernel_transform", lambda *a: calls.append(1) or original(*a))
    return calls


def test_inference_reuses_the_kernel_transform_until_the_weight_changes(monkeypatch):
    layer = Conv2d(4, 3, 9, stride=2, algorithm="dft").double()  # one slab: a small kernel
    x = torch.randn(2, 4, 20, 20, dtype=torch.float64)
    calls = _cache_calls(monkeypatch)
    with torch.no_grad():
        first, again = layer(x), layer(x)
        assert len(calls) == 1 and torch.equal(first, again)  # the same bits from the cached transform
        torch.testing.assert_close(first, F.conv2d(x, layer.weight, layer.bias, 2), **TOL)
        layer.weight.mul_(2.0)  # in place: the version counter moves, the cache misses
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 2), **TOL)
        assert len(calls) == 2
        layer.load_state_dict(Conv2d(4, 3, 9, stride=2).double().state_dict())
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 2), **TOL)
        layer.weight = torch.nn.Parameter(layer.weight.detach() + 1.0)  # a new tensor: misses too
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 2), **TOL)
        assert len(calls) == 4
    out = layer(x.requires_grad_())  # a call that needs gradients neither reads nor fills the cache
    assert type(out.grad_fn).__name__ == "_DFTConv2dBackward" and len(calls) == 5


def test_kernel_cache_is_freed_by_train_and_eval_and_not_pickled(monkeypatch):
    import copy
    import pickle

    layer = Conv2d(4, 3, 9, stride=2, algorithm="dft")
    with torch.no_grad():
        layer(torch.randn(2, 4, 20, 20))
    assert "empty" not in repr(layer.kernel_cache)
    clone = pickle.loads(pickle.dumps(layer))
    assert "empty" in repr(clone.kernel_cache) and torch.equal(clone.weight, layer.weight)
    assert "empty" in repr(copy.deepcopy(layer).kernel_cache)
    layer.eval()
    assert "empty" in repr(layer.kernel_cache)


def test_many_slabs_are_not_cached(monkeypatch):
    """float32 kernels above DFT_SLAB are transformed slab by slab, and the slabs are not kept."""
    monkeypatch.setattr("capsnet._slabs.DFT_SLAB", 1)
    layer = Conv2d(8, 5, 9, stride=2, algorithm="dft").double()
    x = torch.randn(2, 8, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert "empty" in repr(layer.kernel_cache)
    torch.testing.assert_close(out, F.conv2d(x, layer.weight, layer.bias, 2), **TOL)


def test_capsnet_bf16_inference_with_the_cached_kernel_is_bit_identical(monkeypatch):
    """PrimaryCaps under bf16 autocast at an inference batch: the second call reads the cache, same bits."""
    torch.manual_seed(0)
    model = create_model("capsnet_mnist", decoder=False).eval()
    x = torch.rand(64, 1, 28, 28)
    calls = _cache_calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(x).lengths
        second = model(x).lengths
    if not calls:
        pytest.skip("PrimaryCaps took the direct convolution at this batch")
    assert len(calls) == 1 and torch.equal(first, second)
    model.primary.conv.kernel_cache.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x).lengths, first)


def test_kernel_cache_misses_after_conversions_data_swaps_and_in_inference_mode(monkeypatch):
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    layer = Conv2d(4, 3, 9, stride=2, algorithm="dft")
    x = torch.randn(2, 4, 20, 20)
    calls = _cache_calls(monkeypatch)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 2), rtol=1e-4, atol=1e-4)

    check()
    vector_to_parameters(parameters_to_vector(layer.parameters()) * 3, layer.parameters())  # param.data = ...: new storage
    check()
    layer.half()
    layer.float()  # module conversions clear the cache
    check()
    assert len(calls) == 3
    with torch.inference_mode():  # inference-mode weights have no version counter: not cached, no error
        fresh = Conv2d(4, 3, 9, stride=2, algorithm="dft")
        torch.testing.assert_close(fresh(x), F.conv2d(x, fresh.weight, fresh.bias, 2), rtol=1e-4, atol=1e-4)
        assert "empty" in repr(fresh.kernel_cache)
    with torch.no_grad():
        layer(x)
    torch.utils.swap_tensors(layer.weight, torch.nn.Parameter(layer.weight.detach() * 2))  # no weakref in the way
    layer.kernel_cache.clear()
    check()

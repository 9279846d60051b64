"""Each private PyTorch API behind capsnet._compat does what the package relies on (a torch
release that moves or changes one fails here, by name)."""

import pytest
import torch
import torch.nn.functional as F

from capsnet import _compat


def test_functorch_transforms_active_only_inside_a_transform():
    seen = []

    def f(x):
        seen.append(_compat.functorch_transforms_active())
        return x.sin().sum()

    assert not _compat.functorch_transforms_active()
    torch.func.grad(f)(torch.randn(3))
    torch.func.vmap(f)(torch.randn(2, 3))
    f(torch.randn(3))
    assert seen == [True, True, False]


def test_softmax_backward_is_the_gradient_of_softmax():
    x = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 5, 6, dtype=torch.float64)
    for dim in (0, 1, 2):
        y = torch.softmax(x, dim)
        (expected,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(_compat.softmax_backward(g, y.detach(), dim), expected, rtol=1e-12, atol=1e-12)


def test_assert_async_passes_true_and_refuses_false_on_cpu():
    _compat.assert_async(torch.tensor(True), "never shown")
    with pytest.raises(RuntimeError):
        _compat.assert_async(torch.tensor(False), "the condition failed")


@pytest.mark.parametrize("stride, padding", [((1, 1), (0, 0)), ((2, 1), (1, 2))])
def test_convolution_input_grad_is_conv2ds_input_gradient_and_differentiable(stride, padding):
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, stride=stride, padding=padding)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, x, g)
    got = _compat.convolution_input_grad(g, x.detach(), w, stride, padding)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got.requires_grad  # through the weight: create_graph=True works

"""The fast routing paths against the plain autograd path they replace.

``dynamic_routing`` and ``dense_routing`` (``DenseCaps.forward``) use hand-written backward
passes (``capsnet.routing.dynamic._DynamicRouting``, ``capsnet.routing.dense._DenseRouting``).
Here they must give the same values and the same gradients, to 1e-10 in float64, as
``_dynamic_routing_autograd`` (Procedure 1 in plain tensor ops, differentiated by
autograd) applied to the votes of ``DenseCaps.votes``. The forward of that reference is
itself checked against the loop-by-loop reference in ``test_routing.py``. Second
derivatives and ``torch.func`` transforms fall back to that autograd path; tested too.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import capsnet.routing.dense as dense_module
from capsnet import dense_routing, dynamic_routing
from capsnet.layers import DenseCaps
from capsnet.routing import dense_votes
from capsnet.routing.dynamic import _dynamic_routing_autograd

SHAPES = [(1, 3, 2, 4), (2, 5, 3, 4), (3, 8, 10, 16), (2, 12, 4, 2)]  # (B, I, J, D)
ITERATIONS = [1, 2, 3, 4]
TOL = dict(rtol=1e-10, atol=1e-10)


def _votes(shape, *, seed=0, scale=2.0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64) * scale


def _upstream(result, seed=1):
    """Random weights for every output, so the loss reaches poses, coupling and logits."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in result]


def _loss(result, weights):
    loss = (result.poses * weights[0]).sum()
    if result.coupling.requires_grad:
        loss = loss + (result.coupling * weights[1]).sum() + (result.logits * weights[2]).sum()
    return loss


def _routing_and_grads(fn, votes, iterations, **kwargs):
    votes = votes.clone().requires_grad_(True)
    result = fn(votes, iterations, **kwargs)
    (grad,) = torch.autograd.grad(_loss(result, _upstream(result)), votes)
    return result, grad


@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_intermediate", [False, True])
@pytest.mark.parametrize("iterations", ITERATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_routing_matches_autograd_path(shape, iterations, detach_intermediate, leaky):
    kwargs = dict(detach_intermediate=detach_intermediate, leaky=leaky)
    votes = _votes(shape)
    fast, grad_fast = _routing_and_grads(dynamic_routing, votes, iterations, **kwargs)
    ref, grad_ref = _routing_and_grads(_dynamic_routing_autograd, votes, iterations, **kwargs)
    for name, a, b in zip(ref._fields, fast, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        assert a.requires_grad == b.requires_grad, f"{name}.requires_grad differs"
    torch.testing.assert_close(grad_fast, grad_ref, **TOL)


@pytest.mark.parametrize("output", ["poses", "coupling", "logits"])
def test_fast_routing_gradient_of_each_output_alone_matches_autograd_path(output):
    # Unused outputs reach the backward as None; each must be handled on its own.
    votes = _votes((2, 7, 4, 5))
    grads = []
    for fn in (dynamic_routing, _dynamic_routing_autograd):
        v = votes.clone().requires_grad_(True)
        result = fn(v, 3)
        weight = _upstream(result)[result._fields.index(output)]
        grads.append(torch.autograd.grad((getattr(result, output) * weight).sum(), v)[0])
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.parametrize("scale", [0.0, 1e-6, 1e4])
def test_fast_routing_is_finite_and_exact_at_zero_and_huge_votes(scale):
    votes = _votes((2, 6, 3, 4), scale=scale)
    fast, grad_fast = _routing_and_grads(dynamic_routing, votes, 3)
    ref, grad_ref = _routing_and_grads(_dynamic_routing_autograd, votes, 3)
    assert all(bool(torch.isfinite(t).all()) for t in (*fast, grad_fast))
    torch.testing.assert_close(fast.poses, ref.poses, **TOL)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-10, atol=1e-10 * max(1.0, scale))


@pytest.mark.parametrize("leaky", [False, True])
def test_fast_routing_gradcheck_float64(leaky):
    # Every output, so the coupling and logits gradients are checked too. (With
    # detach_intermediate the gradient is by design not the Jacobian: not gradchecked.)
    votes = _votes((2, 4, 3, 3), scale=1.0).requires_grad_(True)
    assert gradcheck(lambda v: tuple(dynamic_routing(v, 3, leaky=leaky)), (votes,))


def test_fast_routing_follows_the_input_dtype():
    votes = _votes((2, 5, 3, 4)).float().requires_grad_(True)
    result = dynamic_routing(votes, 3)
    assert all(t.dtype == torch.float32 for t in result)
    result.poses.sum().backward()
    assert votes.grad.dtype == torch.float32
    ref = _dynamic_routing_autograd(votes.detach().double(), 3)
    torch.testing.assert_close(result.poses.double(), ref.poses, rtol=1e-5, atol=1e-6)


def test_fast_routing_can_run_backward_twice_with_retain_graph():
    votes = _votes((2, 5, 3, 4)).requires_grad_(True)
    poses = dynamic_routing(votes, 3).poses
    (first,) = torch.autograd.grad(poses.sum(), votes, retain_graph=True)
    (second,) = torch.autograd.grad(poses.sum(), votes)
    assert torch.equal(first, second)


def test_fast_routing_second_derivatives_come_from_the_autograd_path():
    # create_graph=True switches the backward to autograd through the reference path.
    votes = _votes((1, 3, 2, 3), scale=1.0).requires_grad_(True)
    assert gradgradcheck(lambda v: dynamic_routing(v, 2).poses, (votes,))


def test_fast_routing_works_under_torch_func_transforms():
    votes = _votes((2, 5, 3, 4))
    weights = _votes((2, 3, 4), seed=1)
    grad = torch.func.grad(lambda v: (dynamic_routing(v, 3).poses * weights).sum())(votes)
    v = votes.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((_dynamic_routing_autograd(v, 3).poses * weights).sum(), v)
    torch.testing.assert_close(grad, expected, **TOL)
    batched = torch.func.vmap(lambda v: dynamic_routing(v[None], 3).poses[0])(votes)
    torch.testing.assert_close(batched, dynamic_routing(votes, 3).poses, **TOL)


# --------------------------------------------------------------------------- DenseCaps


def _dense(*, in_caps=7, in_dim=3, out_caps=4, out_dim=5, bias=False, **kwargs):
    torch.manual_seed(0)
    layer = DenseCaps(in_caps, in_dim, out_caps, out_dim, init_std=0.5, bias=bias, **kwargs).double()
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


def _dense_reference(layer, u):
    """The unfused computation: explicit votes, then the autograd routing path."""
    return _dynamic_routing_autograd(
        layer.votes(u).transpose(1, 2), layer.iterations, detach_intermediate=layer.detach_intermediate, leaky=layer.leaky
    )


def _dense_outputs_and_grads(layer, u, forward):
    u = u.clone().requires_grad_(True)
    result = forward(layer, u)
    params = [u, *layer.parameters()]
    grads = torch.autograd.grad(_loss(result, _upstream(result)), params)
    return result, grads


@pytest.mark.parametrize("slab_elements", [1, 37, 1 << 19])  # one child per slab, uneven slabs, one slab
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_intermediate", [False, True])
@pytest.mark.parametrize("iterations", ITERATIONS)
def test_dense_caps_fused_forward_matches_votes_then_autograd_routing(
    monkeypatch, iterations, detach_intermediate, leaky, bias, slab_elements
):
    monkeypatch.setattr("capsnet._slabs.DENSE_SLAB", slab_elements)
    layer = _dense(iterations=iterations, detach_intermediate=detach_intermediate, leaky=leaky, bias=bias)
    u = torch.randn(3, 7, 3, dtype=torch.float64)
    fast, grads_fast = _dense_outputs_and_grads(layer, u, DenseCaps.forward)
    ref, grads_ref = _dense_outputs_and_grads(layer, u, _dense_reference)
    for name, a, b in zip(ref._fields, fast, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        assert a.requires_grad == b.requires_grad, f"{name}.requires_grad differs"
    names = ["u", *(n for n, _ in layer.named_parameters())]
    for name, a, b in zip(names, grads_fast, grads_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_dense_caps_forward_without_grad_equals_forward_with_grad():
    layer = _dense(bias=True)
    u = torch.randn(3, 7, 3, dtype=torch.float64)
    with torch.no_grad():
        plain = layer(u)
    fused = layer(u.requires_grad_(True))
    for a, b in zip(plain, fused):
        assert torch.equal(a, b.detach())


def test_dense_caps_gradient_reaches_only_what_requires_it():
    layer = _dense(bias=True)
    layer.weight.requires_grad_(False)
    u = torch.randn(3, 7, 3, dtype=torch.float64)
    layer(u).poses.sum().backward()  # u is not a leaf that wants a gradient
    assert layer.weight.grad is None
    assert layer.bias.grad is not None and bool((layer.bias.grad != 0).any())


def test_dense_caps_gradcheck_float64():
    layer = _dense(in_caps=4, in_dim=2, out_caps=3, out_dim=3, bias=True)
    u = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)

    routing = dict(detach_intermediate=False, leaky=False, eps=1e-8)

    def fn(u, weight, bias):
        return tuple(dense_module._DenseRouting.apply(u, weight, bias, 3, routing))

    assert gradcheck(fn, (u, layer.weight, layer.bias))
    assert gradgradcheck(lambda u, w, b: fn(u, w, b)[0], (u, layer.weight, layer.bias))


def test_dense_caps_backward_twice_with_retain_graph_gives_the_same_gradient():
    layer = _dense()
    u = torch.randn(3, 7, 3, dtype=torch.float64, requires_grad=True)
    poses = layer(u).poses
    first = torch.autograd.grad(poses.sum(), [u, layer.weight], retain_graph=True)
    second = torch.autograd.grad(poses.sum(), [u, layer.weight])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dense_caps_follows_the_input_dtype():
    layer = _dense().float()
    u = torch.randn(3, 7, 3, requires_grad=True)
    result = layer(u)
    assert all(t.dtype == torch.float32 for t in result)
    result.poses.sum().backward()
    assert u.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.weight.grad.shape == layer.weight.shape


def test_dense_caps_works_under_torch_func_transforms():
    layer = _dense(bias=True)
    u = torch.randn(3, 7, 3, dtype=torch.float64)
    params = dict(layer.named_parameters())

    def loss(params):
        return torch.func.functional_call(layer, params, (u,)).poses.pow(2).sum()

    grads = torch.func.grad(loss)(params)
    expected = torch.autograd.grad(_dense_reference(layer, u).poses.pow(2).sum(), list(params.values()))
    for (name, a), b in zip(grads.items(), expected):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


# --------------------------------------------------------------------------- dense_routing


def _dense_inputs(*, batch=3, in_caps=7, in_dim=3, out_caps=4, out_dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, in_caps, in_dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(out_caps, in_caps, out_dim, in_dim, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(out_caps, 1, out_dim, generator=gen, dtype=torch.float64)
    return u, weight, bias


def _outputs_and_grads(fn, inputs):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    result = fn(*inputs)
    return result, torch.autograd.grad(_loss(result, _upstream(result)), inputs)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_intermediate", [False, True])
@pytest.mark.parametrize("iterations", [1, 3])
def test_dense_routing_is_the_layers_forward_bit_for_bit(iterations, detach_intermediate, leaky, bias):
    layer = _dense(iterations=iterations, detach_intermediate=detach_intermediate, leaky=leaky, bias=bias)
    u = torch.randn(3, 7, 3, dtype=torch.float64)
    options = dict(iterations=iterations, detach_intermediate=detach_intermediate, leaky=leaky)
    module, grads_module = _dense_outputs_and_grads(layer, u, DenseCaps.forward)
    inputs = [u, *(p.detach() for p in layer.parameters())]
    functional, grads_functional = _outputs_and_grads(lambda *t: dense_routing(*t, **options), inputs)
    for a, b in zip((*functional, *grads_functional), (*module, *grads_module)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("leaky", [False, True])
@pytest.mark.parametrize("detach_intermediate", [False, True])
@pytest.mark.parametrize("iterations", ITERATIONS)
def test_dense_routing_matches_dynamic_routing_of_einsum_votes(iterations, detach_intermediate, leaky, bias):
    u, weight, b = _dense_inputs()
    inputs = [u, weight, b] if bias else [u, weight]
    options = dict(detach_intermediate=detach_intermediate, leaky=leaky)

    def reference(u, weight, b=None):
        votes = torch.einsum("jide,bie->bijd", weight, u) + (b.transpose(0, 1) if b is not None else 0)  # (B, I, J, D)
        return dynamic_routing(votes, iterations, **options)

    fast, grads_fast = _outputs_and_grads(lambda *t: dense_routing(*t, iterations=iterations, **options), inputs)
    ref, grads_ref = _outputs_and_grads(reference, inputs)
    for name, a, b in zip(ref._fields, fast, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    for name, a, b in zip(["u", "weight", "bias"], grads_fast, grads_ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_dense_routing_gradcheck_float64():
    u, weight, bias = (t.requires_grad_(True) for t in _dense_inputs(batch=2, in_caps=4, in_dim=2, out_caps=3, out_dim=3))
    assert gradcheck(lambda *t: tuple(dense_routing(*t, iterations=3)), (u, weight, bias))
    assert gradgradcheck(lambda *t: dense_routing(*t, iterations=2).poses, (u, weight, bias))


@pytest.mark.parametrize("leaky", [False, True])
def test_dense_routing_reference_path_matches_the_fused_path(leaky):
    inputs = _dense_inputs()
    fused, grads_fused = _outputs_and_grads(lambda *t: dense_routing(*t, leaky=leaky), inputs)
    ref, grads_ref = _outputs_and_grads(lambda *t: dense_routing(*t, leaky=leaky, fused=False), inputs)
    for a, b in zip((*fused, *grads_fused), (*ref, *grads_ref)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own, on first use of forward AD
def test_dense_routing_forward_mode_ad_takes_the_reference_path_or_torch_func():
    import torch.autograd.forward_ad as fwAD

    u, weight, bias = _dense_inputs()
    tangent = torch.randn_like(u)
    expected = torch.func.jvp(lambda u: dense_routing(u, weight, bias).poses, (u,), (tangent,))[1]
    weight.requires_grad_(True)  # what a layer's parameter does: the fused path cannot take dual tensors then
    with fwAD.dual_level():
        poses = dense_routing(fwAD.make_dual(u, tangent), weight, bias, fused=False).poses
        got = fwAD.unpack_dual(poses).tangent
    torch.testing.assert_close(got, expected, **TOL)


def test_dense_routing_takes_the_bias_as_j_d_or_j_1_d():
    u, weight, bias = _dense_inputs()
    assert all(torch.equal(a, b) for a, b in zip(dense_routing(u, weight, bias), dense_routing(u, weight, bias[:, 0])))
    assert torch.equal(dense_votes(u, weight, bias[:, 0]), dense_votes(u, weight, bias))


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((3, 7, 3), (4, 7, 5, 2), None), r"u must be \(B, I, E\) = \(B, 7, 2\)"),
        (((3, 7, 3), (4, 7, 5), None), r"weight must be \(J, I, D, E\)"),
        (((3, 7, 3), (4, 7, 5, 3), (4, 5, 1)), r"bias must be \(J, D\) = \(4, 5\)"),
    ],
)
def test_dense_routing_rejects_shapes_that_do_not_fit(shapes, match):
    u, weight, bias = (torch.zeros(s, dtype=torch.float64) if s is not None else None for s in shapes)
    with pytest.raises(ValueError, match=match):
        dense_routing(u, weight, bias)
    with pytest.raises(ValueError, match=r"iterations must be an integer >= 1"):
        dense_routing(*_dense_inputs(), iterations=0)

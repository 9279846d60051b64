"""The compiled inference routing of a dense capsule layer (``dense_routing.c``, ``kernels.dense_route``).

Without gradients, :func:`capsnet.routing.dense_routing` (DigitCaps) makes each image's votes in a
per-thread buffer and routes them there; with gradients, its votes come from ``kernels.dense_votes``
in the layout routing keeps. These tests hold it to the eager path it replaces
(votes by ``bmm``, then ``capsnet.routing.dynamic._route``) and to that path in float64, over sizes
that are not multiples of the kernel's 16 lanes or of its 4-image groups, every routing option,
saturated and zero votes and NaNs; and they check that it gives the same bits with one or two
threads and for an image alone or in a batch, and where it must not run.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import capsnet.ops.kernels as kernels
from capsnet import create_model
from capsnet.routing import dense_routing, dense_votes

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the kernels cannot be built")

# (B, I, J, D, E): the MNIST model's D = 16, E = 8 (two rows of eight pose elements); I below, at
# and past a multiple of 16; odd D (a partial row of eight); a batch that is not a multiple of 4.
SHAPES = [(5, 37, 4, 5, 3), (9, 32, 10, 16, 8), (4, 16, 3, 11, 8), (1, 1, 2, 1, 1), (6, 50, 1, 16, 8)]


@pytest.fixture(autouse=True)
def _follow_settings():
    kernels.set_enabled(None)
    yield
    kernels.set_enabled(None)


def _problem(shape, seed=0, scale=1.0, bias=False):
    batch, n_in, n_out, dim, in_dim = shape
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, n_in, in_dim, generator=gen) * scale
    weight = torch.randn(n_out, n_in, dim, in_dim, generator=gen) * (0.5 / in_dim**0.5)
    b = torch.randn(n_out, dim, generator=gen) * 0.1 if bias else None
    return u, weight, b


def _routed(flag, u, weight, bias, **options):
    """``dense_routing`` without gradients, with the kernels on (True) or off; with them on, checked
    to be the kernel's own output (so a kernel that silently fell back cannot pass)."""
    kernels.set_enabled(flag)
    try:
        with torch.no_grad():
            out = dense_routing(u, weight, bias, **options)
            if flag:
                direct = kernels.dense_route(u, weight, bias, options.get("iterations", 3), options.get("leaky", False),
                                             options.get("eps", 0.0))
                assert direct is not None, "the compiled dense routing did not run"
                for mine, theirs in zip(direct, (out.poses, out.coupling.transpose(1, 2), out.logits.transpose(1, 2))):
                    torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)  # the same bits
    finally:
        kernels.set_enabled(None)
    return out.poses, out.coupling, out.logits


@needs_cc
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("options", [{}, dict(leaky=True), dict(eps=1e-3), dict(bias=True)], ids=["paper", "leaky", "eps", "bias"])
def test_compiled_dense_routing_matches_the_eager_path_and_float64(shape, iterations, options):
    options = dict(options)
    u, weight, bias = _problem(shape, bias=options.pop("bias", False))
    reference = _routed(False, u.double(), weight.double(), None if bias is None else bias.double(), iterations=iterations, **options)
    eager = _routed(False, u, weight, bias, iterations=iterations, **options)
    compiled = _routed(True, u, weight, bias, iterations=iterations, **options)
    for name, c, e, ref in zip(("poses", "coupling", "logits"), compiled, eager, reference):
        assert c.dtype == torch.float32 and c.shape == ref.shape, name
        # As close to the float64 routing as the eager float32 path, to a few ulps of the values' scale.
        err_c, err_e = (c.double() - ref).abs().max().item(), (e.double() - ref).abs().max().item()
        assert err_c <= 4 * err_e + 1e-6 * max(ref.abs().max().item(), 1.0), (name, err_c, err_e)


@needs_cc
@pytest.mark.parametrize("scale", [0.0, 30.0])
def test_zero_and_saturating_votes(scale):
    # scale 0: every vote is 0, so poses are exactly 0 and the coupling stays uniform; scale 30: the
    # agreements reach a hundred and more, the softmax saturates (gaps past float32 exp's range).
    # Logits in the hundreds carry float32 rounding of about 1e-5, which the softmax turns into relative
    # coupling errors of that size on either path: so both are held to the float64 routing.
    u, weight, _ = _problem((5, 37, 4, 16, 8), seed=1, scale=scale)
    reference = _routed(False, u.double(), weight.double(), None, iterations=3)
    eager = _routed(False, u, weight, None, iterations=3)
    compiled = _routed(True, u, weight, None, iterations=3)
    assert all(torch.isfinite(t).all() for t in compiled)
    if scale == 0:
        assert torch.equal(compiled[0], torch.zeros_like(compiled[0]))
        assert torch.equal(compiled[1], torch.full_like(compiled[1], 0.25))
    else:
        assert reference[2].abs().max() > 100 and (reference[1] < 1e-30).any()  # saturated indeed
    for c, e, ref in zip(compiled, eager, reference):
        err_c, err_e = (c.double() - ref).abs().max().item(), (e.double() - ref).abs().max().item()
        assert err_c <= 4 * err_e + 1e-6 * max(ref.abs().max().item(), 1.0), (err_c, err_e)
    torch.testing.assert_close(compiled[1].sum(dim=2), torch.ones(5, 37), rtol=0, atol=1e-6)


@needs_cc
def test_a_nan_stays_in_its_image():
    u, weight, _ = _problem((6, 37, 4, 16, 8), seed=2)
    u[3, 5, 0] = float("nan")
    eager = _routed(False, u, weight, None, iterations=3)
    compiled = _routed(True, u, weight, None, iterations=3)
    for c, e in zip(compiled, eager):
        assert torch.equal(torch.isnan(c), torch.isnan(e))
        assert torch.isnan(c[3]).any() and not torch.isnan(c[[0, 1, 2, 4, 5]]).any()


@needs_cc
def test_the_same_bits_with_one_or_two_threads_and_for_an_image_alone():
    u, weight, bias = _problem((9, 40, 10, 16, 8), seed=3, bias=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _routed(True, u, weight, bias, iterations=3)
        torch.set_num_threads(2)
        two = _routed(True, u, weight, bias, iterations=3)
        alone = _routed(True, u[6:7], weight, bias, iterations=3)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, two, alone):
        assert torch.equal(a, b)
        assert torch.equal(a[6:7], c)


@needs_cc
def test_the_mnist_model_infers_the_same_with_and_without_the_kernel():
    torch.manual_seed(0)
    model = create_model("capsnet_mnist").eval()
    x = torch.rand(3, 1, 28, 28)
    outputs = []
    for flag in (False, True):
        kernels.set_enabled(flag)
        with torch.inference_mode():
            outputs.append(model(x))
    for e, c in zip(outputs[0], outputs[1]):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)


def test_the_kernel_is_not_used_where_it_does_not_apply(monkeypatch):
    # Gradients (the fused autograd path), float64, forward-mode tangents, torch.compile's tracing
    # and kernels off never reach it; no-grad float32 does.
    calls = []
    real = kernels.dense_route
    monkeypatch.setattr(kernels, "dense_route", lambda *a: calls.append(a) or real(*a))
    u, weight, _ = _problem((2, 5, 3, 4, 2))
    dense_routing(u, weight.requires_grad_())
    assert calls == []
    with torch.no_grad():
        dense_routing(u, weight)
    assert len(calls) == 1
    assert kernels.dense_route(u.double(), weight.double(), None, 3, False, 0.0) is None
    kernels.set_enabled(False)
    assert kernels.dense_route(u, weight, None, 3, False, 0.0) is None


@needs_cc
@pytest.mark.parametrize("shape", SHAPES + [(3, 33, 2, 32, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_votes_match_eq_2_in_float64(shape, bias):
    u, weight, b = _problem(shape, seed=5, bias=bias)
    reference = dense_votes(u.double(), weight.double(), None if b is None else b.double())  # (B, J, I, D)
    compiled = kernels.dense_votes(u, weight, None if b is None else b.unsqueeze(1))
    assert compiled is not None, "the compiled votes did not run"
    assert compiled.shape == reference.shape and compiled.is_contiguous()
    torch.testing.assert_close(compiled.double(), reference, rtol=0, atol=1e-6 * reference.abs().max().item())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = kernels.dense_votes(u, weight, None if b is None else b.unsqueeze(1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(compiled, two)


@needs_cc
def test_training_routes_the_compiled_votes_to_the_same_values_and_gradients():
    u, weight, b = _problem((6, 37, 10, 16, 8), seed=6, bias=True)
    results = []
    for flag in (False, True):
        kernels.set_enabled(flag)
        leaves = [t.clone().requires_grad_() for t in (u, weight, b)]
        out = dense_routing(*leaves, iterations=3)
        (out.poses.square().sum() + out.coupling[..., 0].sum()).backward()
        results.append((out.poses.detach(), *(t.grad for t in leaves)))
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_forward_mode_tangents_pass_through_the_eager_path():
    from torch.autograd import forward_ad

    u, weight, _ = _problem((3, 20, 4, 16, 8), seed=7)
    tangent = torch.randn_like(u)
    with torch.no_grad(), forward_ad.dual_level():
        out = dense_routing(forward_ad.make_dual(u, tangent), weight)
        jvp = forward_ad.unpack_dual(out.poses).tangent
    assert jvp is not None
    step = 1e-3  # the tangent is the derivative: a central difference agrees
    with torch.no_grad():
        plus, minus = (dense_routing(u + sign * step * tangent, weight).poses for sign in (1, -1))
    torch.testing.assert_close(jvp, (plus - minus) / (2 * step), rtol=1e-2, atol=1e-3)


@needs_cc
@pytest.mark.parametrize("grad", [False, True])
def test_torch_compile_gives_the_eager_values(grad):
    # Traced tensors have no memory for C to read: under torch.compile the eager code runs.
    u, weight, _ = _problem((3, 20, 4, 16, 8), seed=8)

    def route(u, weight):
        return dense_routing(u, weight).poses

    expected = route(u, weight.clone().requires_grad_(grad))
    compiled = torch.compile(route, backend="eager", fullgraph=False)
    w = weight.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        got = compiled(u, w)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    if grad:
        got.sum().backward()
        assert torch.isfinite(w.grad).all()

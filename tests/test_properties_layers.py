"""Property-based tests (hypothesis) of the capsule layers and ``capsnet_tiny`` at their edges; the contract and the shared
cases are in ``tests/property_cases.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from property_cases import (
    FAST,
    LAYER,
    LAYER_SCALES,
    SEEDS,
    SQUARE_OVERFLOW,
    _finite,
    _grads_finite,
    _not_refused,
    _randn,
    _scaled,
    _weighted_sum,
)

from capsnet import create_model, margin_loss, reconstruction_loss
from capsnet.layers import CapsuleDecoder, DenseCaps, PrimaryCaps

# Tiny tensors: one intra-op thread is ~50x faster than two on cores shared with other jobs.
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- layers


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 2])
@given(
    sizes=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    seed=SEEDS,
)
def test_primary_caps_are_finite_unit_bounded_and_differentiable(dtype, scale, batch, sizes, extra, seed):
    channels, types, dim, kernel, stride = sizes
    torch.manual_seed(seed)
    layer = PrimaryCaps(channels, types=types, dim=dim, kernel_size=kernel, stride=stride).to(dtype)
    h, w = kernel + extra[0], kernel + extra[1]
    x = _randn((batch, channels, h, w), dtype, scale, seed).requires_grad_()
    u = layer(x)
    grid = ((h - kernel) // stride + 1) * ((w - kernel) // stride + 1)
    assert u.shape == (batch, types * grid, dim) and _finite(u)
    assert bool((torch.linalg.vector_norm(u.double(), dim=-1) <= 1 + 1e-6).all())
    assert _grads_finite(_weighted_sum(u), [x, *layer.parameters()])


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(
    sizes=st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    iterations=st.integers(1, 3),
    bias=st.booleans(),
    leaky=st.booleans(),
    seed=SEEDS,
)
def test_dense_caps_are_finite_unit_bounded_and_differentiable(dtype, scale, batch, sizes, iterations, bias, leaky, seed):
    torch.manual_seed(seed)
    in_caps, in_dim, out_caps, out_dim = sizes
    layer = DenseCaps(in_caps, in_dim, out_caps, out_dim, iterations=iterations, bias=bias, leaky=leaky, init_std=0.5)
    layer = layer.to(dtype)
    u = _randn((batch, in_caps, in_dim), dtype, scale, seed).requires_grad_()
    result = layer(u)
    assert result.poses.shape == (batch, out_caps, out_dim) and _finite(result.poses) and _finite(result.coupling)
    assert bool((torch.linalg.vector_norm(result.poses.double(), dim=-1) <= 1 + 1e-6).all())
    assert _grads_finite(_weighted_sum(result.poses) + result.coupling.sum(), [u, *layer.parameters()])


@FAST
@given(
    where=st.sampled_from(["primary_caps", "dense_caps", "capsnet_tiny"]),
    dtype_scale=st.sampled_from([(torch.float32, 1e30), (torch.float64, 1e300)]),
    seed=SEEDS,
)
def test_capsule_layers_and_capsnet_stay_finite_on_huge_inputs(where, dtype_scale, seed):
    dtype, scale = dtype_scale
    torch.manual_seed(seed)
    if where == "primary_caps":
        out = PrimaryCaps(2, types=2, dim=4, kernel_size=3, stride=1).to(dtype)(_randn((2, 2, 5, 5), dtype, scale, seed))
    elif where == "dense_caps":
        out = DenseCaps(3, 4, 2, 4, init_std=0.5).to(dtype)(_randn((2, 3, 4), dtype, scale, seed)).poses
    else:
        out = create_model("capsnet_tiny").to(dtype)(_randn((2, 1, 28, 28), dtype, scale, seed).abs()).lengths
    assert _finite(out)


@FAST
@given(
    layer=st.sampled_from(["primary", "dense"]),
    sizes=st.lists(st.integers(-3, 3), min_size=5, max_size=5).filter(lambda s: min(s) < 1),
)
def test_capsule_layers_refuse_non_positive_sizes(layer, sizes):
    with pytest.raises(ValueError, match="must be positive"):
        if layer == "primary":
            PrimaryCaps(sizes[0], types=sizes[1], dim=sizes[2], kernel_size=sizes[3], stride=sizes[4])
        else:
            DenseCaps(*sizes[:4], iterations=sizes[4])


def test_dense_caps_refuse_a_non_finite_init_std():
    problems = _not_refused({str(v): (lambda v=v: DenseCaps(3, 2, 2, 2, init_std=v)) for v in (float("nan"), float("inf"))})
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 6, 3), (5, 3)], ids=["wrong-in-dim", "wrong-in-caps", "no-batch-axis"])
def test_dense_caps_refuse_input_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"\(B, 5, 3\)"):
        DenseCaps(5, 3, 4, 6)(torch.rand(shape))


def test_capsule_layers_refuse_malformed_input():
    primary, dense = PrimaryCaps(3, types=2, dim=4, kernel_size=3, stride=1), DenseCaps(5, 3, 4, 6)
    cases = {
        "primary wrong channels": lambda: primary(torch.rand(2, 4, 5, 5)),
        "primary no batch axis": lambda: primary(torch.rand(3, 5, 5)),
        "primary smaller than kernel": lambda: primary(torch.rand(2, 3, 2, 2)),
        "primary integer": lambda: primary(torch.ones(2, 3, 5, 5, dtype=torch.long)),
        "primary float64 into float32": lambda: primary(torch.rand(2, 3, 5, 5, dtype=torch.float64)),
        "dense integer": lambda: dense(torch.ones(2, 5, 3, dtype=torch.long)),
        "dense float64 into float32": lambda: dense(torch.rand(2, 5, 3, dtype=torch.float64)),
    }
    problems = _not_refused(cases)
    assert not problems, "\n".join(problems)


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES, SQUARE_OVERFLOW))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    image_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    hidden=st.lists(st.integers(1, 8), max_size=2).map(tuple),
    data=st.data(),
)
def test_decoder_gives_finite_pixels_in_0_1(dtype, scale, batch, sizes, image_shape, hidden, data):
    """The decoder never squashes, so even poses far beyond squash's range give finite pixels."""
    num_caps, caps_dim = sizes
    seed = data.draw(SEEDS)
    torch.manual_seed(seed)
    decoder = CapsuleDecoder(num_caps, caps_dim, image_shape, hidden=hidden).to(dtype)
    poses = _randn((batch, num_caps, caps_dim), dtype, scale, seed).requires_grad_()
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_caps - 1), min_size=batch, max_size=batch)), dtype=torch.int64)
    out = decoder(poses, labels)
    assert out.shape == (batch, *image_shape) and _finite(out) and bool(((out >= 0) & (out <= 1)).all())
    if batch:
        assert _grads_finite(out.sum(), [poses, *decoder.parameters()])


def test_decoder_refuses_malformed_poses_and_labels():
    decoder = CapsuleDecoder(4, 6, (1, 5, 5), hidden=(8,))
    cases = {
        "label too large": (torch.rand(2, 4, 6), torch.tensor([0, 4])),
        "negative label": (torch.rand(2, 4, 6), torch.tensor([0, -1])),
        "float labels": (torch.rand(2, 4, 6), torch.tensor([0.0, 2.7])),
        "label count": (torch.rand(2, 4, 6), torch.tensor([0, 1, 2])),
        "pose dim": (torch.rand(2, 4, 5), torch.tensor([0, 1])),
        "capsule count": (torch.rand(2, 3, 6), torch.tensor([0, 1])),
    }
    problems = _not_refused({name: (lambda a=args: decoder(*a)) for name, args in cases.items()})
    assert not problems, "\n".join(problems)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_decoder_refuses_non_positive_sizes():
    cases = {
        "no capsules": (0, 6, (1, 5, 5), (8,)),
        "zero pose dim": (4, 0, (1, 5, 5), (8,)),
        "zero pixels": (4, 6, (1, 0, 5), (8,)),
        "negative pixels": (4, 6, (1, -5, 5), (8,)),
        "negative hidden": (4, 6, (1, 5, 5), (-8,)),
        "zero hidden": (4, 6, (1, 5, 5), (8, 0)),
    }
    problems = _not_refused({name: (lambda a=args: CapsuleDecoder(*a[:3], hidden=a[3])) for name, args in cases.items()})
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- create_model("capsnet_tiny")


@pytest.fixture(scope="module")
def tiny_models() -> dict:
    torch.manual_seed(0)
    return {torch.float32: create_model("capsnet_tiny"), torch.float64: create_model("capsnet_tiny").double()}


@LAYER
@pytest.mark.parametrize(("dtype", "scale"), _scaled(LAYER_SCALES))
@pytest.mark.parametrize("batch", [0, 1, 3])
@given(with_labels=st.booleans(), training=st.booleans(), seed=SEEDS)
def test_capsnet_tiny_forward_is_finite_with_finite_gradients(tiny_models, dtype, scale, batch, with_labels, training, seed):
    model = tiny_models[dtype].train(training)
    x = _randn((batch, 1, 28, 28), dtype, scale, seed).abs()  # pixels are >= 0
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed)) if with_labels else None
    out = model(x, y)
    assert out.lengths.shape == (batch, 10) and out.reconstruction.shape == (batch, 1, 28, 28)
    for name in ("lengths", "poses", "reconstruction", "coupling", "primary"):
        assert _finite(getattr(out, name)), name
    assert bool(((out.lengths >= 0) & (out.lengths <= 1 + 1e-6)).all())
    if batch:
        labels = y if y is not None else out.lengths.argmax(1)
        loss = margin_loss(out.lengths, labels) + reconstruction_loss(out.reconstruction, x)
    else:  # the losses of an empty batch: test_*_of_an_empty_batch_*
        loss = _weighted_sum(out.lengths) + out.reconstruction.sum()
    assert _finite(loss) and _grads_finite(loss, model.parameters())


@st.composite
def _bad_images(draw):
    kind = draw(st.sampled_from(["ndim", "channels", "size", "integer", "nan", "inf"]))
    batch = draw(st.integers(1 if kind in ("nan", "inf") else 0, 3))
    shape = [batch, 1, 28, 28]
    if kind == "ndim":
        ndim = draw(st.sampled_from([0, 1, 2, 3, 5]))
        shape = draw(st.lists(st.integers(1, 28), min_size=ndim, max_size=ndim))
    elif kind == "channels":
        shape[1] = draw(st.sampled_from([0, 2, 3]))
    elif kind == "size":
        shape[2:] = draw(st.tuples(st.integers(1, 40), st.integers(1, 40)).filter(lambda hw: hw != (28, 28)))
    if kind == "integer":
        return torch.zeros(shape, dtype=draw(st.sampled_from([torch.uint8, torch.int64, torch.bool])))
    x = torch.rand(shape)
    if kind in ("nan", "inf"):
        value = float("nan") if kind == "nan" else draw(st.sampled_from([float("inf"), -float("inf")]))
        x[draw(st.integers(0, batch - 1)), 0, draw(st.integers(0, 27)), draw(st.integers(0, 27))] = value
    return x


@FAST
@given(x=_bad_images())
def test_capsnet_tiny_refuses_bad_images_by_name(tiny_models, x):
    with pytest.raises(ValueError, match="input"):
        tiny_models[torch.float32](x)


@FAST
@given(data=st.data(), kind=st.sampled_from(["too-large", "negative", "long", "2-d", "float", "bool"]))
def test_capsnet_tiny_refuses_bad_labels_by_name(tiny_models, data, kind):
    batch = data.draw(st.integers(1, 3))
    y = {
        "too-large": lambda: torch.full((batch,), data.draw(st.integers(10, 1000))),
        "negative": lambda: torch.full((batch,), data.draw(st.integers(-1000, -1))),
        "long": lambda: torch.zeros(batch + 1, dtype=torch.long),
        "2-d": lambda: torch.zeros(batch, 1, dtype=torch.long),
        "float": lambda: torch.zeros(batch),
        "bool": lambda: torch.zeros(batch, dtype=torch.bool),
    }[kind]()
    with pytest.raises(ValueError, match="labels"):
        tiny_models[torch.float32](torch.rand(batch, 1, 28, 28), y)


def test_capsnet_tiny_refuses_images_of_another_floating_dtype(tiny_models):
    model = tiny_models[torch.float32]
    dtypes = (torch.float64, torch.float16, torch.bfloat16)
    cases = {str(d): (lambda d=d: model(torch.rand(2, 1, 28, 28, dtype=d))) for d in dtypes}
    problems = _not_refused(cases)
    assert not problems, "\n".join(problems)


@FAST
@given(
    overrides=st.fixed_dictionaries(
        {},
        optional={
            "image_size": st.integers(17, 30),
            "num_classes": st.integers(1, 4),
            "routing_iterations": st.integers(1, 3),
            "class_dim": st.integers(1, 4),
            "primary_types": st.integers(1, 3),
            "primary_dim": st.integers(1, 4),
            "conv_channels": st.integers(1, 4),
            "decoder_hidden": st.lists(st.integers(1, 8), max_size=2).map(tuple),
            "decoder": st.booleans(),
            "leaky_routing": st.booleans(),
            "class_bias": st.booleans(),
        },
    ),
    batch=st.integers(1, 2),
)
def test_capsnet_tiny_with_random_sizes_builds_and_runs(overrides, batch):
    model = create_model("capsnet_tiny", **overrides)
    out = model(torch.rand(batch, 1, model.image_size, model.image_size))
    assert out.lengths.shape == (batch, model.num_classes) and _finite(out.lengths)
    assert (out.reconstruction is None) == (overrides.get("decoder") is False)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(
    ("key", "value"),
    [
        *[
            (key, value)
            for key in (
                "image_size", "num_classes", "primary_types", "primary_dim", "primary_kernel", "primary_stride", "class_dim",
                "routing_iterations",
            )
            for value in (0, -3)
        ],
        ("conv_channels", 0),
    ],
)
def test_capsnet_tiny_refuses_non_positive_sizes(key, value):
    with pytest.raises(ValueError):
        create_model("capsnet_tiny", **{key: value})


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_capsnet_tiny_refuses_non_positive_input_kernel_and_decoder_sizes():
    cases = {
        "in_channels=0": {"in_channels": 0},
        "in_channels=-3": {"in_channels": -3},
        "conv_channels=-3": {"conv_channels": -3},
        "conv_kernel=0": {"conv_kernel": 0},
        "conv_kernel=-3": {"conv_kernel": -3},
        "decoder_hidden=(0,)": {"decoder_hidden": (0,)},
        "decoder_hidden=(-3,)": {"decoder_hidden": (-3,)},
    }

    def build_and_run(kwargs):
        model = create_model("capsnet_tiny", **kwargs)
        model(torch.rand(1, model.in_channels, 28, 28))  # what a silently accepted size leads to

    problems = _not_refused({name: (lambda k=kwargs: build_and_run(k)) for name, kwargs in cases.items()})
    assert not problems, "\n".join(problems)

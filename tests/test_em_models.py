"""Matrix-capsule layers and the EM models of Hinton, Sabour & Frosst 2018."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from capsnet import create_model, list_models
from capsnet.layers.matrix import ClassMatCaps, ConvMatCaps, PrimaryMatCaps, coordinate_offsets
from capsnet.models.em import MatrixCapsNet, MatrixCapsOutput

EM_MODELS = ["em_small", "em_full", "em_mnist", "em_tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, channels, expected",
    [("em_small", 1, 67_154), ("em_full", 1, 316_394), ("em_small", 2, 68_754), ("em_full", 2, 317_194)],
)
def test_parameter_counts_match_the_paper(name, channels, expected):
    assert _count(create_model(name, in_channels=channels)) == expected


def test_every_em_model_is_registered():
    assert set(EM_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", EM_MODELS)
def test_forward_shapes(name):
    model = create_model(name)
    x = torch.rand(1, model.in_channels, model.image_size, model.image_size)
    out = model(x)
    assert isinstance(out, MatrixCapsOutput)
    assert out.activations.shape == (1, model.num_classes)
    assert out.poses.shape == (1, model.num_classes, 4, 4)
    assert out.assignments.shape[0] == 1 and out.assignments.shape[2] == model.num_classes
    assert ((out.activations >= 0) & (out.activations <= 1)).all()


def test_model_attributes():
    model = create_model("em_mnist")
    assert (model.in_channels, model.image_size, model.num_classes) == (1, 28, 10)
    model = create_model("em_small", in_channels=2)
    assert (model.in_channels, model.image_size, model.num_classes) == (2, 32, 5)


@pytest.mark.parametrize("name", EM_MODELS)
def test_every_parameter_gets_a_finite_gradient(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.rand(2, model.in_channels, model.image_size, model.image_size)
    out = model(x)
    (out.activations.sum() + out.poses.sum()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("schedule", ["fan_in", "linear", "authors"])
def test_every_lambda_schedule_trains_a_step_without_nan(schedule):
    from capsnet.functional import spread_loss

    torch.manual_seed(0)
    model = create_model("em_tiny", schedule=schedule)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        loss = spread_loss(model(x).activations, y, margin=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_authors_schedule_uses_large_negative_beta_a_init():
    model = create_model("em_tiny", schedule="authors")
    assert model.caps1.beta_a.mean() < -100
    assert create_model("em_tiny").caps1.beta_a.abs().max() == 0


def test_per_capsule_betas_have_one_value_per_output_capsule():
    model = create_model("em_small", beta="capsule")
    assert model.caps1.beta_a.shape == (36, 16)  # 6 x 6 positions, 16 types
    assert model.caps2.beta_v.shape == (16, 16)  # 4 x 4 positions
    assert model.classes.beta_a.shape == (1, 5)
    assert model(torch.rand(1, 1, 32, 32)).activations.shape == (1, 5)


def test_coordinate_addition_changes_exactly_elements_3_and_7_of_the_votes():
    torch.manual_seed(0)
    with_coords = ClassMatCaps(3, 5, in_size=(4, 4))
    without = ClassMatCaps(3, 5, in_size=(4, 4), coordinate_addition=False)
    without.load_state_dict(with_coords.state_dict())
    poses = torch.randn(2, 4, 4, 3, 4, 4)
    diff = with_coords.votes(poses) - without.votes(poses)  # (B, 1, I, J, 16)
    changed = (diff.abs() > 0).flatten(0, 3).any(0)
    assert changed.nonzero().flatten().tolist() == [3, 7]
    # IBM scaling, column to element 3, row to element 7; children ordered (type, row, column).
    offsets = diff[0, 0, :, 0].reshape(3, 4, 4, 16)
    torch.testing.assert_close(offsets[1, 2, 3, 3], torch.tensor(3.5 / 4))
    torch.testing.assert_close(offsets[1, 2, 3, 7], torch.tensor(2.5 / 4))


def test_coordinate_order_row_column_swaps_the_elements():
    col_row = coordinate_offsets((2, 3), 1)
    row_col = coordinate_offsets((2, 3), 1, order="row_column")
    torch.testing.assert_close(col_row[:, 3], row_col[:, 7])
    torch.testing.assert_close(col_row[:, 7], row_col[:, 3])
    with pytest.raises(ValueError, match="order"):
        coordinate_offsets((2, 3), 1, order="xy")


def test_conv_votes_are_pose_times_transform_for_every_slot():
    torch.manual_seed(0)
    layer = ConvMatCaps(2, 3, kernel_size=3, stride=2).double()
    poses = torch.randn(2, 5, 5, 2, 4, 4, dtype=torch.float64)
    votes = layer.votes(poses)  # (B, L, I, J, 16)
    assert votes.shape == (2, 4, 18, 3, 16)
    for l, (y, x) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        for i in range(18):
            ky, kx, t = i // 6, (i // 2) % 3, i % 2
            expected = torch.einsum("pq,jqr->jpr", poses[1, y + ky, x + kx, t], layer.weight[i])
            torch.testing.assert_close(votes[1, l, i], expected.reshape(3, 16))


def test_primary_caps_shapes_and_range():
    layer = PrimaryMatCaps(6, 4)
    out = layer(torch.randn(3, 6, 7, 7))
    assert out.poses.shape == (3, 7, 7, 4, 4, 4)
    assert out.activations.shape == (3, 7, 7, 4)
    assert ((out.activations >= 0) & (out.activations <= 1)).all()
    assert _count(layer) == (6 + 1) * 4 * 17


def test_gradcheck_small_conv_capsule_layer_float64():
    torch.manual_seed(0)
    layer = ConvMatCaps(2, 2, kernel_size=2, stride=1, iterations=2).double()
    poses = torch.randn(1, 3, 3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    params = tuple(t.detach().clone().requires_grad_() for t in (layer.weight, layer.beta_a, layer.beta_v))

    def fn(p, a, w, ba, bv):
        out = torch.func.functional_call(layer, {"weight": w, "beta_a": ba, "beta_v": bv}, (p, a))
        return out.poses, out.activations

    assert gradcheck(fn, (poses, acts, *params), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(2, 2, 32, 32), "channel"),
        (torch.rand(2, 1, 28, 28), "32x32"),
        (torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8), "floating"),
        (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
        (torch.rand(1, 32, 32), "shape"),
    ],
)
def test_bad_images_raise_value_error(x, message):
    with pytest.raises(ValueError, match=message):
        create_model("em_tiny")(x)


def test_bad_labels_raise_value_error():
    with pytest.raises(ValueError, match="labels"):
        create_model("em_tiny")(torch.rand(2, 1, 32, 32), torch.tensor([0, 7]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=12), "too small"),
        (dict(beta="layer"), "beta must be"),
        (dict(schedule="cosine"), "schedule must be"),
        (dict(conv_channels=0), "positive"),
        (dict(iterations=0), "iterations"),
        (dict(class_beta_a=float("nan")), "class_beta_a"),
        (dict(class_beta_a=True), "class_beta_a"),
        (dict(class_beta_a="-2"), "class_beta_a"),
        (dict(class_transforms="position", coordinate_order="bogus"), "coordinate_order"),
        (dict(stem_depth=-1), "stem_depth"),
        (dict(class_transforms="per_class"), "class_transforms"),
        (dict(stem_depth=1.5), "stem_depth"),
    ],
)
def test_bad_hyper_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatrixCapsNet(**kwargs)


def test_layers_reject_wrong_capsule_grids():
    layer = ConvMatCaps(4, 2)
    with pytest.raises(ValueError, match="poses"):
        layer(torch.randn(1, 5, 5, 3, 4, 4), torch.rand(1, 5, 5, 3))
    with pytest.raises(ValueError, match="activations"):
        layer(torch.randn(1, 5, 5, 4, 4, 4), torch.rand(1, 5, 5, 3))
    with pytest.raises(ValueError, match="poses"):
        ClassMatCaps(4, 5, in_size=(3, 3))(torch.randn(1, 4, 4, 4, 4, 4), torch.rand(1, 4, 4, 4))


@pytest.mark.parametrize("case", ["zero", "constant", "scaled_1e4"])
def test_model_values_and_gradients_stay_finite_on_degenerate_images(case):
    from capsnet.functional import spread_loss

    torch.manual_seed(0)
    model = create_model("em_tiny")
    x = {"zero": torch.zeros(2, 1, 32, 32), "constant": torch.full((2, 1, 32, 32), 0.5),
         "scaled_1e4": torch.rand(2, 1, 32, 32) * 1e4}[case]  # fmt: skip
    out = model(x)
    assert all(torch.isfinite(t).all() for t in out if t is not None)  # reconstruction: None without a decoder
    spread_loss(out.activations, torch.tensor([0, 1]), margin=0.9).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_layer_routing_defaults_are_em_routing_defaults():
    import inspect

    from capsnet.routing.em import em_routing

    routing = inspect.signature(em_routing).parameters
    torch.manual_seed(0)
    for layer in (ConvMatCaps(2, 3), ClassMatCaps(2, 3, in_size=(2, 2))):
        for name in ("iterations", "schedule", "final_lambda", "var_floor", "eps", "detach_intermediate"):
            assert getattr(layer, name) == routing[name].default, (type(layer).__name__, name)
        assert layer.beta_a.shape == (3,)  # beta="type"


def test_per_capsule_betas_need_the_input_grid_size():
    with pytest.raises(ValueError, match="in_size"):
        ConvMatCaps(2, 3, beta="capsule")
    assert ConvMatCaps(2, 3, beta="capsule", in_size=(5, 5)).beta_a.shape == (9, 3)  # 3 x 3 positions


def test_unknown_routing_keywords_are_rejected():
    with pytest.raises(TypeError, match="iteration"):
        ConvMatCaps(2, 3, iteration=2)


@pytest.mark.slow
def test_smallnorb_is_registered_by_importing_capsnet_data():
    """In a fresh interpreter: no config or caller has to import capsnet.data.smallnorb first."""
    import subprocess
    import sys

    code = "import capsnet.data as d, sys; sys.exit(0 if 'smallnorb' in d.list_datasets() else 1)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_em_model_refuses_images_of_another_dtype_by_name():
    model = create_model("em_tiny")
    with pytest.raises(ValueError, match="float64"):
        model(torch.rand(1, 1, 32, 32, dtype=torch.float64))


def _pixel_gradient(model):
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    out = model(x)
    (out.activations * torch.randn_like(out.activations)).sum().backward()
    return x.grad.abs().sum(0)[0]  # (28, 28)


def test_valid_conv1_leaves_the_last_pixels_unseen_and_padding_sees_them():
    torch.manual_seed(0)
    valid = _pixel_gradient(create_model("em_tiny", image_size=28, num_classes=10))
    assert (valid[25:, :] == 0).all() and (valid[:, 25:] == 0).all()  # the three rows and columns
    padded = _pixel_gradient(create_model("em_tiny", image_size=28, num_classes=10, conv_padding=1))
    assert (padded > 0).all()
    assert create_model("em_mnist", conv_padding=1).classes.in_size == (4, 4)  # 28 -> 13 -> 6 -> 4


def test_identity_init_makes_each_vote_start_near_its_child_pose():
    torch.manual_seed(0)
    model = create_model("em_mnist")  # TRAINABLE: identity plus noise of std 0.1
    for layer in (model.caps1, model.caps2):
        deviation = layer.weight.data - torch.eye(4)
        assert deviation.abs().max() <= 0.2 + 1e-6 and deviation.std() > 0.05  # I + truncated N(0, 0.1)
    torch.testing.assert_close(model.classes.weight.std(), torch.tensor(0.01), rtol=0.2, atol=0)  # unchanged
    with pytest.raises(ValueError, match="caps_init"):
        create_model("em_mnist", caps_init="eye")


def test_iterations_per_layer():
    model = create_model("em_mnist", iterations=(3, 2, 1))
    assert (model.caps1.iterations, model.caps2.iterations, model.classes.iterations) == (3, 2, 1)
    with pytest.raises(ValueError, match="three ints"):
        create_model("em_mnist", iterations=(3, 2))
    with pytest.raises(ValueError, match="three ints"):
        create_model("em_mnist", iterations=(3, 2, True))
    with pytest.raises(ValueError, match="one lambda per iteration"):
        create_model("em_tiny", iterations=(3, 2, 1), schedule=(0.1, 0.2, 0.3))


def test_final_lambda_per_layer():
    assert create_model("em_mnist").caps1.final_lambda == 5.0 and create_model("em_mnist").classes.final_lambda == 0.5
    # TRAINABLE's lambdas are fan-in values: another schedule gets its own default unless told.
    assert create_model("em_mnist", schedule="authors").caps1.final_lambda is None
    assert create_model("em_mnist", schedule=(0.1, 0.2, 0.3)).caps1.final_lambda is None
    assert create_model("em_mnist", schedule="linear", final_lambda=2.0).caps1.final_lambda == 2.0
    model = create_model("em_mnist", final_lambda=(5.0, 4.0, 0.5))
    assert (model.caps1.final_lambda, model.caps2.final_lambda, model.classes.final_lambda) == (5.0, 4.0, 0.5)
    model = create_model("em_mnist", final_lambda=2.0, schedule="fan_in")
    assert (model.caps1.final_lambda, model.caps2.final_lambda, model.classes.final_lambda) == (2.0, 2.0, 2.0)
    assert create_model("em_mnist", final_lambda=np.float32(2.0)).caps2.final_lambda == 2.0
    for bad in ((5.0, 0.5), (5.0, 5.0, "x"), (5.0, True, 0.5)):
        with pytest.raises(ValueError, match="three numbers"):
            create_model("em_mnist", final_lambda=bad)
    # A larger lambda in one layer sharpens that layer's activations and leaves the others as they were.
    x = torch.rand(4, 1, 28, 28)
    stats = {}
    for lambdas in ((0.5, 0.5, 0.5), (5.0, 5.0, 0.5)):
        torch.manual_seed(0)
        model = create_model("em_mnist", iterations=2, final_lambda=lambdas)
        model.record_routing_stats(True)
        with torch.no_grad():
            model(x)
        stats[lambdas] = model.training_metrics()
    soft, sharp = stats[(0.5, 0.5, 0.5)], stats[(5.0, 5.0, 0.5)]
    assert sharp["routing/caps1/it2/a_std"] > 3 * soft["routing/caps1/it2/a_std"]
    assert sharp["routing/caps2/it2/a_std"] > 3 * soft["routing/caps2/it2/a_std"]


def test_caps_init_std_follows_caps_init_unless_given():
    torch.manual_seed(0)
    assert create_model("em_mnist", caps_init="normal").caps1.weight.std() > 0.2  # Google's 0.3
    assert (create_model("em_mnist").caps1.weight - torch.eye(4)).std() < 0.12  # identity plus 0.1
    assert create_model("em_mnist", caps_init="normal", caps_init_std=0.05).caps1.weight.std() < 0.06


def test_training_metrics_report_routing_statistics_and_gradient_norms():
    torch.manual_seed(0)
    model = create_model("em_tiny", iterations=(2, 2, 3))
    x = torch.rand(2, 1, 32, 32)
    model(x).activations.sum().backward()
    assert not any(k.startswith("routing/") for k in model.training_metrics())  # off unless asked for
    model.record_routing_stats(True)
    model.zero_grad()
    model(x).activations.sum().backward()
    metrics = model.training_metrics()
    assert "routing/caps1/it2/r_entropy" in metrics and "routing/classes/it3/a_mean" in metrics
    assert "routing/caps1/it3/r_entropy" not in metrics
    assert metrics["grad_norm/classes/beta_a"] > 0 and metrics["grad_norm/conv1/weight"] > 0
    assert all(isinstance(v, float) and v == v for v in metrics.values())


def test_class_beta_a_starts_the_class_logits_lower_by_that_offset():
    torch.manual_seed(0)
    plain = create_model("em_tiny", iterations=(2, 2, 1))
    torch.manual_seed(0)
    low = create_model("em_tiny", iterations=(2, 2, 1), class_beta_a=-2.0)
    assert torch.equal(plain.classes.beta_a, torch.zeros(5)) and torch.equal(low.classes.beta_a, torch.full((5,), -2.0))
    assert torch.equal(low.caps1.beta_a, plain.caps1.beta_a)  # only the class layer's
    assert (create_model("em_tiny", schedule="authors").classes.beta_a < -100).all()  # None keeps the layer's init
    assert torch.equal(create_model("em_tiny", schedule="authors", class_beta_a=0.0).classes.beta_a, torch.zeros(5))
    x = torch.rand(3, 1, 32, 32)
    a, b = plain(x).activations, low(x).activations
    # "offset": beta_a is added to the logit; one class-layer M-step, so the logits differ by exactly -2
    # (with more iterations the activations also weight the E-step).
    torch.testing.assert_close(torch.logit(b.double()), torch.logit(a.double()) - 2.0, atol=1e-4, rtol=0)


def test_stem_depth_adds_same_size_relu_convolutions_before_primary_caps():
    plain, deep = create_model("em_mnist"), create_model("em_mnist", stem_depth=2)
    channels = plain.conv1.out_channels
    assert _count(deep) - _count(plain) == 2 * (channels * channels * 9 + channels)
    assert list(plain.state_dict()) == [k for k in deep.state_dict() if not k.startswith("stem.")]  # old checkpoints load
    out = deep(torch.rand(2, 1, 28, 28))
    out.activations.sum().backward()
    assert all(conv.weight.grad.abs().sum() > 0 for conv in deep.stem)


def test_position_class_transforms_are_one_per_grid_position():
    torch.manual_seed(0)
    shared, position = create_model("em_mnist"), create_model("em_mnist", class_transforms="position")
    types, classes, cells = 16, 10, 3 * 3
    assert _count(position) - _count(shared) == (cells - 1) * types * classes * 16
    x = torch.rand(3, 1, 28, 28)
    out, ref = position(x), shared(x)
    assert out.activations.shape == ref.activations.shape and out.poses.shape == ref.poses.shape
    assert out.assignments.shape == ref.assignments.shape == (3, types * cells, classes)
    torch.testing.assert_close(out.assignments.sum(-1), torch.ones(3, types * cells))
    out.activations.sum().backward()
    assert position.classes.weight.grad.abs().sum() > 0


def test_position_class_transforms_tiled_from_shared_ones_equal_the_shared_layer():
    """Every position given the shared transform (and no coordinate addition): the same network,
    so activations, poses and R (children in ClassMatCaps' (type, h, w) order) agree."""
    torch.manual_seed(0)
    shared = create_model("em_mnist", coordinate_addition=False).double()
    position = create_model("em_mnist", class_transforms="position").double()
    state = {k: v for k, v in shared.state_dict().items() if k != "classes.weight"}
    tiled = shared.classes.weight.detach().repeat(9, 1, 1, 1)  # children (h, w, t): t fastest
    position.load_state_dict({**state, "classes.weight": tiled})
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    out, ref = position(x), shared(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_conv_norm_adds_a_batch_norm_after_conv1():
    plain, normed = create_model("em_mnist"), create_model("em_mnist", conv_norm=True)
    assert _count(normed) - _count(plain) == 2 * plain.conv1.out_channels  # BN's weight and bias
    out = normed(torch.rand(3, 1, 28, 28))
    assert torch.isfinite(out.activations).all()


def test_builders_default_to_the_trainable_parametrisation_and_paper_is_one_keyword_away():
    from capsnet.models.em import PAPER, TRAINABLE

    for name in EM_MODELS:
        model = create_model(name)
        assert model.caps1.activation == TRAINABLE["activation"]
        paper = create_model(name, **PAPER)
        assert (paper.caps1.activation, paper.classes.activation) == ("paper", "paper")
        assert paper.caps1.weight.diagonal(dim1=-2, dim2=-1).mean().abs() < 0.1  # no identity in the paper's init
    assert MatrixCapsNet().caps1.activation == "paper"  # the class itself is the paper's


def test_checkpoints_from_before_the_trainable_default_load_with_the_paper_parametrisation(tmp_path):
    from capsnet.train import TrainConfig, load_checkpoint, train
    from capsnet.train.checkpoint import CheckpointError, save_checkpoint
    from capsnet.train.loop import load_model

    cfg = TrainConfig(model="em_tiny", model_kwargs=dict(iterations=2, image_size=28, num_classes=10), dataset="synthetic",
                      dataset_kwargs=dict(train_size=16, val_size=8, test_size=8, image_size=28, num_classes=10),
                      objective="spread", batch_size=8, epochs=1, figures=False)
    train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False)
    new = load_checkpoint(tmp_path / "run" / "last.pt")
    assert new["format"] == 4 and load_model(tmp_path / "run" / "best.pt")[0].caps1.activation == "offset"
    assert load_model(tmp_path / "run" / "best.pt")[0].caps1.final_lambda == 5.0
    old = {k: v for k, v in new.items() if k not in ("format", "numerics")}  # what session 5 wrote
    save_checkpoint(old, tmp_path / "old.pt")
    model, _, _ = load_model(tmp_path / "old.pt")
    assert (model.caps1.activation, model.classes.activation) == ("paper", "paper")
    assert (model.caps1.final_lambda, model.classes.final_lambda) == (None, None)
    save_checkpoint(old, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="model_kwargs.activation=paper"):
        train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False, resume=True)
    # Sessions 6-7 (format 2): TRAINABLE with one lambda (1/2) in every layer.
    session7 = dict(new, format=2)
    save_checkpoint(session7, tmp_path / "s7.pt")
    model, _, _ = load_model(tmp_path / "s7.pt")
    assert (model.caps1.activation, model.caps1.final_lambda, model.classes.final_lambda) == ("centred", None, None)
    save_checkpoint(session7, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="model_kwargs.final_lambda=None"):
        train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False, resume=True)
    # Session 8 (format 3): TRAINABLE's per-layer lambdas with the centred activation.
    session8 = dict(new, format=3)
    save_checkpoint(session8, tmp_path / "s8.pt")
    model, _, _ = load_model(tmp_path / "s8.pt")
    assert (model.caps1.activation, model.classes.activation, model.caps1.final_lambda) == ("centred", "centred", 5.0)
    save_checkpoint(session8, tmp_path / "run" / "last.pt")
    with pytest.raises(CheckpointError, match="model_kwargs.activation=centred"):
        train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False, resume=True)
    # Another schedule never had TRAINABLE's lambdas: a format-2 checkpoint of it rebuilds with the centred logit only.
    from capsnet.train.restore import checkpoint_model_kwargs

    authors = TrainConfig(**{**cfg.to_dict(), "model_kwargs": dict(cfg.model_kwargs, schedule="authors")})
    assert checkpoint_model_kwargs(authors, session7) == {"activation": "centred", **authors.model_kwargs}
    # A config that names its activation keeps it, whatever the format.
    named = TrainConfig(**{**cfg.to_dict(), "model_kwargs": dict(cfg.model_kwargs, activation="standardised")})
    assert checkpoint_model_kwargs(named, session8) == named.model_kwargs


def test_routing_statistics_reach_the_training_log(tmp_path):
    from capsnet.train import TrainConfig, train

    cfg = TrainConfig(model="em_tiny", model_kwargs=dict(image_size=28, num_classes=10, routing_stats=True),
                      dataset="synthetic", dataset_kwargs=dict(train_size=16, val_size=8, test_size=8, image_size=28, num_classes=10),
                      objective="spread", batch_size=8, epochs=1, log_every=1, figures=False)
    train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False)
    logged = (tmp_path / "run" / "metrics.csv").read_text()
    for key in ("routing/caps1/it1/r_entropy", "routing/classes/it3/var_floor_fraction", "grad_norm/classes/beta_a"):
        assert f",{key}," in logged, key


def test_em_mnist_config_routes_twice_and_keeps_the_papers_three_as_variants():
    """The CPU budgets route the wide network with 2 iterations at lr 2e-3 (``short``: 3e-3);
    ``_it3`` (lr 2e-3, E-steps at temperature 2) and ``:paper`` keep the paper's 3; ``:epoch3`` runs batch 16 with
    an average of the weights (``:epoch3_batch32``, its ``_it3`` and ``_small``: batch 32 without); ``_small`` is em_mnist's own network;
    ``_wide`` (sessions 12-13's name) changes nothing."""
    from pathlib import Path

    from capsnet.models.em import PAPER
    from capsnet.train import load_config

    path = str(Path(__file__).resolve().parents[1] / "configs" / "mnist_em.py")
    wide_kwargs = dict(iterations=2, primary_types=16, caps1_types=32, caps2_types=32, class_transforms="position")
    for variant in ("epoch1", "epoch3", "epoch3_batch32", "short", "fashion_epoch3", "fashion", "default"):
        cfg = load_config(path if variant == "default" else f"{path}:{variant}")
        assert cfg.model_kwargs == wide_kwargs, variant
        if variant not in ("fashion", "default"):
            lr = 3e-3 if variant == "short" else 2e-3
            batch = 16 if variant == "epoch3" else 32
            assert (cfg.lr, cfg.batch_size, cfg.amp, cfg.ema_decay) == (lr, batch, None, 0.9995 if batch == 16 else None), variant
        it3 = load_config(f"{path}:{variant}_it3")
        assert it3.model_kwargs == dict(wide_kwargs, iterations=3, e_step_temperature=2.0)
        assert (it3.lr, it3.max_steps, it3.epochs) == (cfg.lr if variant in ("fashion", "default") else 2e-3, cfg.max_steps, cfg.epochs)
        assert (it3.batch_size, it3.ema_decay) == (cfg.batch_size, cfg.ema_decay) or variant == "epoch3"  # batch 16 and the average: 2 iterations
        small = load_config(f"{path}:{variant}_small")
        assert small.model_kwargs == dict(iterations=2), variant
        assert (small.lr, small.max_steps, small.epochs) == (cfg.lr, cfg.max_steps, cfg.epochs)
        if variant.startswith("epoch3"):  # the wide network's batch 16 and average are not the small network's
            assert (small.batch_size, small.ema_decay, it3.batch_size, it3.ema_decay) == (32, None, 32, None), variant
            assert load_config(f"{path}:epoch3_batch32").objective_kwargs["steps"] == 5157
            assert cfg.objective_kwargs["steps"] == (10314 if variant == "epoch3" else 5157), variant
        assert load_config(f"{path}:{variant}_it3_small").model_kwargs == dict(iterations=3, e_step_temperature=2.0)
        assert load_config(f"{path}:{variant}_wide").to_dict() == cfg.to_dict()
        assert load_config(f"{path}:{variant}_it3_wide").to_dict() == it3.to_dict()
    paper = load_config(f"{path}:paper")
    assert paper.model_kwargs == dict(iterations=3, **PAPER)
    wide = create_model("em_mnist", **load_config(f"{path}:epoch3").model_kwargs)
    assert sum(p.numel() for p in wide.parameters()) == 286_756  # the docstring's count
    small = create_model("em_mnist", **load_config(f"{path}:epoch3_small").model_kwargs)
    assert sum(p.numel() for p in small.parameters()) == 68_444
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        load_config(f"{path}:nope")
    for suffix in ("_wide", "_small", "_it3"):
        with pytest.raises(ValueError, match="smoke takes no _it3, _wide or _small suffix"):
            load_config(f"{path}:smoke{suffix}")
        with pytest.raises(ValueError, match="paper takes no suffix"):
            load_config(f"{path}:paper{suffix}")
    with pytest.raises(ValueError, match="unknown variant 'epoch3_small_it3'"):  # the suffixes' order is fixed
        load_config(f"{path}:epoch3_small_it3")


def test_em_model_trains_with_the_activation_cross_entropy_objective(tmp_path):
    """The option runs end to end: the loss falls on a fixed batch and the scores are the activations."""
    from capsnet.train import TrainConfig, train
    from capsnet.train.objectives import create_objective

    objective = create_objective("activation_cross_entropy")
    torch.manual_seed(0)
    model = create_model("em_tiny", iterations=2, image_size=28, num_classes=10)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(x)
        loss = objective.loss(out, x, y, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.equal(objective.scores(out), out.activations)
    cfg = TrainConfig(model="em_tiny", model_kwargs=dict(iterations=2, image_size=28, num_classes=10), dataset="synthetic",
                      dataset_kwargs=dict(train_size=16, val_size=8, test_size=8, image_size=28, num_classes=10),
                      objective="activation_cross_entropy", batch_size=8, epochs=1, figures=False)
    summary = train(cfg, data_root=tmp_path, out_dir=tmp_path / "run", progress=False, final_test=False)
    assert summary is not None and (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("class_transforms", ["shared", "position"])
def test_decoder_reconstructs_from_the_labelled_class_pose(class_transforms):
    """``decoder=True``: Sabour et al.'s decoder on the 16 pose elements; the true class masks in
    training, the most active class without labels; ``reconstruct`` decodes any poses."""
    torch.manual_seed(0)
    plain = create_model("em_mnist", class_transforms=class_transforms)
    model = create_model("em_mnist", class_transforms=class_transforms, decoder=True)
    decoder_params = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + decoder_params
    assert plain(torch.rand(2, 1, 28, 28)).reconstruction is None
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([1, 4, 7])
    out = model(x, y)
    assert out.reconstruction.shape == (3, 1, 28, 28)
    torch.testing.assert_close(out.reconstruction, model.reconstruct(out.poses, y))
    other = model.reconstruct(out.poses, (y + 1) % 10)
    assert not torch.allclose(other, out.reconstruction)  # the mask picks the class
    unlabelled = model(x)
    torch.testing.assert_close(unlabelled.reconstruction, model.reconstruct(out.poses, out.activations.argmax(1)))
    with pytest.raises(ValueError, match="decoder=False"):
        plain.reconstruct(out.poses, y)
    with pytest.raises(ValueError, match="decoder must be True or False"):
        create_model("em_mnist", decoder="yes")


def test_spread_objective_adds_the_weighted_reconstruction_loss_and_refuses_a_model_without_decoder():
    from capsnet.functional import reconstruction_loss, spread_loss
    from capsnet.train.objectives import create_objective
    from capsnet.train.schedules import spread_margin

    torch.manual_seed(1)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 5, 9])
    schedule = dict(schedule="linear", start=0.2, end=0.9, steps=10)
    out = create_model("em_mnist", decoder=True)(x, y)
    loss = create_objective("spread", recon_weight=0.01, **schedule).loss(out, x, y, 4)
    margin = spread_margin(4, **schedule)
    expected = spread_loss(out.activations, y, margin=margin) + reconstruction_loss(out.reconstruction, x, weight=0.01)
    torch.testing.assert_close(loss, expected)
    plain = create_model("em_mnist")(x, y)
    assert float(create_objective("spread", **schedule).loss(plain, x, y, 4)) == pytest.approx(float(spread_loss(plain.activations, y, margin=margin)))
    with pytest.raises(ValueError, match="decoder"):
        create_objective("spread", recon_weight=0.01, **schedule).loss(create_model("em_mnist")(x, y), x, y, 4)
    with pytest.raises(ValueError, match="recon_weight"):
        create_objective("spread", recon_weight=-1.0, **schedule)
    with pytest.raises(ValueError, match="recon_weight > 0"):  # a decoder that nothing trains (and DDP's unused parameters)
        create_objective("spread", **schedule).loss(out, x, y, 4)

"""MultiMNIST (Sabour et al. 2017, Sec. 6): pair generation, the two-digit metric, per-digit reconstructions."""

from __future__ import annotations

import pytest
import torch

from capsnet import create_model
from capsnet.data import Split, load_dataset
from capsnet.data.multimnist import (
    MultiDigitTarget,
    MultiMNISTData,
    class_index,
    combine_digits,
    fixed_pairs,
    multimnist_data,
    place_digits,
    render_pairs,
    sample_pairs,
)
from capsnet.functional import matched_reconstruction_loss, multi_hot, sigmoid_cross_entropy, two_digit_accuracy, two_digit_correct
from capsnet.models.multimnist import MultiCapsNetOutput, MultiDigitCapsNet
from capsnet.train.objectives import MultiDigitMarginObjective, SigmoidCrossEntropyObjective

TINY_CAPS = dict(conv_channels=16, primary_types=4, primary_dim=4, class_dim=8, decoder_hidden=(32,))


def _digits(n: int = 40, seed: int = 0) -> Split:
    """Hand-made 28x28 'digits': a random blob inside the central 20x20, so every shift keeps it whole."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:24, 4:24] = (torch.rand(n, 1, 20, 20, generator=g) > 0.6).to(torch.uint8) * 200
    return Split(images, torch.arange(n) % 10)


@pytest.fixture(scope="module")
def data() -> MultiMNISTData:
    return multimnist_data(".", source="synthetic", train_size=64, val_size=32, test_size=32, test_pairs=48)


@pytest.fixture(scope="module")
def tiny_model() -> MultiDigitCapsNet:
    torch.manual_seed(0)
    model = create_model("capsnet_multimnist", **TINY_CAPS).eval()
    with torch.no_grad():
        model.digits.weight.mul_(100)  # class capsules long enough for the decoder input to matter
    return model


# --------------------------------------------------------------------------- pair generation


def test_pairs_hold_two_digits_of_different_classes():
    split = _digits(200)
    recipe = sample_pairs(split.labels, torch.arange(200), torch.Generator().manual_seed(0))
    assert bool((split.labels[recipe.first] != split.labels[recipe.second]).all())
    assert torch.equal(recipe.first, torch.arange(200))


def test_partners_cover_every_other_class():
    labels = torch.arange(300) % 3
    recipe = sample_pairs(labels, torch.zeros(600, dtype=torch.long), torch.Generator().manual_seed(0))
    partner_classes = labels[recipe.second]
    assert set(partner_classes.tolist()) == {1, 2}  # base class 0: partners of both other classes
    assert 0.35 < float((partner_classes == 1).float().mean()) < 0.65


def test_shifts_stay_within_four_pixels_and_digits_are_exactly_placed():
    split = _digits(16)
    recipe = sample_pairs(split.labels, torch.arange(16), torch.Generator().manual_seed(1), shift=4)
    assert int(recipe.offsets.min()) >= 0 and int(recipe.offsets.max()) <= 8  # shift in [-4, 4] around offset 4
    assert len(set(map(tuple, recipe.offsets.reshape(-1, 2).tolist()))) > 10, "shifts vary"
    overlay, target = render_pairs(split.images, split.labels, recipe, shift=4)
    assert overlay.shape == (16, 1, 36, 36) and target.digits.shape == (16, 2, 1, 36, 36)
    for b in range(16):
        for k, index in enumerate((recipe.first[b], recipe.second[b])):
            r, c = recipe.offsets[b, k].tolist()
            expected = torch.zeros(1, 36, 36)
            expected[:, r : r + 28, c : c + 28] = split.images[index].float() / 255
            assert torch.equal(target.digits[b, k], expected)


def test_overlay_is_the_clipped_sum_of_the_two_shifted_digits():
    split = _digits(16)
    recipe = sample_pairs(split.labels, torch.arange(16), torch.Generator().manual_seed(2))
    overlay, target = render_pairs(split.images, split.labels, recipe, combine="sum")
    assert float(overlay.min()) >= 0.0 and float(overlay.max()) == 1.0  # 200/255 + 200/255 clips at 1
    torch.testing.assert_close(overlay, (target.digits[:, 0] + target.digits[:, 1]).clamp(max=1.0))
    maxed, _ = render_pairs(split.images, split.labels, recipe, combine="max")
    torch.testing.assert_close(maxed, torch.maximum(target.digits[:, 0], target.digits[:, 1]))


def test_targets_name_the_classes_of_the_two_digits():
    split = _digits(30)
    recipe = sample_pairs(split.labels, torch.arange(30), torch.Generator().manual_seed(3))
    _, target = render_pairs(split.images, split.labels, recipe)
    assert torch.equal(target.classes, torch.stack([split.labels[recipe.first], split.labels[recipe.second]], 1))


def test_same_seed_gives_the_same_pairs_and_another_seed_different_ones(data):
    index = torch.arange(16)
    a = data.train_batch(index, torch.Generator().manual_seed(5))
    b = data.train_batch(index, torch.Generator().manual_seed(5))
    c = data.train_batch(index, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].classes, b[1].classes)
    assert not torch.equal(a[0], c[0])


def test_precomputed_class_index_draws_the_same_pairs():
    labels, index = torch.arange(50) % 7, torch.arange(20)
    a = sample_pairs(labels, index, torch.Generator().manual_seed(0))
    b = sample_pairs(class_index(labels), index, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_restoring_the_generator_state_replays_the_same_pairs(data):
    """What makes a resumed run exact: the loop checkpoints its generator, and pairs come only from it."""
    g = torch.Generator().manual_seed(0)
    data.train_batch(torch.arange(8), g)
    state = g.get_state()
    straight = [data.train_batch(torch.arange(8, 16), g)[0] for _ in range(2)]
    g.set_state(state)
    resumed = [data.train_batch(torch.arange(8, 16), g)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_training_pairs_are_fresh_each_draw(data):
    g = torch.Generator().manual_seed(0)
    first, second = data.train_batch(torch.arange(16), g), data.train_batch(torch.arange(16), g)
    assert torch.equal(first[1].classes[:, 0], second[1].classes[:, 0])  # same base digits
    assert not torch.equal(first[0], second[0])  # new partners and shifts


def test_test_pairs_depend_only_on_the_pairs_seed(monkeypatch):
    from capsnet.data import ExperimentData, multimnist

    digits = _digits(20)
    fixed_source = ExperimentData(name="fixed", train=digits, val=digits, test=digits, num_classes=10)
    monkeypatch.setattr(multimnist, "load_dataset", lambda *args, **kwargs: fixed_source)

    def test_images(seed, pairs_seed=0):
        d = multimnist_data(".", seed=seed, pairs_seed=pairs_seed, test_pairs=30)
        return torch.cat([x for x, _ in d.eval_batches("test", 7)])

    assert torch.equal(test_images(0), test_images(0))
    assert torch.equal(test_images(0), test_images(1)), "runs with different seeds are scored on the same pairs"
    assert not torch.equal(test_images(0), test_images(0, pairs_seed=1))


def test_eval_batches_cover_the_fixed_pairs_in_order(data):
    batches = list(data.eval_batches("test", 20))
    assert [x.shape[0] for x, _ in batches] == [20, 20, 8]
    assert data.size("test") == 48 and data.size("val") == 32 and data.size("train") == 64
    assert data.image_shape == (1, 36, 36)
    assert all(isinstance(t, MultiDigitTarget) for _, t in batches)


def test_targets_index_and_move_like_a_batch(data):
    _, target = next(data.eval_batches("test", 6))
    assert len(target) == 6
    part = target[torch.tensor([1, 3])]
    assert torch.equal(part.classes, target.classes[[1, 3]]) and torch.equal(part.digits, target.digits[[1, 3]])
    assert len(target[2:]) == 4 and target.to("cpu").classes is not None
    with pytest.raises(ValueError, match="slice or an index tensor"):
        target[0]
    with pytest.raises(ValueError, match=r"classes \(B, K\).*\(3,\)"):
        MultiDigitTarget(torch.zeros(3, dtype=torch.long), torch.zeros(3, 2, 1, 4, 4))


def test_fixed_pairs_cycle_through_the_digits():
    recipe = fixed_pairs(torch.arange(10) % 5, 25, seed=0)
    assert recipe.first.tolist() == [i % 10 for i in range(25)]


def test_a_split_of_one_class_has_no_partners():
    with pytest.raises(ValueError, match="no partner of another class"):
        sample_pairs(torch.zeros(5, dtype=torch.long), torch.arange(5))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: place_digits(torch.ones(2, 1, 28, 28), torch.tensor([[0, 9], [0, 0]]), 36), r"cols in \[0, 8\].*max col 9"),
        (lambda: place_digits(torch.ones(2, 1, 28, 28), torch.zeros(2, 3, dtype=torch.long), 36), r"\(2, 2\).*\(2, 3\)"),
        (lambda: combine_digits(torch.ones(2, 2, 1, 36, 36), "mean"), r"'sum', 'max'.*'mean'"),
        (lambda: sample_pairs(torch.rand(4), torch.arange(2)), r"integer classes.*float32"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_real_multimnist(data_root):
    d = load_dataset("multimnist", data_root, test_pairs=100, limit_train=1000, limit_eval=500)
    images, target = d.train_batch(torch.arange(64), torch.Generator().manual_seed(0))
    assert images.shape == (64, 1, 36, 36) and float(images.max()) == 1.0
    assert bool((target.classes[:, 0] != target.classes[:, 1]).all())
    assert d.size("test") == 100


# --------------------------------------------------------------------------- the two-digit metric


def test_two_digit_metric_needs_exactly_the_two_digits_in_any_order():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0, 0, 0, 0, 0, 0, 0],  # top two {0, 1}
            [0.9, 0.8, 0.1, 0.0, 0, 0, 0, 0, 0, 0],  # same scores
            [0.1, 0.2, 0.9, 0.0, 0, 0, 0, 0, 0, 0.3],  # top two {2, 9}
            [0.1, 0.2, 0.9, 0.0, 0, 0, 0, 0, 0, 0.3],  # same scores
        ]
    )
    classes = torch.tensor([[1, 0], [0, 2], [9, 2], [2, 1]])
    assert two_digit_correct(scores, classes).tolist() == [True, False, True, False]
    assert two_digit_accuracy(scores, classes) == 0.5


def test_two_digit_metric_with_one_digit_is_argmax_accuracy():
    scores = torch.randn(50, 10)
    labels = torch.randint(0, 10, (50,))
    assert torch.equal(two_digit_correct(scores, labels), scores.argmax(1) == labels)


def test_two_digit_metric_refuses_repeated_classes():
    with pytest.raises(ValueError, match="must all differ"):
        two_digit_correct(torch.rand(1, 10), torch.tensor([[3, 3]]))


def test_multi_hot_marks_both_digits():
    assert multi_hot(torch.tensor([[1, 3]]), 5).tolist() == [[0, 1, 0, 1, 0]]


def test_sigmoid_cross_entropy_sums_over_classes():
    logits = torch.randn(3, 4)
    classes = torch.tensor([[0, 1], [2, 3], [1, 3]])
    target = torch.zeros(3, 4).scatter_(1, classes, 1.0)
    expected = -(target * torch.log(torch.sigmoid(logits)) + (1 - target) * torch.log(1 - torch.sigmoid(logits))).sum(1).mean()
    torch.testing.assert_close(sigmoid_cross_entropy(logits, classes), expected)


# --------------------------------------------------------------------------- per-digit reconstructions


def test_capsnet_multimnist_has_the_papers_parameter_count():
    assert sum(p.numel() for p in create_model("capsnet_multimnist").parameters()) == 11_361_808  # 11.36M


def test_each_reconstruction_is_masked_by_its_own_digit(tiny_model):
    x = torch.rand(3, 1, 36, 36)
    y = torch.tensor([[1, 7], [0, 4], [9, 2]])
    with torch.no_grad():
        out = tiny_model(x, y)
        first = tiny_model.reconstruct(out.poses, y[:, 0])
        second = tiny_model.reconstruct(out.poses, y[:, 1])
    assert isinstance(out, MultiCapsNetOutput) and out.reconstructions.shape == (3, 2, 1, 36, 36)
    assert torch.equal(out.masks, y)
    torch.testing.assert_close(out.reconstructions[:, 0], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.reconstructions[:, 1], second, rtol=0, atol=1e-6)
    assert (first - second).abs().max() > 1e-4, "the mask must change the reconstruction"
    torch.testing.assert_close(out.reconstruction, (first + second).clamp(max=1.0), rtol=0, atol=1e-6)


def test_multidigit_capsnet_matches_capsnet_with_the_same_weights(tiny_model):
    """The subclass repeats CapsNet's encoder; this keeps the two from drifting apart."""
    from capsnet.models import CapsNet

    plain = CapsNet(image_size=36, **TINY_CAPS).eval()
    plain.load_state_dict(tiny_model.state_dict())
    x, y = torch.rand(3, 1, 36, 36), torch.tensor([2, 5, 7])
    with torch.no_grad():
        ours, theirs = tiny_model(x, y), plain(x, y)
    for field in ("lengths", "poses", "reconstruction", "coupling", "primary"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=0, atol=1e-6, msg=field)


def test_without_labels_the_two_longest_capsules_are_reconstructed(tiny_model):
    x = torch.rand(4, 1, 36, 36)
    with torch.no_grad():
        out = tiny_model(x)
    assert torch.equal(out.masks, out.lengths.topk(2, dim=1).indices)
    with torch.no_grad():
        expected = tiny_model.reconstruct(out.poses, out.masks[:, 1])
    torch.testing.assert_close(out.reconstructions[:, 1], expected, rtol=0, atol=1e-6)


def test_single_labels_give_one_reconstruction_like_capsnet(tiny_model):
    x = torch.rand(2, 1, 36, 36)
    y = torch.tensor([3, 5])
    with torch.no_grad():
        out = tiny_model(x, y)
    assert out.reconstructions.shape == (2, 1, 1, 36, 36)
    torch.testing.assert_close(out.reconstruction, out.reconstructions[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (torch.tensor([[0, 10], [1, 2]]), r"\[0, 9\].*max 10"),
        (torch.tensor([[0, 1]]), r"\(2, K\).*\(1, 2\)"),
        (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), r"integer.*float32"),
    ],
)
def test_bad_label_pairs_are_named(tiny_model, y, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.rand(2, 1, 36, 36), y)


def test_matched_reconstruction_targets_follow_the_mask_class():
    digits = torch.rand(1, 2, 1, 4, 4)
    classes = torch.tensor([[3, 8]])
    # Masks in the other order: reconstruction 0 (class 8) meets digit 1, and vice versa.
    recon = digits.flip(1)
    assert float(matched_reconstruction_loss(recon, torch.tensor([[8, 3]]), classes, digits)) == 0.0
    # A capsule of an absent class is compared with a black image.
    loss = matched_reconstruction_loss(recon, torch.tensor([[8, 5]]), classes, digits, weight=1.0)
    torch.testing.assert_close(loss, digits[0, 0].pow(2).sum())


def test_multi_margin_objective_reduces_to_the_mnist_objective_for_one_digit(tiny_model):
    from capsnet.train.objectives import create_objective

    x, y = torch.rand(4, 1, 36, 36), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        out = tiny_model(x, y)
    ours = MultiDigitMarginObjective().loss(out, x, y, 0)
    theirs = create_objective("margin").loss(out, x, y, 0)
    torch.testing.assert_close(ours, theirs)


def test_multimnist_training_step_sends_gradients_everywhere(data):
    """The pieces the training loop joins: pairs -> model(overlay, classes) -> loss -> every gradient."""
    torch.manual_seed(0)
    model = create_model("capsnet_multimnist", **TINY_CAPS)
    objective = MultiDigitMarginObjective()
    images, target = data.train_batch(torch.arange(8), torch.Generator().manual_seed(0))
    out = model(images, objective.teacher(target))
    loss = objective.loss(out, images, target, 0)
    loss.backward()
    assert all(p.grad is not None and bool((p.grad != 0).any()) for p in model.parameters())
    assert objective.correct(out, target).shape == (8,)
    model.eval()
    with torch.no_grad():
        images, target = next(data.eval_batches("test", 8))
        assert bool(torch.isfinite(objective.loss(model(images), images, target, 0)))


def test_baseline_objective_scores_the_two_highest_outputs():
    objective = SigmoidCrossEntropyObjective()
    output = create_model("cnn_multimnist", channels=(4, 4), hidden=(8,))(torch.rand(2, 1, 36, 36))
    target = MultiDigitTarget(torch.tensor([[0, 1], [2, 3]]), torch.zeros(2, 2, 1, 36, 36))
    assert objective.loss(output, None, target, 0).dim() == 0
    assert torch.equal(objective.correct(output, target), two_digit_correct(output.logits, target.classes))


def test_multimnist_figure_writes_a_png(tmp_path, tiny_model, data):
    from capsnet.viz.multimnist import multimnist_figure, two_colour_overlay

    images, target = next(data.eval_batches("test", 4))
    with torch.no_grad():
        out = tiny_model(images)
    path = multimnist_figure(images, out.reconstructions, tmp_path / "m.png", classes=target.classes, masks=out.masks)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = two_colour_overlay(torch.ones(1, 3, 3), torch.zeros(1, 3, 3))
    assert rgb.shape == (3, 3, 3) and rgb[..., 0].min() == 1.0 and rgb[..., 1].max() == 0.0
    with pytest.raises(ValueError, match=r"\(N, 2, 1, H, W\)"):
        multimnist_figure(images, out.reconstructions[:, :1], tmp_path / "bad.png")

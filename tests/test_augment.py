"""The Efficient-CapsNet training augmentation (capsnet.data.transforms) and the data option that applies it.

Each piece is checked for what it claims (a rotation turns, a shift keeps the ink, a squeeze
narrows, an erase zeroes a patch), the whole for shapes, seeding and replay from a restored
generator (what a resumed run relies on), zero ranges for the identity, and the augmentation
of the existing configs for being the one it was before.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import REPO

from capsnet.data import MNIST, load_dataset, random_shift, write_idx
from capsnet.data.transforms import (
    efficient_capsnet_augment,
    erase,
    random_erase,
    random_rotation,
    random_shift_within_margins,
    random_squeeze,
    rotate,
    squeeze_horizontally,
    to_float,
    translate,
)
from capsnet.train.config import load_config


def _digits(n: int = 32, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Blobs of random size and place, some touching an edge: stand-ins for digits."""
    g = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size)
    for b in range(n):
        h, w = torch.randint(4, 16, (2,), generator=g).tolist()
        top, left = torch.randint(0, size - h + 1, (1,), generator=g).item(), torch.randint(0, size - w + 1, (1,), generator=g).item()
        images[b, 0, top : top + h, left : left + w] = torch.rand(h, w, generator=g) * 0.5 + 0.5
    return images


def _box(image: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) inked rows and columns of a (C, H, W) image."""
    ink = (image != 0).any(dim=0)
    rows, cols = ink.any(dim=1).nonzero().flatten(), ink.any(dim=0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


AUGMENTS = {
    "rotation": lambda x, g: random_rotation(x, 30.0, g),
    "shift_within_margins": lambda x, g: random_shift_within_margins(x, g),
    "squeeze": lambda x, g: random_squeeze(x, g),
    "erase": lambda x, g: random_erase(x, g),
    "efficient_capsnet": lambda x, g: efficient_capsnet_augment(x, g),
}


# --------------------------------------------------------------------------- the whole and every piece


@pytest.mark.parametrize("name", AUGMENTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_augmentation_keeps_shape_and_dtype(name, dtype):
    images = _digits(8).to(dtype).expand(8, 3, 28, 28).contiguous()
    out = AUGMENTS[name](images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device


@pytest.mark.parametrize("name", AUGMENTS)
def test_augmentation_is_seeded_and_changes_with_the_seed(name):
    images = _digits(32)
    a = AUGMENTS[name](images, torch.Generator().manual_seed(1))
    b = AUGMENTS[name](images, torch.Generator().manual_seed(1))
    c = AUGMENTS[name](images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", AUGMENTS)
def test_restoring_the_generator_state_replays_the_same_batch(name):
    # The training loop checkpoints its generator's state; a resumed run must draw the same images.
    images, g = _digits(16), torch.Generator().manual_seed(3)
    AUGMENTS[name](images, g)  # an earlier batch
    state = g.get_state()
    first = AUGMENTS[name](images, g)
    g.set_state(state)
    assert torch.equal(AUGMENTS[name](images, g), first)


def test_efficient_capsnet_augment_draws_only_from_the_given_generator():
    images = _digits(16)
    torch.manual_seed(0)
    a = efficient_capsnet_augment(images, torch.Generator().manual_seed(4))
    torch.manual_seed(123)  # the global generator must not matter
    assert torch.equal(efficient_capsnet_augment(images, torch.Generator().manual_seed(4)), a)


def test_efficient_capsnet_augment_at_zero_ranges_is_the_identity_and_draws_nothing():
    images, g = _digits(16), torch.Generator().manual_seed(5)
    state = g.get_state()
    out = efficient_capsnet_augment(images, g, max_degrees=0, shift_spread=0, squeeze_fraction=0, erase_size=0)
    assert torch.equal(out, images) and torch.equal(g.get_state(), state)


def test_efficient_capsnet_augment_is_the_four_pieces_in_the_authors_order():
    images = _digits(16)
    g = torch.Generator().manual_seed(6)
    expected = random_erase(random_squeeze(random_shift_within_margins(random_rotation(images, 30.0, g), g), g), g)
    assert torch.equal(efficient_capsnet_augment(images, torch.Generator().manual_seed(6)), expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: random_rotation(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 30.0), "float"),
        (lambda: random_rotation(torch.zeros(28, 28), 30.0), r"\(B, C, H, W\)"),
        (lambda: random_rotation(torch.zeros(2, 1, 28, 28), -1.0), "max_degrees >= 0"),
        (lambda: random_rotation(torch.zeros(2, 1, 28, 28), 30.0, p=1.5), "0 <= p <= 1"),
        (lambda: rotate(torch.zeros(2, 1, 28, 28), torch.zeros(3)), "one angle per image"),
        (lambda: random_shift_within_margins(torch.zeros(2, 1, 28, 28), spread=-0.1), "spread >= 0"),
        (lambda: random_squeeze(torch.zeros(2, 1, 28, 28), max_fraction=1.0), "max_fraction < 1"),
        (lambda: squeeze_horizontally(torch.zeros(2, 1, 28, 28), torch.tensor([28, 20]), torch.tensor([1, 0])), "offset \\+ width <= 28"),
        (lambda: random_erase(torch.zeros(2, 1, 8, 8), size=4, margins=(4, 2)), "fit in 8 x 8"),
        (lambda: erase(torch.zeros(2, 1, 8, 8), torch.zeros(3), torch.zeros(2), 4), r"\(B,\) corners"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- rotation


def test_rotation_by_90_degrees_leaves_a_four_fold_symmetric_pattern_unchanged():
    images = torch.zeros(1, 1, 28, 28)
    images[0, 0, 6:22, 12:16] = 1.0  # a plus sign centred on the image
    images[0, 0, 12:16, 6:22] = 1.0
    torch.testing.assert_close(rotate(images, torch.tensor([90.0])), images, atol=1e-5, rtol=0)


def test_rotation_turns_counter_clockwise_like_rot90():
    images = torch.rand(3, 2, 28, 28)
    turned = rotate(images, torch.tensor([90.0, 180.0, -90.0]))
    for b, k in enumerate((1, 2, -1)):
        torch.testing.assert_close(turned[b], torch.rot90(images[b], k, dims=(1, 2)), atol=1e-5, rtol=0)


def test_rotation_of_a_non_square_image_by_180_degrees_is_a_double_flip():
    images = torch.rand(2, 1, 28, 20)
    torch.testing.assert_close(rotate(images, torch.tensor([180.0, 180.0])), images.flip(2, 3), atol=1e-5, rtol=0)


def test_random_rotation_turns_half_the_images_by_at_most_30_degrees():
    # A single pixel 10 px right of the centre of a 29 x 29 image: its centroid's angle is the turn.
    n = 400
    images = torch.zeros(n, 1, 29, 29)
    images[:, 0, 14, 24] = 1.0
    out = random_rotation(images, 30.0, torch.Generator().manual_seed(0))
    grid = torch.arange(29.0) - 14
    mass = out.sum(dim=(1, 2, 3))
    x = (out.sum(dim=2)[:, 0] * grid).sum(dim=1) / mass  # (n,)
    y = (out.sum(dim=3)[:, 0] * grid).sum(dim=1) / mass
    degrees = torch.rad2deg(torch.atan2(-y, x))  # counter-clockwise, y pointing down
    untouched = (out == images).flatten(1).all(dim=1)  # not rotated: bit for bit the input
    assert 0.4 < untouched.float().mean() < 0.6, "the authors rotate with probability 1/2"
    turned = degrees[~untouched]
    assert turned.abs().max() <= 31.0 and turned.abs().max() > 20.0, "up to 30 degrees, std 0.33 x 30"
    assert (turned > 1).any() and (turned < -1).any()


# --------------------------------------------------------------------------- shift within the margins


def test_shift_within_margins_moves_the_whole_ink_and_never_cuts_it():
    images = _digits(256)
    out = random_shift_within_margins(images, torch.Generator().manual_seed(0))
    moves = set()
    for b in range(images.shape[0]):
        top, bottom, left, right = _box(images[b])
        new_top, _, new_left, _ = _box(out[b])
        dy, dx = new_top - top, new_left - left
        assert -top <= dy <= 27 - bottom and -left <= dx <= 27 - right, "the ink stays inside the frame"
        assert torch.equal(out[b], translate(images[b : b + 1], torch.tensor([dy]), torch.tensor([dx]))[0]), "a pure translation"
        moves.add((int(np.sign(dy)), int(np.sign(dx))))
    assert {(1, 1), (-1, -1), (1, -1), (-1, 1)} <= moves, "both directions on both axes"


def test_shift_within_margins_does_not_move_a_digit_that_fills_the_frame_or_a_blank_image():
    images = torch.zeros(2, 1, 28, 28)
    images[0, 0, 0, :] = images[0, 0, -1, :] = images[0, 0, :, 0] = images[0, 0, :, -1] = 1.0  # ink on every edge
    assert torch.equal(random_shift_within_margins(images, torch.Generator().manual_seed(0)), images)


def test_translate_moves_down_and_right_and_fills_with_zeros():
    images = torch.arange(16.0).view(1, 1, 4, 4) + 1
    out = translate(images, torch.tensor([1]), torch.tensor([-2]))
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1:, :2] = images[0, 0, :3, 2:]
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- squeeze


def test_squeeze_to_the_full_width_is_exactly_the_identity():
    images = torch.rand(3, 2, 28, 28)
    assert torch.equal(squeeze_horizontally(images, torch.full((3,), 28), torch.zeros(3, dtype=torch.long)), images)


def test_squeeze_narrows_each_row_keeping_its_ink_times_the_width_ratio():
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    width, offset = torch.tensor([21, 25]), torch.tensor([4, 2])
    out = squeeze_horizontally(images, width, offset)
    for b in range(2):
        w, o = int(width[b]), int(offset[b])
        assert torch.equal(out[b, ..., :o], torch.zeros_like(out[b, ..., :o])) and not out[b, ..., o + w :].any()
        torch.testing.assert_close(out[b].sum(dim=-1), images[b].sum(dim=-1) * w / 28)  # rows do not mix
    white = squeeze_horizontally(torch.ones(1, 1, 3, 28), torch.tensor([21]), torch.tensor([3]))
    torch.testing.assert_close(white[0, 0, 0], torch.cat([torch.zeros(3), torch.ones(21), torch.zeros(4)]))


def test_random_squeeze_removes_one_to_seven_columns_of_28_placed_as_the_authors():
    n = 300
    out = random_squeeze(torch.ones(n, 1, 2, 28), torch.Generator().manual_seed(0))
    covered = out[:, 0, 0] > 1e-6  # (n, 28): a white image stays white where the squeezed copy lies
    removed = 28 - covered.sum(dim=1)
    offset = covered.float().argmax(dim=1)
    assert removed.min() == 1 and removed.max() <= 7 and removed.max() >= 4
    assert ((offset == removed // 2) | (offset == removed // 2 + 1)).all()
    assert (offset == removed // 2 + 1).any(), "the extra column of offset occurs"


# --------------------------------------------------------------------------- erase


def test_erase_zeroes_exactly_the_patch_in_every_channel():
    images = torch.ones(2, 3, 28, 28)
    out = erase(images, torch.tensor([4, 22]), torch.tensor([10, 4]), 4)
    expected = images.clone()
    expected[0, :, 4:8, 10:14] = 0
    expected[1, :, 22:26, 4:8] = 0
    assert torch.equal(out, expected)


def test_random_erase_zeroes_one_4x4_patch_with_its_corner_in_rows_and_columns_4_to_22():
    n = 1000
    out = random_erase(torch.ones(n, 2, 28, 28), torch.Generator().manual_seed(0))
    zero = out == 0
    assert (zero.sum(dim=(2, 3)) == 16).all() and torch.equal(zero[:, 0], zero[:, 1])
    corners = [_box(zero[b, :1].float())[::2] for b in range(n)]  # (top, left) of each patch
    assert all(_box(zero[b, :1].float()) == (t, t + 3, l, l + 3) for b, (t, l) in enumerate(corners)), "one square patch"
    tops, lefts = {t for t, _ in corners}, {l for _, l in corners}
    assert tops == set(range(4, 23)) and lefts == set(range(4, 23))


# --------------------------------------------------------------------------- the data option and the existing configs


def _fake_mnist(root, n_train=40, n_test=10):
    folder = root / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 6:22, 8:20] = rng.integers(1, 256, (n, 16, 12), dtype=np.uint8)  # ink with margins to shift in
        for kind, array in (("images-idx3-ubyte.gz", images), ("labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))):
            name = f"{split}-{kind}"
            write_idx(folder / name, array)
            md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "md5", _fake_mnist(tmp_path))
    monkeypatch.setattr(MNIST, "mirrors", ("http://127.0.0.1:9/unreachable/",))
    return tmp_path


def test_random_shift_is_unchanged_golden_offsets():
    # Recorded before the Efficient-CapsNet augmentation was added: the Sabour et al. shift of
    # every other config must draw the same offsets from the same seed.
    images = torch.zeros(8, 1, 28, 28)
    images[:, 0, 14, 14] = 1.0
    pos = random_shift(images, 2, torch.Generator().manual_seed(0)).view(8, -1).argmax(1)
    assert (pos // 28 - 14).tolist() == [-2, -2, -1, 2, -1, -2, 0, -1]
    assert (pos % 28 - 14).tolist() == [0, -1, 1, 1, 1, -2, -1, 1]
    x = torch.arange(150, dtype=torch.float32).view(2, 3, 5, 5)
    assert random_shift(x, 1, torch.Generator().manual_seed(3)).sum((1, 2, 3)).tolist() == [2775.0, 5472.0]


def test_mnist_training_batches_by_default_are_still_only_the_random_shift(fake_root):
    data = load_dataset("mnist", fake_root, val_size=10)
    index = torch.arange(8)
    images, _ = data.train_batch(index, torch.Generator().manual_seed(0))
    expected = random_shift(to_float(data.splits["train"].images[index]), 2, torch.Generator().manual_seed(0))
    assert torch.equal(images, expected)
    assert load_dataset("mnist", fake_root, val_size=10, shift=0).augment is None


def test_mnist_option_applies_the_efficient_capsnet_augmentation_then_the_shift(fake_root):
    index = torch.arange(8)
    for shift in (0, 2):
        data = load_dataset("mnist", fake_root, val_size=10, shift=shift, efficient_capsnet_augment=True)
        images, _ = data.train_batch(index, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        expected = random_shift(efficient_capsnet_augment(to_float(data.splits["train"].images[index]), g), shift, g)
        assert torch.equal(images, expected)
        first_eval = next(data.eval_batches("val", 4))[0]
        assert torch.equal(first_eval, to_float(data.splits["val"].images[:4])), "evaluation is never augmented"


def _configs():
    for path in sorted((REPO / "configs").glob("*.py")):
        text = path.read_text()
        variants = {"default", "smoke"} | set(__import__("re").findall(r"configs/" + path.name + r":(\w+)", text))
        for variant in sorted(variants):
            yield path.name, variant


def test_only_the_efficient_capsnet_paper_recipe_turns_the_augmentation_on():
    on = [(name, variant) for name, variant in _configs() if load_config(str(REPO / "configs" / f"{name}:{variant}")).dataset_kwargs.get("efficient_capsnet_augment")]
    assert on == [("mnist_efficient.py", "default")]
    cfg = load_config(str(REPO / "configs" / "mnist_efficient.py"))
    assert cfg.dataset_kwargs["shift"] == 0, "the authors' recipe has no extra Sabour shift"


def test_real_mnist_digits_keep_their_ink_under_the_shift_within_margins(data_root):
    data = load_dataset("mnist", data_root, val_size=5000, shift=0, efficient_capsnet_augment=True)
    images = to_float(data.splits["train"].images[:256])
    out = random_shift_within_margins(images, torch.Generator().manual_seed(0))
    assert torch.equal(out.flatten(1).sort().values, images.flatten(1).sort().values), "the same pixels, moved"
    batch, _ = data.train_batch(torch.arange(64), torch.Generator().manual_seed(0))
    assert batch.shape == (64, 1, 28, 28) and bool(torch.isfinite(batch).all()) and 0 <= float(batch.min()) and float(batch.max()) <= 1 + 1e-6
    assert not math.isclose(float(batch.sum()), float(to_float(data.splits["train"].images[:64]).sum()))


def test_a_resumed_run_with_the_efficient_capsnet_augmentation_is_bit_identical(fake_root):
    from capsnet.train import TrainConfig, load_checkpoint, train

    def config(steps):
        return TrainConfig(
            model="capsnet_tiny", dataset="mnist", dataset_kwargs=dict(val_size=10, shift=0, efficient_capsnet_augment=True),
            batch_size=8, epochs=3, max_steps=steps, checkpoint_every=1, log_every=1, figures=False,
        )

    train(config(6), data_root=fake_root, out_dir=fake_root / "a", progress=False, final_test=False)
    train(config(3), data_root=fake_root, out_dir=fake_root / "b", progress=False, final_test=False)
    train(config(6), data_root=fake_root, out_dir=fake_root / "b", progress=False, final_test=False, resume=True)
    a, b = load_checkpoint(fake_root / "a" / "last.pt"), load_checkpoint(fake_root / "b" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    assert torch.equal(a["rng"]["augment"], b["rng"]["augment"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name

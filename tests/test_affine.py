"""Affine robustness data (Sabour et al. 2017, Sec. 5.2): expanded MNIST, the affine MNIST test set, affNIST files."""

from __future__ import annotations

import hashlib
import math
import sys
import zipfile

import numpy as np
import pytest
import torch

from capsnet.data import DataError, ExperimentData, Split, load_dataset
from capsnet.data import affnist as affnist_module
from capsnet.data.affnist import AffNIST, affine_matrices, affine_transform, expand_images, random_affine, read_affnist_mat

SMOKE = dict(source="synthetic", train_size=32, val_size=16, test_size=16)


def _blobs(n: int, size: int = 40, seed: int = 0) -> torch.Tensor:
    """Solid 12x16 rectangles at the centre of a black frame: digit-sized, mass easy to follow."""
    images = torch.zeros(n, 1, size, size, dtype=torch.float64)
    c = size // 2
    images[:, :, c - 8 : c + 8, c - 6 : c + 6] = 1.0
    return images


def _digit_source(n: int = 12) -> ExperimentData:
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 4:24, 4:24] = (torch.rand(n, 1, 20, 20, generator=g) > 0.5).to(torch.uint8) * 255
    split = Split(images, torch.arange(n) % 10)
    return ExperimentData(name="fixed", train=split, val=split, test=split, num_classes=10)


# --------------------------------------------------------------------------- expanded MNIST


def _offset_of(canvas: torch.Tensor, digit: torch.Tensor) -> tuple[int, int] | None:
    """Where ``digit`` (28x28) sits in ``canvas`` (40x40) with black everywhere else, if anywhere."""
    for r in range(canvas.shape[-2] - 27):
        for c in range(canvas.shape[-1] - 27):
            placed = torch.zeros_like(canvas)
            placed[..., r : r + 28, c : c + 28] = digit
            if torch.equal(placed, canvas):
                return r, c
    return None


def test_expanded_mnist_places_each_whole_digit_anywhere_on_the_40x40_canvas(monkeypatch):
    source = _digit_source()
    monkeypatch.setattr(affnist_module, "load_dataset", lambda *a, **k: source)
    data = load_dataset("mnist_expanded", ".")
    assert data.image_shape == (1, 40, 40)
    offsets = set()
    for seed in range(3):
        images, labels = data.train_batch(torch.arange(12), torch.Generator().manual_seed(seed))
        for i in range(12):
            where = _offset_of(images[i], source.splits["train"].images[i].float() / 255)
            assert where is not None and 0 <= min(where) and max(where) <= 12  # pad 6, shift 6
            offsets.add(where)
    assert len(offsets) > 20, "placements vary over the canvas"


def test_expanded_mnist_evaluation_placements_are_fixed_by_their_seed(monkeypatch):
    source = _digit_source()
    monkeypatch.setattr(affnist_module, "load_dataset", lambda *a, **k: source)
    a, b = load_dataset("mnist_expanded", ".", seed=0), load_dataset("mnist_expanded", ".", seed=1)
    c = load_dataset("mnist_expanded", ".", placement_seed=1)
    assert torch.equal(a.splits["test"].images, b.splits["test"].images)
    assert not torch.equal(a.splits["test"].images, c.splits["test"].images)


def test_expanded_mnist_padding_and_translation_are_configurable():
    data = load_dataset("mnist_expanded", ".", pad=2, shift=1, **SMOKE)
    assert data.image_shape == (1, 32, 32)
    with pytest.raises(ValueError, match="shift <= pad.*pad=2 shift=3"):
        load_dataset("mnist_expanded", ".", pad=2, shift=3, **SMOKE)


def test_expand_images_centres_the_digit():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    out = expand_images(x, 1)
    assert out.shape == (1, 1, 4, 4) and torch.equal(out[0, 0, 1:3, 1:3], x[0, 0]) and out.sum() == x.sum()


# --------------------------------------------------------------------------- affine transforms


def test_identity_map_leaves_images_unchanged():
    x = torch.rand(3, 1, 40, 40, dtype=torch.float64)
    out = affine_transform(x, torch.eye(2, dtype=torch.float64).expand(3, 2, 2), torch.zeros(3, 2, dtype=torch.float64))
    torch.testing.assert_close(out, x)


def test_a_pixel_moves_to_a_times_p_minus_c_plus_c_plus_t():
    """The map acts forward on pixel coordinates (x right, y down), about the centre c = 19.5."""
    x = torch.zeros(1, 1, 40, 40, dtype=torch.float64)
    x[0, 0, 22, 25] = 1.0  # p = (x=25, y=22)
    matrix = affine_matrices(torch.tensor([90.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    t = torch.tensor([[2.0, -3.0]], dtype=torch.float64)
    out = affine_transform(x, matrix, t)
    c = 19.5
    q = matrix[0] @ torch.tensor([25 - c, 22 - c], dtype=torch.float64) + c + t[0]  # expected (x, y)
    row, col = divmod(int(out[0, 0].argmax()), 40)
    assert (col, row) == (round(float(q[0])), round(float(q[1])))
    assert float(out.max()) == pytest.approx(1.0, abs=1e-9)


def test_affine_matrices_compose_rotation_shear_and_scale():
    m = affine_matrices(torch.tensor([30.0]), torch.tensor([0.2]), torch.tensor([[1.1, 0.9]]))
    t = math.radians(30)
    rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    expected = rot @ torch.tensor([[1.0, 0.2], [0.0, 1.0]]) @ torch.diag(torch.tensor([1.1, 0.9]))
    torch.testing.assert_close(m[0], expected)


def test_random_affine_parameters_lie_in_affnists_ranges():
    _, p = random_affine(_blobs(500), torch.Generator().manual_seed(0))
    assert float(p.angle.abs().max()) <= 20.0 and float(p.angle.abs().max()) > 18.0
    assert float(p.shear.abs().max()) <= 0.2 and float(p.shear.abs().max()) > 0.18
    assert 0.8 <= float(p.scale.min()) < 0.82 and 1.18 < float(p.scale.max()) <= 1.2


def test_random_affine_keeps_the_digit_inside_the_frame():
    x = _blobs(200)
    out, p = random_affine(x, torch.Generator().manual_seed(1))
    # Nothing falls off the frame: the mass scales by |det A| (bilinear sampling, ~1% slack).
    ratio = out.sum(dim=(1, 2, 3)) / (x.sum(dim=(1, 2, 3)) * torch.linalg.det(p.matrix).abs())
    assert float((ratio - 1).abs().max()) < 0.02
    assert float(p.translation.abs().max()) > 3.0, "translations use the room in the frame"


def test_random_affine_is_reproducible_from_its_seed():
    x = _blobs(8)
    a, _ = random_affine(x, torch.Generator().manual_seed(3))
    b, _ = random_affine(x, torch.Generator().manual_seed(3))
    c, _ = random_affine(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_affine_mnist_tests_on_transformed_digits_and_validates_on_expanded_ones(monkeypatch):
    source = _digit_source()
    monkeypatch.setattr(affnist_module, "load_dataset", lambda *a, **k: source)
    data = load_dataset("affine_mnist", ".")
    again = load_dataset("affine_mnist", ".")
    other = load_dataset("affine_mnist", ".", affine_seed=1)
    test = data.splits["test"].images
    assert test.shape == (12, 1, 40, 40) and test.dtype == torch.uint8
    assert torch.equal(test, again.splits["test"].images) and not torch.equal(test, other.splits["test"].images)
    assert torch.equal(data.splits["test"].labels, source.splits["test"].labels)
    assert all(_offset_of(v.float(), d.float()) for v, d in zip(data.splits["val"].images, source.splits["val"].images))
    assert not any(_offset_of(t.float(), d.float()) for t, d in zip(test[:3], source.splits["test"].images[:3]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: affine_transform(torch.rand(2, 1, 4, 5), torch.eye(2).expand(2, 2, 2), torch.zeros(2, 2)), r"square.*\(2, 1, 4, 5\)"),
        (lambda: affine_transform(torch.rand(2, 1, 4, 4), torch.eye(2).expand(3, 2, 2), torch.zeros(2, 2)), r"\(2, 2, 2\).*\(3, 2, 2\)"),
        (lambda: random_affine(torch.rand(2, 1, 4, 4), torch.Generator(), scale=(1.2, 0.8)), r"scale\[0\] <= scale\[1\].*\(1.2, 0.8\)"),
    ],
)
def test_bad_affine_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- affNIST files


def _images_and_labels(n: int = 6):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 40, 40), dtype=np.uint8)
    return images, (np.arange(n) % 10).astype(np.uint8)


def _write_mat(path, images=None, labels=None, **fields):
    """An affNIST-format file: image is 1600 x N, one row-major 40x40 image per column."""
    scipy_io = pytest.importorskip("scipy.io")
    if images is None:
        images, labels = _images_and_labels()
    record = dict(image=images.reshape(len(images), -1).T, label_int=labels[None, :])
    record.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy_io.savemat(path, {"affNISTdata": record})
    return path


@pytest.fixture
def mat_root(tmp_path):
    _write_mat(tmp_path / "affnist" / "test.mat")
    return tmp_path


def test_reads_an_affnist_file(mat_root):
    images, labels = _images_and_labels()
    data = AffNIST(mat_root)
    assert data.images.shape == (6, 1, 40, 40) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64


def test_reads_the_zip_archive_it_is_distributed_in(mat_root):
    (mat_root / "affnist" / "test.mat").rename(mat_root / "test.mat")
    with zipfile.ZipFile(mat_root / "affnist" / "test.mat.zip", "w") as archive:
        archive.write(mat_root / "test.mat", "test.mat")
    assert len(AffNIST(mat_root)) == 6


def test_checksum_from_argument_or_md5sums_is_verified(mat_root):
    digest = hashlib.md5((mat_root / "affnist" / "test.mat").read_bytes()).hexdigest()
    assert len(AffNIST(mat_root, md5=digest)) == 6
    with pytest.raises(DataError, match=f"expected MD5 {'0' * 32}, got {digest}"):
        AffNIST(mat_root, md5="0" * 32)
    (mat_root / "MD5SUMS").write_text(f"{'f' * 32}  affnist/test.mat\n")
    with pytest.raises(DataError, match="fails its checksum"):
        AffNIST(mat_root)
    (mat_root / "MD5SUMS").write_text(f"{digest}  affnist/test.mat\n")
    assert len(AffNIST(mat_root)) == 6


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"affnist/test.mat is missing.*test.mat.zip.*CAPSNET_DATA"):
        AffNIST(tmp_path)


def _corrupt(path, kind: str):
    images, labels = _images_and_labels()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        _write_mat(path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "garbage":
        path.write_bytes(b"not a matlab file at all" * 20)
    elif kind == "no-struct":
        pytest.importorskip("scipy.io").savemat(path, {"something": np.zeros(3)})
    elif kind == "no-labels":
        pytest.importorskip("scipy.io").savemat(path, {"affNISTdata": {"image": images.reshape(6, -1).T}})
    elif kind == "mnist-sized":
        _write_mat(path, images[:, :28, :28].copy(), labels)
    elif kind == "count-mismatch":
        _write_mat(path, images, labels[:5])
    elif kind == "label-range":
        _write_mat(path, images, labels + 5)
    elif kind == "float-pixels":
        _write_mat(path, images.astype(np.float64) / 255, labels)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "not a readable MATLAB file"),
        ("garbage", "not a readable MATLAB file"),
        ("no-struct", r"no `affNISTdata` struct \(found: something\)"),
        ("no-labels", r"no `label_int` field"),
        ("mnist-sized", r"1600 x N.*\(784, 6\)"),
        ("count-mismatch", "6 images but label_int holds 5 labels"),
        ("label-range", r"\[0, 9\].*max 10"),
        ("float-pixels", r"integer pixels.*float64"),
    ],
)
def test_corrupt_files_are_refused_with_the_reason(tmp_path, kind, message):
    pytest.importorskip("scipy.io")
    _corrupt(tmp_path / "affnist" / "test.mat", kind)
    with pytest.raises(DataError, match=message) as info:
        AffNIST(tmp_path)
    assert "test.mat" in str(info.value)


def test_corrupt_zip_is_refused(tmp_path):
    (tmp_path / "affnist").mkdir()
    (tmp_path / "affnist" / "test.mat.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="not a readable zip archive"):
        AffNIST(tmp_path)


def test_without_scipy_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import loadmat` fail
    with pytest.raises(DataError, match=r"test.mat needs scipy.*pip install scipy"):
        read_affnist_mat(b"", tmp_path / "test.mat")


def test_affnist_dataset_tests_on_the_file_and_trains_on_expanded_digits(mat_root):
    data = load_dataset("affnist", mat_root, limit_test=4, **SMOKE)
    assert data.image_shape == (1, 40, 40) and data.size("test") == 4
    images, labels = next(data.eval_batches("test", 4))
    assert images.shape == (4, 1, 40, 40) and float(images.max()) <= 1.0


def test_real_affine_mnist(data_root):
    data = load_dataset("affine_mnist", data_root, limit_train=100, limit_eval=200)
    assert data.image_shape == (1, 40, 40) and data.size("test") == 200
    test = data.splits["test"].images.float()
    assert float(test[:, :, [0, -1], :].sum() + test[:, :, :, [0, -1]].sum()) < 1e-3 * float(test.sum()), "digits stay inside"

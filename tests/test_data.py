import hashlib

import numpy as np
import pytest
import torch

from capsnet.data import MNIST, DataError, load_dataset, random_shift, train_val_split, write_idx
from capsnet.data import download as download_module


def _fake_mnist(root, n_train=20, n_test=10, label_max=9):
    """MNIST-format files with their MD5s (to patch into the class)."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (
            ("images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels-idx1-ubyte.gz", rng.integers(0, label_max + 1, (n,), dtype=np.uint8)),
        ):
            name = f"{split}-{kind}"
            write_idx(folder / name, array)
            md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    md5 = _fake_mnist(tmp_path)
    monkeypatch.setattr(MNIST, "md5", md5)
    monkeypatch.setattr(MNIST, "mirrors", ("http://127.0.0.1:9/unreachable/",))
    return tmp_path


def test_reads_generated_files(fake_root):
    ds = MNIST(fake_root, train=True)
    assert ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and len(ds) == 20


def test_checksum_mismatch_names_file_and_setting(fake_root):
    path = fake_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz fails its checksum(.|\n)*CAPSNET_DATA"):
        MNIST(fake_root, train=False)


def test_missing_file_says_what_to_do(fake_root):
    (fake_root / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is missing.*--data"):
        MNIST(fake_root, train=True)


def test_offline_download_fails_clearly_and_keeps_nothing(fake_root):
    path = fake_root / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="could not download train-labels-idx1-ubyte.gz(.|\n)*offline"):
        MNIST(fake_root, train=True, download=True)
    assert not path.exists(), "a corrupt file must not be kept"
    assert not list(path.parent.glob("*.part")), "no partial download left behind"


def test_download_verifies_and_moves_into_place(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"capsules" * 100)
    dest = tmp_path / "out" / "file.bin"
    good = hashlib.md5(source.read_bytes()).hexdigest()
    download_module.download_file([source.as_uri()], dest, good)
    assert dest.read_bytes() == source.read_bytes()


def test_download_with_wrong_checksum_keeps_no_file(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"capsules")
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(DataError, match=r"MD5 .* expected 0{32}"):
        download_module.download_file([source.as_uri()], dest, "0" * 32)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_download_falls_back_to_next_mirror(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"second mirror")
    dest = tmp_path / "file.bin"
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    download_module.download_file([(tmp_path / "nope.bin").as_uri(), source.as_uri()], dest, md5)
    assert dest.read_bytes() == b"second mirror"


def test_mismatched_image_and_label_counts(tmp_path, monkeypatch):
    md5 = _fake_mnist(tmp_path)
    folder = tmp_path / "mnist"
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros((7,), np.uint8))
    md5["t10k-labels-idx1-ubyte.gz"] = hashlib.md5((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(MNIST, "md5", md5)
    with pytest.raises(DataError, match="10 images but .* 7 labels"):
        MNIST(tmp_path, train=False)


def test_label_out_of_range(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "md5", _fake_mnist(tmp_path, label_max=12))
    with pytest.raises(DataError, match="label 1[0-2], expected 0..9"):
        MNIST(tmp_path, train=True)


def test_split_is_fixed_disjoint_and_complete():
    a_train, a_val = train_val_split(60000, 5000, seed=0)
    b_train, b_val = train_val_split(60000, 5000, seed=0)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert len(a_train) == 55000 and len(a_val) == 5000
    assert len(set(a_train.tolist()) | set(a_val.tolist())) == 60000
    assert not torch.equal(train_val_split(60000, 5000, seed=1)[1], a_val)


def test_random_shift_is_a_translation_within_bounds():
    images = torch.zeros(500, 1, 28, 28)
    images[:, 0, 14, 14] = 1.0
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.all(shifted.sum((1, 2, 3)) == 1), "a pure translation keeps the single pixel"
    pos = shifted.view(500, -1).argmax(1)
    dy, dx = pos // 28 - 14, pos % 28 - 14
    assert dy.abs().max() == 2 and dx.abs().max() == 2
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 25, "all 25 offsets occur"


def test_random_shift_fills_with_zeros_and_is_seeded():
    images = torch.ones(64, 3, 8, 8)
    a = random_shift(images, 3, torch.Generator().manual_seed(5))
    b = random_shift(images, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0} and (a == 0).any()


def test_random_shift_rejects_bad_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_shift(torch.zeros(28, 28), 2)


def test_real_mnist_files(data_root):
    data = load_dataset("mnist", data_root)
    assert (data.size("train"), data.size("val"), data.size("test")) == (55000, 5000, 10000)
    assert data.image_shape == (1, 28, 28)
    counts = torch.bincount(data.splits["test"].labels, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 800


def test_real_fashion_mnist_files(data_root):
    data = load_dataset("fashion_mnist", data_root, limit_train=100)
    assert data.size("train") == 100 and data.size("test") == 10000


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'.*mnist"):
        load_dataset("mnsit", ".")

"""smallNORB: the official binary format, the loader's errors, preprocessing and viewpoint splits."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from capsnet.data import DataError, load_dataset
from capsnet.data.smallnorb import (
    TRAIN_AZIMUTHS,
    SmallNORB,
    centre_crop,
    random_brightness_contrast,
    random_crop,
    read_norb,
    smallnorb_data,
    standardize,
    viewpoint_masks,
    write_norb,
)

N = 36  # pairs per tiny split


def _info(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return np.stack([rng.integers(0, 10, n), i % 9, (2 * i) % 36, i % 6], axis=1).astype(np.int32)


def _write_split(folder, stem: str, seed: int, *, n: int = N, compress: bool = False) -> None:
    rng = np.random.default_rng(seed)
    suffix = ".mat.gz" if compress else ".mat"
    write_norb(folder / f"{stem}-dat{suffix}", rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8))
    write_norb(folder / f"{stem}-cat{suffix}", (np.arange(n) % 5).astype(np.int32))
    write_norb(folder / f"{stem}-info{suffix}", _info(n, seed))


@pytest.fixture
def norb_root(tmp_path):
    folder = tmp_path / "smallnorb"
    folder.mkdir()
    _write_split(folder, SmallNORB.prefix["train"], 0)
    _write_split(folder, SmallNORB.prefix["test"], 1)
    return tmp_path


def test_header_layout_is_the_official_one(tmp_path):
    path = tmp_path / "cat.mat"
    write_norb(path, np.array([3, 1, 4], dtype=np.int32))
    raw = path.read_bytes()
    words = np.frombuffer(raw, dtype="<i4")
    assert words[0] == 0x1E3D4C54 and words[1] == 1  # int32 magic, ndim 1
    assert words[2:5].tolist() == [3, 1, 1]  # max(3, ndim) dims, only the first counts
    assert words[5:].tolist() == [3, 1, 4] and len(raw) == 4 * 8


@pytest.mark.parametrize("suffix", [".mat", ".mat.gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3),
        np.array([0, 4, 2], dtype=np.int32),
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
    ],
    ids=["dat", "cat", "info", "float32"],
)
def test_read_write_roundtrip_gzip_and_raw(tmp_path, array, suffix):
    path = tmp_path / f"m{suffix}"
    write_norb(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == suffix.endswith(".gz")
    got = read_norb(path)
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


def test_wrong_magic_names_the_file(tmp_path):
    path = tmp_path / "bad-dat.mat"
    path.write_bytes(np.asarray([0x12345678, 1, 3, 1, 1, 0, 0, 0], dtype="<i4").tobytes())
    with pytest.raises(DataError, match=r"bad-dat\.mat.*magic 0x12345678"):
        read_norb(path)


@pytest.mark.parametrize("cut", [4, 17, 100])
def test_truncated_file_names_the_file(tmp_path, cut):
    path = tmp_path / "short-dat.mat"
    write_norb(path, np.zeros((2, 2, 8, 8), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-cut] if cut != 4 else path.read_bytes()[:4])
    with pytest.raises(DataError, match=r"short-dat\.mat.*truncated"):
        read_norb(path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "short-dat.mat.gz"
    write_norb(path, np.random.default_rng(0).integers(0, 256, (4, 2, 8, 8), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"short-dat\.mat\.gz.*truncated"):
        read_norb(path)


def test_extra_payload_is_reported(tmp_path):
    path = tmp_path / "long.mat"
    write_norb(path, np.zeros(3, dtype=np.int32))
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    with pytest.raises(DataError, match=r"long\.mat.*needs 12"):
        read_norb(path)


def test_wrong_dtype_or_shape_is_reported(tmp_path):
    path = tmp_path / "x.mat"
    write_norb(path, np.zeros((3, 4), dtype=np.uint8))
    with pytest.raises(DataError, match="expected int32"):
        read_norb(path, expected_dtype=np.int32)
    with pytest.raises(DataError, match=r"\(3, 4\) matrix, expected \('N', 5\)"):
        read_norb(path, expected_shape=(None, 5))


def test_smallnorb_reads_tiny_official_files(norb_root):
    split = SmallNORB(norb_root, train=True)
    assert split.images.shape == (N, 2, 48, 48) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == [i % 5 for i in range(N)]
    assert split.info.shape == (N, 4)
    assert len(SmallNORB(norb_root, train=False)) == N


def test_downsampling_averages_2x2_blocks(tmp_path):
    folder = tmp_path / "smallnorb"
    folder.mkdir()
    blocks = np.random.default_rng(0).integers(0, 256, (2, 2, 48, 48), dtype=np.uint8)
    stem = SmallNORB.prefix["train"]
    write_norb(folder / f"{stem}-dat.mat", blocks.repeat(2, axis=2).repeat(2, axis=3))
    write_norb(folder / f"{stem}-cat.mat", np.zeros(2, dtype=np.int32))
    write_norb(folder / f"{stem}-info.mat", _info(2, 0))
    assert torch.equal(SmallNORB(tmp_path).images, torch.from_numpy(blocks))


def test_count_mismatch_names_the_files(norb_root):
    stem = SmallNORB.prefix["train"]
    write_norb(norb_root / "smallnorb" / f"{stem}-cat.mat", np.zeros(N - 1, dtype=np.int32))
    with pytest.raises(DataError, match="counts disagree"):
        SmallNORB(norb_root)


def test_category_out_of_range_is_reported(norb_root):
    stem = SmallNORB.prefix["train"]
    write_norb(norb_root / "smallnorb" / f"{stem}-cat.mat", np.full(N, 7, dtype=np.int32))
    with pytest.raises(DataError, match="category 7"):
        SmallNORB(norb_root)


def test_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"training-dat\.mat\.gz is missing.*download"):
        SmallNORB(tmp_path)


def test_gzip_files_are_checksummed(tmp_path):
    folder = tmp_path / "smallnorb"
    folder.mkdir()
    _write_split(folder, SmallNORB.prefix["train"], 0, compress=True)
    with pytest.raises(DataError, match=r"training-dat\.mat\.gz fails its checksum"):
        SmallNORB(tmp_path)


def test_dataset_splits_and_batches(norb_root):
    data = load_dataset("smallnorb", norb_root, val_size=6, seed=3)
    assert (data.size("train"), data.size("val"), data.size("test")) == (N - 6, 6, N)
    assert data.image_shape == (1, 32, 32)
    images, labels = data.train_batch(torch.arange(5), torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 32, 32) and images.dtype == torch.float32 and labels.shape == (5,)
    assert torch.isfinite(images).all()
    test_images, _ = next(data.eval_batches("test", 8))
    assert test_images.shape == (8, 1, 32, 32)
    stereo = smallnorb_data(norb_root, channels=2, val_size=6)
    assert stereo.image_shape == (2, 32, 32)


def test_training_batches_are_reproducible_and_random(norb_root):
    data = smallnorb_data(norb_root, val_size=6)
    first, _ = data.train_batch(torch.arange(8), torch.Generator().manual_seed(1))
    again, _ = data.train_batch(torch.arange(8), torch.Generator().manual_seed(1))
    other, _ = data.train_batch(torch.arange(8), torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_evaluation_is_the_standardized_centre_crop(norb_root):
    data = smallnorb_data(norb_root, val_size=6)
    images, _ = next(data.eval_batches("test", 4))
    raw = SmallNORB(norb_root, train=False).images[:4, :1].float() / 255
    torch.testing.assert_close(images, standardize(raw)[:, :, 8:40, 8:40])
    google = smallnorb_data(norb_root, val_size=6, preprocessing="google")
    images, _ = next(google.eval_batches("test", 4))
    torch.testing.assert_close(images.flatten(1).mean(1), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["azimuth", "elevation"])
def test_novel_viewpoint_splits(norb_root, kind):
    data = smallnorb_data(norb_root, viewpoint=kind, val_size=2)
    train_info, test_info = SmallNORB(norb_root).info, SmallNORB(norb_root, train=False).info
    n_train = int(viewpoint_masks(train_info, kind).sum())
    n_familiar = int(viewpoint_masks(test_info, kind).sum())
    assert data.size("train") + data.size("val") == n_train
    assert data.size("familiar") == n_familiar and data.size("test") == N - n_familiar
    assert 0 < n_train < N and 0 < n_familiar < N


def test_viewpoint_masks_follow_the_paper():
    azimuths = torch.arange(0, 36, 2)
    info = torch.stack([torch.zeros(18), torch.zeros(18), azimuths, torch.zeros(18)], 1).long()
    train = azimuths[viewpoint_masks(info, "azimuth")] * 10
    assert sorted(train.tolist()) == [0, 20, 40, 300, 320, 340]
    assert set(TRAIN_AZIMUTHS) == {30, 32, 34, 0, 2, 4}
    elevations = torch.arange(9)
    info = torch.stack([torch.zeros(9), elevations, torch.zeros(9), torch.zeros(9)], 1).long()
    assert elevations[viewpoint_masks(info, "elevation")].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="viewpoint"):
        viewpoint_masks(info, "lighting")


def test_random_crop_takes_a_window_of_each_image():
    images = torch.arange(3 * 2 * 6 * 7, dtype=torch.float32).view(3, 2, 6, 7)
    crops = random_crop(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 2, 4, 4)
    for b in range(3):
        top, left = divmod(int(crops[b, 0, 0, 0] - images[b, 0, 0, 0]), 7)
        assert torch.equal(crops[b], images[b, :, top : top + 4, left : left + 4])


def test_centre_crop_and_standardize():
    images = torch.rand(2, 1, 48, 48)
    assert torch.equal(centre_crop(images, 32), images[:, :, 8:40, 8:40])
    z = standardize(images)
    torch.testing.assert_close(z.flatten(1).mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.flatten(1).std(1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardize(torch.full((1, 1, 4, 4), 0.3)), torch.zeros(1, 1, 4, 4), atol=1e-6, rtol=0)


def test_brightness_contrast_jitter_is_per_image():
    images = torch.rand(4, 1, 8, 8)
    out = random_brightness_contrast(images, torch.Generator().manual_seed(0))
    shift = (out - images).flatten(1).mean(1)
    assert shift.unique().numel() == 4 and (shift.abs() <= 63 / 255 + 1e-6).all()
    same = random_brightness_contrast(images, torch.Generator().manual_seed(0), brightness=0.0, contrast=(1.0, 1.0))
    torch.testing.assert_close(same, images)


def test_bad_options_raise_value_error(norb_root):
    with pytest.raises(ValueError, match="channels"):
        smallnorb_data(norb_root, channels=3)
    with pytest.raises(ValueError, match="viewpoint"):
        smallnorb_data(norb_root, viewpoint="lighting")
    with pytest.raises(ValueError, match="preprocessing"):
        smallnorb_data(norb_root, preprocessing="tf")
    with pytest.raises(ValueError, match="crop"):
        smallnorb_data(norb_root, crop=64)
    with pytest.raises(ValueError, match="NORB files hold"):
        write_norb(norb_root / "x.mat", np.zeros(2, dtype=np.int64))


def test_gzip_module_is_what_writes_gz(tmp_path):
    path = tmp_path / "a.mat.gz"
    write_norb(path, np.zeros(3, dtype=np.int32))
    assert gzip.decompress(path.read_bytes())[:4] == np.asarray([0x1E3D4C54], dtype="<i4").tobytes()


@pytest.mark.parametrize("config", ["smallnorb_em_small.py", "smallnorb_em_full.py"])
@pytest.mark.parametrize("variant", ["default", "stereo", "azimuth", "elevation"])
def test_configs_build_their_data_and_model(norb_root, config, variant):
    from pathlib import Path

    from capsnet.train.config import load_config
    from capsnet.train.loop import build_model

    path = Path(__file__).resolve().parents[1] / "configs" / config
    cfg = load_config(f"{path}:{variant}", ("dataset_kwargs.val_size=4",))
    data = load_dataset(cfg.dataset, norb_root, **cfg.dataset_kwargs)
    model = build_model(cfg, data)  # raises if the model's input does not match the data
    images, labels = data.train_batch(torch.arange(2), torch.Generator().manual_seed(0))
    assert images.shape[1:] == (model.in_channels, model.image_size, model.image_size)
    assert int(labels.max()) < model.num_classes

"""smallNORB (LeCun, Huang & Bottou 2004) and the preprocessing of Hinton, Sabour & Frosst 2018.

Files: the official binary matrices, gzip-compressed (checksummed) or raw. Header:
little-endian int32 magic (0x1E3D4C55 uint8, 0x1E3D4C54 int32, 0x1E3D4C51 float32,
0x1E3D4C53 float64, 0x1E3D4C56 int16), int32 ``ndim``, then ``max(3, ndim)`` int32
dimensions of which only the first ``ndim`` count, then the payload. ``dat``: N x 2 x 96 x 96
uint8 stereo pairs; ``cat``: N int32 categories 0..4; ``info``: N x 4 int32 (instance,
elevation 0..8, azimuth 0..34 even = tens of degrees, lighting 0..5). N = 24,300 per split.

Preprocessing (Sec. 5): images downsampled to 48x48 and normalised to zero mean and unit
variance per image; training takes random 32x32 crops with random brightness and contrast,
testing the central 32x32 crop. Novel-viewpoint splits (Sec. 5.2) as options.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ExperimentData, Split
from .download import DATA_HINT, download_file, md5sum, verify_md5
from .errors import DataError
from .idx import read_maybe_gzipped
from .registry import register_dataset
from .transforms import to_float, train_val_split

__all__ = [
    "SmallNORB",
    "SmallNORBData",
    "centre_crop",
    "random_brightness_contrast",
    "random_crop",
    "read_norb",
    "smallnorb_data",
    "standardize",
    "viewpoint_masks",
    "write_norb",
]

_MAGIC = {
    0x1E3D4C55: np.dtype("<u1"),
    0x1E3D4C54: np.dtype("<i4"),
    0x1E3D4C51: np.dtype("<f4"),
    0x1E3D4C53: np.dtype("<f8"),
    0x1E3D4C56: np.dtype("<i2"),
}
_MAGIC_OF = {dtype: magic for magic, dtype in _MAGIC.items()}

#: Category names, in label order.
CATEGORIES = ("animal", "human", "airplane", "truck", "car")

#: Novel-viewpoint experiments (Sec. 5.2): the viewpoints of the training images; test images
#: at every other viewpoint are "novel". Azimuth in tens of degrees: 300, 320, 340, 0, 20, 40.
TRAIN_AZIMUTHS = (30, 32, 34, 0, 2, 4)
#: Elevation indices 0..8 (30 to 70 degrees): training on the 3 lowest, testing on the 6 highest.
TRAIN_ELEVATIONS = (0, 1, 2)
VIEWPOINTS = ("azimuth", "elevation")
PREPROCESSING = ("paper", "google")


def read_norb(path: str | Path, *, expected_dtype=None, expected_shape: Optional[tuple] = None) -> np.ndarray:
    """Read one NORB binary matrix (gzip or raw) into a NumPy array with the file's dimensions.

    ``expected_shape`` may hold ``None`` for a free dimension. Raises :class:`DataError`
    naming the file on an unknown magic number, a dtype or shape other than expected, or a
    payload shorter or longer than the header says.

    Shape:
        returns the array the header describes, e.g. ``(N, 2, 96, 96)`` uint8 for ``dat``.
    """
    path = Path(path)
    data = read_maybe_gzipped(path, DATA_HINT)
    if len(data) < 8:
        raise DataError(f"{path} is truncated: {len(data)} bytes, a NORB header needs at least 20")
    magic, ndim = (int(x) for x in np.frombuffer(data, dtype="<i4", count=2))
    if magic not in _MAGIC:
        known = ", ".join(f"0x{m:08X} ({d.name})" for m, d in _MAGIC.items())
        raise DataError(f"{path} is not a NORB matrix: magic 0x{magic & 0xFFFFFFFF:08X}, expected one of {known}")
    dtype = _MAGIC[magic]
    if expected_dtype is not None and dtype != np.dtype(expected_dtype).newbyteorder("<"):
        raise DataError(f"{path} holds {dtype.name} (magic 0x{magic:08X}), expected {np.dtype(expected_dtype).name}")
    if not 0 <= ndim <= 16:
        raise DataError(f"{path} claims {ndim} dimensions: the header is corrupt")
    header = 8 + 4 * max(3, ndim)
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes, header needs {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype="<i4", count=ndim, offset=8))
    if any(d < 0 for d in dims):
        raise DataError(f"{path} has negative dimensions {dims}: the header is corrupt")
    if expected_shape is not None and (
        len(dims) != len(expected_shape) or any(e is not None and e != d for d, e in zip(dims, expected_shape))
    ):
        want = tuple("N" if e is None else e for e in expected_shape)
        raise DataError(f"{path} holds a {dims} matrix, expected {want}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        raise DataError(
            f"{path} holds {got} payload bytes but its header {dims} needs {expected}: the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_norb(path: str | Path, array: np.ndarray, *, compress: Optional[bool] = None) -> None:
    """Write ``array`` (uint8, int32, int16, float32 or float64) as a NORB matrix; gzip when
    ``compress`` or when the name ends in ``.gz``. The inverse of :func:`read_norb`.

    Shape:
        array: any shape; the header pads the dimension list to at least 3 with ones.
    """
    path = Path(path)
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<")
    if dtype not in _MAGIC_OF:
        raise ValueError(f"NORB files hold uint8, int16, int32, float32 or float64, got {array.dtype}")
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.asarray([_MAGIC_OF[dtype], array.ndim, *dims], dtype="<i4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)


class SmallNORB:
    """One official split of smallNORB, read from ``<root>/smallnorb/``, downsampled to ``size``.

    Each file is read from ``<name>.gz`` when present, after checking its MD5, else from the
    raw ``<name>`` (decompressed by hand; the header and counts are still checked). With
    ``download=True`` missing or corrupt ``.gz`` files are fetched and verified first.
    The MD5s come from a third-party loader and are verified against the NYU files on first
    download; :class:`DataError` says which file failed.

    Attributes:
        images: ``(N, 2, size, size)`` uint8 (area-averaged from 96x96); labels: ``(N,)`` int64
        categories 0..4; info: ``(N, 4)`` int64 (instance, elevation, azimuth, lighting).
    """

    folder = "smallnorb"
    mirrors = ("https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/",)
    prefix = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training", "test": "smallnorb-5x01235x9x18x6x2x96x96-testing"}
    md5 = {
        "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat.gz": "66054832f9accfe74a0f4c36a75bc0a2",
        "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat.gz": "23c8b86101fbf0904a000b43d3ed2fd9",
        "smallnorb-5x46789x9x18x6x2x96x96-training-info.mat.gz": "51dee1210a742582ff607dfd94e332e3",
        "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat.gz": "e4ad715691ed5a3a5f138751a4ceb071",
        "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat.gz": "5aa791cd7e6016cf957ce9bdb93b8603",
        "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat.gz": "a9454f3864d7fd4bb3ea7fc3eb84924e",
    }
    num_classes = 5
    image_size = 96

    def __init__(self, root: str | Path, *, train: bool = True, download: bool = False, size: int = 48):
        if not 1 <= size <= self.image_size:
            raise ValueError(f"size must lie in [1, {self.image_size}], got {size}")
        self.root, self.train = Path(root), train
        stem = self.prefix["train" if train else "test"]
        dat_path, cat_path, info_path = (self._ensure(f"{stem}-{part}.mat", download) for part in ("dat", "cat", "info"))
        dat = read_norb(dat_path, expected_dtype=np.uint8, expected_shape=(None, 2, self.image_size, self.image_size))
        cat = read_norb(cat_path, expected_dtype=np.int32, expected_shape=(None,))
        info = read_norb(info_path, expected_dtype=np.int32, expected_shape=(None, 4))
        if not dat.shape[0] == cat.shape[0] == info.shape[0]:
            raise DataError(
                f"smallNORB counts disagree: {dat_path} holds {dat.shape[0]} image pairs, {cat_path} "
                f"{cat.shape[0]} labels and {info_path} {info.shape[0]} info rows"
            )
        if cat.size and (cat.min() < 0 or cat.max() >= self.num_classes):
            raise DataError(f"{cat_path} holds category {int(cat.max())}, expected 0..{self.num_classes - 1}")
        self.images = _downsample(dat, size)
        self.labels = torch.from_numpy(cat.astype(np.int64))
        self.info = torch.from_numpy(info.astype(np.int64))

    @property
    def directory(self) -> Path:
        return self.root / self.folder

    def _ensure(self, name: str, download: bool) -> Path:
        gz, raw = self.directory / f"{name}.gz", self.directory / name
        expected = self.md5[gz.name]
        if gz.is_file():
            if md5sum(gz) == expected:
                return gz
            if not download:
                verify_md5(gz, expected)  # raises, naming the file and both checksums
            gz.unlink()  # a corrupt copy is not kept
        elif raw.is_file():
            return raw  # decompressed by hand: no published checksum, read_norb checks header and size
        elif not download:
            raise DataError(f"{gz} is missing (and so is the decompressed {raw.name}). {DATA_HINT}")
        return download_file([m + gz.name for m in self.mirrors], gz, expected)

    def __len__(self) -> int:
        return self.labels.shape[0]


def _downsample(dat: np.ndarray, size: int, chunk: int = 2048) -> Tensor:
    """Area-average ``(N, 2, 96, 96)`` uint8 pairs to ``(N, 2, size, size)`` uint8, in chunks (memory)."""
    out = torch.empty(dat.shape[0], dat.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, dat.shape[0], chunk):
        part = torch.from_numpy(np.ascontiguousarray(dat[start : start + chunk])).float()
        out[start : start + chunk] = F.interpolate(part, size=(size, size), mode="area").round_().clamp_(0, 255).to(torch.uint8)
    return out


def viewpoint_masks(info: Tensor, kind: str) -> Tensor:
    """Which samples show a training viewpoint of the novel-viewpoint experiment ``kind``.

    ``"azimuth"``: azimuths 300, 320, 340, 0, 20, 40 degrees (the rest, 60..280, are novel);
    ``"elevation"``: the 3 lowest elevations (the 6 highest are novel).

    Shape:
        info: ``(N, 4)`` (instance, elevation, azimuth, lighting); returns a ``(N,)`` bool mask.
    """
    if info.dim() != 2 or info.shape[1] != 4:
        raise ValueError(f"info must be (N, 4) (instance, elevation, azimuth, lighting), got {tuple(info.shape)}")
    if kind == "azimuth":
        return torch.isin(info[:, 2], torch.tensor(TRAIN_AZIMUTHS))
    if kind == "elevation":
        return torch.isin(info[:, 1], torch.tensor(TRAIN_ELEVATIONS))
    raise ValueError(f"viewpoint must be one of {VIEWPOINTS}, got {kind!r}")


def standardize(images: Tensor, *, eps: Optional[float] = None) -> Tensor:
    """Zero mean and unit variance per image, over channels and pixels.

    The standard deviation is floored at ``eps`` (default ``1 / sqrt(C H W)``, as TensorFlow's
    ``per_image_standardization``), so a constant image maps to zeros instead of 0/0.

    Shape:
        images: ``(B, C, H, W)`` floats; returns the same shape.
    """
    if images.dim() != 4:
        raise ValueError(f"standardize expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    floor = 1.0 / images[0].numel() ** 0.5 if eps is None else eps
    flat = images.flatten(1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1, unbiased=False).clamp_min(floor).view(-1, 1, 1, 1)
    return (images - mean) / std


def random_crop(images: Tensor, size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """An independent random ``size x size`` crop of every image (one gather, no per-sample loop).

    Shape:
        images: ``(B, C, H, W)``; returns ``(B, C, size, size)``.
    """
    if images.dim() != 4 or min(images.shape[2:]) < size:
        raise ValueError(f"random_crop expects (B, C, H, W) images of at least {size}x{size}, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    dy = torch.randint(0, h - size + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, w - size + 1, (b,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(size, device=images.device))[:, None, :, None]  # (B, 1, size, 1)
    cols = (dx[:, None] + torch.arange(size, device=images.device))[:, None, None, :]  # (B, 1, 1, size)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return images[batch, chan, rows, cols]


def centre_crop(images: Tensor, size: int) -> Tensor:
    """The central ``size x size`` crop (top-left biased by half a pixel when the margin is odd).

    Shape:
        images: ``(B, C, H, W)``; returns ``(B, C, size, size)``.
    """
    if images.dim() != 4 or min(images.shape[2:]) < size:
        raise ValueError(f"centre_crop expects (B, C, H, W) images of at least {size}x{size}, got {tuple(images.shape)}")
    top, left = (images.shape[2] - size) // 2, (images.shape[3] - size) // 2
    return images[:, :, top : top + size, left : left + size]


def random_brightness_contrast(
    images: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    brightness: float = 63 / 255,
    contrast: tuple[float, float] = (0.2, 1.8),
) -> Tensor:
    """Per image: add ``delta ~ U(-brightness, brightness)``, then scale the deviations from
    the image mean by ``f ~ U(*contrast)`` (TensorFlow's ``random_brightness`` and
    ``random_contrast`` with Google's values: max_delta 63 on the 0..255 scale, 0.2 to 1.8).

    Shape:
        images: ``(B, C, H, W)`` floats; returns the same shape.
    """
    if images.dim() != 4:
        raise ValueError(f"random_brightness_contrast expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    lo, hi = contrast
    if brightness < 0 or not 0 <= lo <= hi:
        raise ValueError(f"brightness must be >= 0 and contrast 0 <= low <= high, got {brightness}, {contrast}")
    b = images.shape[0]
    delta = (torch.rand(b, generator=generator) * 2 - 1).mul_(brightness).to(images).view(-1, 1, 1, 1)
    factor = (torch.rand(b, generator=generator) * (hi - lo) + lo).to(images).view(-1, 1, 1, 1)
    shifted = images + delta
    mean = shifted.mean(dim=(2, 3), keepdim=True)  # per channel, as random_contrast
    return (shifted - mean) * factor + mean


class SmallNORBData(ExperimentData):
    """smallNORB splits kept at 48x48 uint8; crops and jitter are applied per batch.

    ``preprocessing="paper"`` (Sec. 5): standardise each 48x48 image, crop (random in
    training, central in evaluation), then in training add random brightness and contrast.
    ``"google"`` (the released code): crop and jitter on the [0, 1] scale, clip, standardise
    last. (Without the clip, standardising last would undo the jitter exactly.)
    """

    def __init__(self, *, crop: int, preprocessing: str, jitter: dict, **kwargs):
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
        super().__init__(decode=self._eval_transform, **kwargs)
        self.crop, self.preprocessing, self.jitter = crop, preprocessing, jitter

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.splits["train"].images.shape[1], self.crop, self.crop)

    def _eval_transform(self, images: Tensor) -> Tensor:
        images = to_float(images)
        if self.preprocessing == "paper":
            return centre_crop(standardize(images), self.crop)
        return standardize(centre_crop(images, self.crop))

    def train_batch(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        split = self.splits["train"]
        images = to_float(split.images[index])
        if self.preprocessing == "paper":
            images = random_crop(standardize(images), self.crop, generator)
            images = random_brightness_contrast(images, generator, **self.jitter)
        else:
            images = random_crop(images, self.crop, generator)
            images = random_brightness_contrast(images, generator, **self.jitter).clamp_(0.0, 1.0)
            images = standardize(images)
        return images, split.labels[index]


def _take(split: Split, mask: Tensor) -> Split:
    index = mask.nonzero().flatten()
    return Split(split.images[index], split.labels[index])


def _limit(split: Split, limit: Optional[int]) -> Split:
    return split if limit is None else Split(split.images[:limit], split.labels[:limit])


@register_dataset("smallnorb")
def smallnorb_data(
    root: Path,
    *,
    download: bool = False,
    seed: int = 0,
    channels: int = 1,
    size: int = 48,
    crop: int = 32,
    val_size: int = 2430,
    viewpoint: Optional[str] = None,
    preprocessing: str = "paper",
    brightness: float = 63 / 255,
    contrast: tuple[float, float] = (0.2, 1.8),
    limit_train: Optional[int] = None,
    limit_eval: Optional[int] = None,
) -> SmallNORBData:
    """smallNORB for the EM-capsule experiments.

    Args:
        channels: 1 (left camera, the paper's parameter counts) or 2 (the stereo pair, as
            Google's code feeds it).
        size, crop: downsampled side (48) and crop side (32).
        val_size: training pairs held out (seeded) for validation; the test split is only for
            the final number.
        viewpoint: None (the official train / test split), ``"azimuth"`` or ``"elevation"``
            (Sec. 5.2): train and validate on the training viewpoints of the training file,
            ``test`` holds the test-file images at novel viewpoints and the extra split
            ``familiar`` those at the training viewpoints.
        preprocessing, brightness, contrast: see :class:`SmallNORBData`.
        limit_train, limit_eval: keep only the first images of each split (quick runs).
    """
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 (left image) or 2 (stereo pair), got {channels}")
    if not 1 <= crop <= size:
        raise ValueError(f"crop must lie in [1, size={size}], got {crop}")
    if viewpoint is not None and viewpoint not in VIEWPOINTS:
        raise ValueError(f"viewpoint must be None or one of {VIEWPOINTS}, got {viewpoint!r}")
    train_file = SmallNORB(root, train=True, download=download, size=size)
    test_file = SmallNORB(root, train=False, download=download, size=size)
    pick = slice(0, channels)
    full = Split(train_file.images[:, pick].contiguous(), train_file.labels)
    test = Split(test_file.images[:, pick].contiguous(), test_file.labels)
    extra = {}
    if viewpoint is not None:
        full = _take(full, viewpoint_masks(train_file.info, viewpoint))
        familiar = viewpoint_masks(test_file.info, viewpoint)
        extra["familiar"] = _limit(_take(test, familiar), limit_eval)
        test = _take(test, ~familiar)
    train_idx, val_idx = train_val_split(len(full), min(val_size, len(full) - 1), seed)
    data = SmallNORBData(
        name="smallnorb" if viewpoint is None else f"smallnorb_{viewpoint}",
        train=_limit(Split(full.images[train_idx], full.labels[train_idx]), limit_train),
        val=_limit(Split(full.images[val_idx], full.labels[val_idx]), limit_eval),
        test=_limit(test, limit_eval),
        num_classes=SmallNORB.num_classes,
        crop=crop,
        preprocessing=preprocessing,
        jitter=dict(brightness=brightness, contrast=tuple(contrast)),
    )
    data.splits.update(extra)
    return data

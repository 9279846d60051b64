"""Robustness to affine transformations (Sabour et al. 2017, Sec. 5.2): expanded MNIST, affine MNIST, affNIST.

The paper trains a CapsNet and a CNN with max-pooling and dropout on MNIST digits placed
at random on a 40x40 black background, then tests them on affNIST, MNIST digits under
random small affine transformations. Three registered datasets share the training side:

- ``mnist_expanded``: train, validation and test are all expanded MNIST. Each 28x28 digit
  is padded by ``pad`` and shifted by up to ``shift`` pixels per axis (official code:
  pad 6, shift 6, i.e. anywhere on the 40x40 canvas). Training placements are drawn per
  batch from the loop's generator; validation and test placements are fixed by
  ``placement_seed``.
- ``affine_mnist``: the same train and validation; the test set is the MNIST test digits
  under a random affine map each (:func:`random_affine`: rotation within +-20 degrees,
  shear within +-0.2, scale 0.8-1.2 per axis, a translation that keeps the digit inside
  the 40x40 frame: affNIST's published ranges), generated reproducibly from
  ``affine_seed``. It stands in for affNIST where the official files are absent.
- ``affnist``: the same train and validation; the test set is the official affNIST file
  (:class:`AffNIST`, read with scipy, an optional dependency).
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ExperimentData, Split
from .download import md5sum, verify_md5
from .errors import DataError
from .registry import load_dataset, register_dataset
from .transforms import random_shift, to_float

__all__ = [
    "AffNIST",
    "AffineParams",
    "affine_matrices",
    "affine_transform",
    "expand_images",
    "random_affine",
    "read_affnist_mat",
]

log = logging.getLogger(__name__)

#: affNIST's ranges (its homepage; commonly cited): rotation (degrees), shear, scale per axis.
MAX_ROTATION, MAX_SHEAR, SCALE_RANGE = 20.0, 0.2, (0.8, 1.2)


# --------------------------------------------------------------------------- expanded MNIST


def expand_images(images: Tensor, pad: int) -> Tensor:
    """Centre each image on a black canvas ``pad`` pixels larger on every side.

    Shape:
        images: ``(N, C, H, W)`` (any dtype); returns ``(N, C, H + 2 pad, W + 2 pad)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    return F.pad(images, (pad, pad, pad, pad))


def _placed(split: Split, pad: int, shift: int, generator: torch.Generator) -> Split:
    """A fixed random placement of every digit of ``split`` on the expanded canvas."""
    return Split(random_shift(expand_images(split.images, pad), shift, generator), split.labels)


def _expanded(root, *, download, seed, pad, shift, placement_seed, source, source_options) -> tuple[ExperimentData, dict[str, Split]]:
    if pad < 0 or not 0 <= shift <= pad:
        raise ValueError(f"need pad >= 0 and 0 <= shift <= pad (a shift past the padding cuts the digit); got pad={pad} shift={shift}")
    base = load_dataset(source, root, download=download, seed=seed, **source_options)
    generator = torch.Generator().manual_seed(placement_seed)
    splits = {
        "train": Split(expand_images(base.splits["train"].images, pad), base.splits["train"].labels),
        "val": _placed(base.splits["val"], pad, shift, generator),
        "test": _placed(base.splits["test"], pad, shift, generator),
    }
    return base, splits


def _data(name: str, base: ExperimentData, splits: dict[str, Split], shift: int) -> ExperimentData:
    return ExperimentData(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        num_classes=base.num_classes,
        augment=(lambda images, generator: random_shift(images, shift, generator)) if shift else None,
    )


@register_dataset("mnist_expanded")
def mnist_expanded(
    root, *, download: bool = False, seed: int = 0, pad: int = 6, shift: int = 6, placement_seed: int = 0, source: str = "mnist", **source_options
) -> ExperimentData:
    """MNIST digits placed at random on a ``28 + 2 pad`` square black background (official code: 40x40).

    ``source_options`` go to the source dataset's builder (MNIST: ``val_size``,
    ``limit_train``, ``limit_eval``; ``source="synthetic"`` for file-free smoke runs).

    Shape:
        batches: images ``(B, C, h + 2 pad, h + 2 pad)`` (MNIST: ``(B, 1, 40, 40)``), labels ``(B,)``.
    """
    base, splits = _expanded(
        root, download=download, seed=seed, pad=pad, shift=shift, placement_seed=placement_seed, source=source, source_options=source_options
    )
    return _data("mnist_expanded", base, splits, shift)


# --------------------------------------------------------------------------- affine MNIST


class AffineParams(NamedTuple):
    """One random affine map per image; ``matrix`` and ``translation`` act in pixel (x, y) coordinates.

    angle: ``(N,)`` degrees; shear: ``(N,)``; scale: ``(N, 2)`` (x, y);
    translation: ``(N, 2)`` pixels (x, y); matrix: ``(N, 2, 2)`` = rotation @ shear @ scale.
    """

    angle: Tensor
    shear: Tensor
    scale: Tensor
    translation: Tensor
    matrix: Tensor


def affine_matrices(angle: Tensor, shear: Tensor, scale: Tensor) -> Tensor:
    """``R(angle) @ [[1, shear], [0, 1]] @ diag(scale)``: scale each axis, shear x by y, then rotate.

    Shape:
        angle: ``(N,)`` degrees; shear: ``(N,)``; scale: ``(N, 2)``; returns ``(N, 2, 2)``.
    """
    if angle.dim() != 1 or shear.shape != angle.shape or scale.shape != (angle.shape[0], 2):
        raise ValueError(
            f"need angle (N,), shear (N,) and scale (N, 2); got {tuple(angle.shape)}, {tuple(shear.shape)}, {tuple(scale.shape)}"
        )
    t = torch.deg2rad(angle)
    cos, sin, one, zero = torch.cos(t), torch.sin(t), torch.ones_like(t), torch.zeros_like(t)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (N, 2, 2)
    shearing = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    return rotation @ shearing @ torch.diag_embed(scale)


def affine_transform(images: Tensor, matrix: Tensor, translation: Tensor) -> Tensor:
    """Map each image by ``q = A (p - c) + c + t`` about its centre ``c``, bilinear, black outside.

    ``p``, ``q`` are pixel coordinates (x right, y down) of the input and output; one
    batched ``affine_grid`` / ``grid_sample`` call samples the input at ``A^-1 (q - c - t) + c``.

    Shape:
        images: ``(N, C, S, S)`` floats; matrix: ``(N, 2, 2)``; translation: ``(N, 2)``
        pixels (x, y); returns ``(N, C, S, S)``.
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square (N, C, S, S), got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise ValueError(f"images must be floating (e.g. uint8 / 255), got dtype {images.dtype}")
    n, size = images.shape[0], images.shape[2]
    if matrix.shape != (n, 2, 2) or translation.shape != (n, 2):
        raise ValueError(f"need matrix ({n}, 2, 2) and translation ({n}, 2), got {tuple(matrix.shape)} and {tuple(translation.shape)}")
    inverse = torch.linalg.inv(matrix.to(images.dtype))
    # With align_corners=False a pixel p maps to the normalised coordinate (2 / S)(p - c).
    shift = -(inverse @ (2.0 / size * translation.to(images.dtype))[..., None])  # (N, 2, 1)
    theta = torch.cat([inverse, shift], dim=2).to(images.device)  # (N, 2, 3): output -> input
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _content_box(images: Tensor) -> Tensor:
    """Pixel-edge box ``(x0, y0, x1, y1)`` of the non-zero pixels, relative to the image centre.

    Shape:
        images: ``(N, C, S, S)``; returns ``(N, 4)``; an empty image gives the centre point.
    """
    n, size = images.shape[0], images.shape[2]
    on = images.reshape(n, -1, size, size).ne(0).any(dim=1)  # (N, S, S)
    idx = torch.arange(size, dtype=torch.float64)
    c = (size - 1) / 2

    def extent(mask: Tensor) -> tuple[Tensor, Tensor]:  # mask (N, S) along one axis
        lo = torch.where(mask, idx, torch.full_like(idx, math.inf)).amin(1) - 0.5
        hi = torch.where(mask, idx, torch.full_like(idx, -math.inf)).amax(1) + 0.5
        empty = ~mask.any(1)
        return torch.where(empty, c, lo) - c, torch.where(empty, c, hi) - c

    x0, x1 = extent(on.any(dim=1))
    y0, y1 = extent(on.any(dim=2))
    return torch.stack([x0, y0, x1, y1], dim=1)


def random_affine(
    images: Tensor,
    generator: torch.Generator,
    *,
    max_rotation: float = MAX_ROTATION,
    max_shear: float = MAX_SHEAR,
    scale: Sequence[float] = SCALE_RANGE,
) -> tuple[Tensor, AffineParams]:
    """A random small affine map of each image, with a translation that keeps the digit in the frame.

    Angle uniform in ``[-max_rotation, max_rotation]`` degrees, shear in
    ``[-max_shear, max_shear]``, scale per axis uniform in ``scale``. The translation is
    uniform over the offsets that keep the mapped box of the digit's non-zero pixels
    inside the frame (the digit is centred where it cannot fit). Random numbers come from
    ``generator`` only, so a seed fixes the set.

    Shape:
        images: ``(N, C, S, S)`` floats; returns the transformed ``(N, C, S, S)`` and :class:`AffineParams`.
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square (N, C, S, S), got shape {tuple(images.shape)}")
    lo_s, hi_s = scale
    if max_rotation < 0 or max_shear < 0 or not 0 < lo_s <= hi_s:
        raise ValueError(f"need max_rotation >= 0, max_shear >= 0 and 0 < scale[0] <= scale[1]; got {max_rotation}, {max_shear}, {tuple(scale)}")
    n, size = images.shape[0], images.shape[2]
    u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    angle = (2 * u[:, 0] - 1) * max_rotation
    shear = (2 * u[:, 1] - 1) * max_shear
    scales = lo_s + (hi_s - lo_s) * u[:, 2:4]
    matrix = affine_matrices(angle, shear, scales)  # (N, 2, 2) float64
    box = _content_box(images)
    corners = torch.stack([box[:, [0, 1]], box[:, [2, 1]], box[:, [0, 3]], box[:, [2, 3]]], dim=1)  # (N, 4, 2) x, y
    mapped = corners @ matrix.transpose(1, 2)  # (N, 4, 2)
    half = size / 2  # the frame spans [-S/2, S/2] around the centre
    low, high = -half - mapped.amin(1), half - mapped.amax(1)  # (N, 2) allowed translation
    fits = low <= high
    translation = torch.where(fits, low + (high - low) * u[:, 4:6], torch.zeros_like(low))
    out = affine_transform(images, matrix, translation)
    return out, AffineParams(angle, shear, scales, translation, matrix)


def _affine_split(split: Split, pad: int, generator: torch.Generator, **ranges) -> Split:
    """The digits of ``split`` centred on the expanded canvas, each under its own random affine map (uint8)."""
    centred = to_float(expand_images(split.images, pad))
    out = torch.empty(centred.shape, dtype=torch.uint8)
    for start in range(0, centred.shape[0], 2048):  # bounded memory for the grids
        moved, _ = random_affine(centred[start : start + 2048], generator, **ranges)
        out[start : start + 2048] = moved.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return Split(out, split.labels)


@register_dataset("affine_mnist")
def affine_mnist(
    root,
    *,
    download: bool = False,
    seed: int = 0,
    pad: int = 6,
    shift: int = 6,
    placement_seed: int = 0,
    affine_seed: int = 0,
    max_rotation: float = MAX_ROTATION,
    max_shear: float = MAX_SHEAR,
    scale: Sequence[float] = SCALE_RANGE,
    source: str = "mnist",
    **source_options,
) -> ExperimentData:
    """Train and validate on expanded MNIST; test on the MNIST test digits under random affine maps.

    The test set (uint8, like affNIST) depends only on ``affine_seed`` and the ranges.

    Shape:
        batches: images ``(B, 1, 40, 40)``, labels ``(B,)``.
    """
    base, splits = _expanded(
        root, download=download, seed=seed, pad=pad, shift=shift, placement_seed=placement_seed, source=source, source_options=source_options
    )
    generator = torch.Generator().manual_seed(affine_seed)
    splits["test"] = _affine_split(
        base.splits["test"], pad, generator, max_rotation=max_rotation, max_shear=max_shear, scale=tuple(scale)
    )
    return _data("affine_mnist", base, splits, shift)


# --------------------------------------------------------------------------- affNIST files


def _loadmat(data: bytes, path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"reading {path} needs scipy, an optional dependency of capsnet: pip install scipy "
            f"(or pip install 'capsnet[affnist]')"
        ) from None
    try:
        return loadmat(io.BytesIO(data), squeeze_me=False, struct_as_record=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, ... for damaged files
        raise DataError(
            f"{path} is not a readable MATLAB file ({type(exc).__name__}: {exc}); it is truncated or corrupt. "
            f"Download it again from {AffNIST.homepage}"
        ) from None


def read_affnist_mat(data: bytes, path: Path | str = "<bytes>", *, image_size: int = 40, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Images and labels of an affNIST ``.mat`` file (struct ``affNISTdata``).

    ``image`` is ``1600 x N`` uint8, one image per column, each column row-major 40x40 (as
    the common loaders read it: ``image.T.reshape(N, 40, 40)``); ``label_int`` holds the
    ``N`` classes. ``path`` only names the file in errors.

    Shape:
        returns images ``(N, 1, 40, 40)`` uint8 and labels ``(N,)`` int64.
    """
    path = Path(path)
    mat = _loadmat(data, path)
    if "affNISTdata" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} holds no `affNISTdata` struct (found: {', '.join(found) or 'nothing'}); it is not an affNIST file")
    record = mat["affNISTdata"]
    names = record.dtype.names or ()
    for field in ("image", "label_int"):
        if field not in names:
            raise DataError(f"{path}: struct affNISTdata has no `{field}` field (fields: {', '.join(names) or 'none'})")
    image = np.asarray(record["image"].reshape(-1)[0])
    labels = np.asarray(record["label_int"].reshape(-1)[0]).reshape(-1)
    pixels = image_size * image_size
    if image.ndim != 2 or image.shape[0] != pixels:
        raise DataError(f"{path}: affNISTdata.image must be {pixels} x N ({image_size}x{image_size} images as columns), got {image.shape}")
    if image.shape[1] != labels.shape[0]:
        raise DataError(f"{path}: affNISTdata.image holds {image.shape[1]} images but label_int holds {labels.shape[0]} labels")
    if not np.issubdtype(image.dtype, np.integer) or (image.size and (image.min() < 0 or image.max() > 255)):
        raise DataError(f"{path}: affNISTdata.image must hold integer pixels in [0, 255], got dtype {image.dtype}")
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.all(np.mod(labels, 1) == 0)):
        raise DataError(f"{path}: affNISTdata.label_int must hold integer classes, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: affNISTdata.label_int must lie in [0, {num_classes - 1}], got min {labels.min()} max {labels.max()}")
    images = torch.from_numpy(np.ascontiguousarray(image.T.reshape(-1, 1, image_size, image_size).astype(np.uint8)))
    return images, torch.from_numpy(labels.astype(np.int64))


def _listed_md5(root: Path, relative: str) -> Optional[str]:
    """The MD5 that ``<root>/MD5SUMS`` (``md5sum`` format, as in the shared data folder) lists for ``relative``."""
    sums = root / "MD5SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == relative:
            return parts[0].lower()
    return None


class AffNIST:
    """The official affNIST test set, read from ``<root>/affnist/<filename>``.

    ``filename`` is the ``.mat`` file or the ``.mat.zip`` archive it comes in (the
    homepage's ``32x/transformed/test.mat.zip``: 320,000 images, 32 affine versions of
    each MNIST test digit); a missing ``test.mat`` falls back to ``test.mat.zip``.
    affNIST publishes no checksums, so the file is verified against ``md5`` when given,
    else against the entry ``affnist/<file>`` of ``<root>/MD5SUMS`` when there is one,
    else read unverified (logged). It is never downloaded automatically: with no
    published checksum, a download could not be verified.

    Attributes:
        images: ``(N, 1, 40, 40)`` uint8; labels: ``(N,)`` int64.
    """

    folder = "affnist"
    homepage = "https://www.cs.toronto.edu/~tijmen/affNIST/"
    url = homepage + "32x/transformed/test.mat.zip"

    def __init__(self, root: str | Path, *, filename: str = "test.mat", md5: Optional[str] = None):
        self.root = Path(root)
        path = self.root / self.folder / filename
        if not path.is_file() and not filename.endswith(".zip") and (path.parent / (filename + ".zip")).is_file():
            path = path.parent / (filename + ".zip")
        if not path.is_file():
            raise DataError(
                f"{path} is missing. Download {self.url} by hand (affNIST publishes no checksum, so capsnet does not "
                f"fetch it) and put it, or the test.mat inside it, in {self.root / self.folder}; or point the data "
                f"root (--data / CAPSNET_DATA) at a folder that holds {self.folder}/."
            )
        self.path = path
        expected = md5 or _listed_md5(self.root, f"{self.folder}/{path.name}")
        if expected:
            verify_md5(path, expected)
        else:
            log.warning("%s has no known checksum (MD5 %s); reading it unverified", path, md5sum(path))
        self.images, self.labels = read_affnist_mat(self._mat_bytes(path), path)

    @staticmethod
    def _mat_bytes(path: Path) -> bytes:
        if path.suffix != ".zip":
            return path.read_bytes()
        try:
            with zipfile.ZipFile(path) as archive:
                members = [m for m in archive.namelist() if m.endswith(".mat")]
                if len(members) != 1:
                    raise DataError(f"{path} must hold exactly one .mat file, holds {archive.namelist()}")
                return archive.read(members[0])
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            raise DataError(f"{path} is not a readable zip archive ({exc}); it is truncated or corrupt. Download it again.") from None

    def __len__(self) -> int:
        return self.labels.shape[0]


@register_dataset("affnist")
def affnist(
    root,
    *,
    download: bool = False,
    seed: int = 0,
    pad: int = 6,
    shift: int = 6,
    placement_seed: int = 0,
    filename: str = "test.mat",
    md5: Optional[str] = None,
    limit_test: Optional[int] = None,
    source: str = "mnist",
    **source_options,
) -> ExperimentData:
    """Train and validate on expanded MNIST (40x40); test on the official affNIST file (Sec. 5.2).

    Shape:
        batches: images ``(B, 1, 40, 40)``, labels ``(B,)``.
    """
    if 28 + 2 * pad != 40:
        raise ValueError(f"affNIST images are 40x40, so expanded MNIST needs pad=6; got pad={pad}")
    test = AffNIST(root, filename=filename, md5=md5)
    base, splits = _expanded(
        root, download=download, seed=seed, pad=pad, shift=shift, placement_seed=placement_seed, source=source, source_options=source_options
    )
    if splits["train"].images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"source {source!r} gives {tuple(splits['train'].images.shape[1:])} images; affNIST needs 1x28x28 digits padded to 40x40")
    n = len(test) if limit_test is None else limit_test
    splits["test"] = Split(test.images[:n], test.labels[:n])
    return _data("affnist", base, splits, shift)

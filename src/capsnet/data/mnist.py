"""MNIST and Fashion-MNIST from the original IDX files, with checksummed download."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import ExperimentData, Split
from .download import download_file, md5sum, verify_md5
from .errors import DataError
from .idx import read_idx
from .registry import register_dataset
from .transforms import efficient_capsnet_augment as _efficient_capsnet_augment
from .transforms import random_shift, train_val_split

__all__ = ["MNIST", "FashionMNIST"]


class MNIST:
    """The MNIST digits, read from ``<root>/mnist/*.gz`` (the official file names).

    Every file is checked against its published MD5 before it is read. With
    ``download=True`` missing or corrupt files are fetched from the mirrors (atomically,
    verified); otherwise a :class:`DataError` says which file and what to do.

    Attributes:
        images: ``(N, 1, 28, 28)`` uint8 tensor; labels: ``(N,)`` int64 tensor.
    """

    folder = "mnist"
    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    md5 = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    num_classes = 10

    def __init__(self, root: str | Path, *, train: bool = True, download: bool = False):
        self.root = Path(root)
        self.train = train
        image_file, label_file = self.files["train" if train else "test"]
        image_path, label_path = (self._ensure(name, download) for name in (image_file, label_file))
        images = read_idx(image_path, expected_ndim=3)
        labels = read_idx(label_path, expected_ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels")
        if images.shape[1:] != (28, 28):
            raise DataError(f"{image_path} holds {images.shape[1:]} images, expected 28x28")
        if labels.size and labels.max() >= self.num_classes:
            raise DataError(f"{label_path} holds label {int(labels.max())}, expected 0..{self.num_classes - 1}")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))

    @property
    def directory(self) -> Path:
        return self.root / self.folder

    def _ensure(self, name: str, download: bool) -> Path:
        path = self.directory / name
        expected = self.md5[name]
        if path.is_file() and md5sum(path) == expected:
            return path
        if not download:
            verify_md5(path, expected)  # raises with the reason: missing or checksum mismatch
        if path.is_file():
            path.unlink()  # a corrupt copy is not kept
        return download_file([m + name for m in self.mirrors], path, expected)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class FashionMNIST(MNIST):
    """Fashion-MNIST (Xiao et al. 2017), same format as MNIST, read from ``<root>/fashion-mnist/``."""

    folder = "fashion-mnist"
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    md5 = {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }


def _limit(split: Split, limit: Optional[int]) -> Split:
    return split if limit is None else Split(split.images[:limit], split.labels[:limit])


def _idx_experiment(
    cls,
    root: Path,
    *,
    download: bool,
    seed: int,
    val_size: int = 5000,
    shift: int = 2,
    efficient_capsnet_augment: bool = False,
    limit_train: Optional[int] = None,
    limit_eval: Optional[int] = None,
) -> ExperimentData:
    """The 60k training images split (seeded) into train and validation; the 10k test images kept apart.

    Training batches are shifted by up to ``shift`` pixels (Sabour et al. 2017); with
    ``efficient_capsnet_augment`` they first get the Efficient-CapsNet augmentation
    (:func:`~capsnet.data.transforms.efficient_capsnet_augment`; its recipe sets ``shift=0``).
    """
    full, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    train_idx, val_idx = train_val_split(len(full), val_size, seed)
    train = Split(full.images[train_idx], full.labels[train_idx])
    val = Split(full.images[val_idx], full.labels[val_idx])
    return ExperimentData(
        name=cls.folder,
        train=_limit(train, limit_train),
        val=_limit(val, limit_eval),
        test=_limit(Split(test.images, test.labels), limit_eval),
        num_classes=cls.num_classes,
        augment=_augment(shift, efficient_capsnet_augment),
    )


def _augment(shift: int, efficient: bool):
    if efficient:
        return functools.partial(_efficient_then_shift, max_shift=shift)
    return functools.partial(_shift, max_shift=shift) if shift else None


def _shift(images, generator, *, max_shift):
    return random_shift(images, max_shift, generator)


def _efficient_then_shift(images, generator, *, max_shift):
    return random_shift(_efficient_capsnet_augment(images, generator), max_shift, generator)


register_dataset("mnist")(functools.partial(_idx_experiment, MNIST))
register_dataset("fashion_mnist")(functools.partial(_idx_experiment, FashionMNIST))

"""Datasets (one module per family), batched transforms and the dataset registry."""

# Imported to register their datasets (mnist, fashion_mnist, synthetic, multimnist, mnist_expanded, affine_mnist, affnist, smallnorb).
from . import affnist, mnist, multimnist, smallnorb, synthetic  # noqa: F401
from .base import ExperimentData, Split
from .errors import DataError
from .idx import read_idx, write_idx
from .mnist import MNIST, FashionMNIST
from .registry import list_datasets, load_dataset, register_dataset
from .transforms import random_shift, to_float, train_val_split

__all__ = [
    "DataError",
    "ExperimentData",
    "FashionMNIST",
    "MNIST",
    "Split",
    "list_datasets",
    "load_dataset",
    "random_shift",
    "read_idx",
    "register_dataset",
    "to_float",
    "train_val_split",
    "write_idx",
]

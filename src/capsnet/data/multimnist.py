"""MultiMNIST (Sabour et al. 2017, Sec. 6): two overlapping digits of different classes on 36x36.

The paper overlays each digit with a digit of a different class from the same set
(training or test), each shifted by up to 4 pixels in each direction, giving 36x36
images. Construction, as in the official code (``mnist_shift.py``):

- each 28x28 digit is padded by ``shift`` (28 -> 36) and shifted by an independent
  offset in ``[-shift, shift]`` per axis, i.e. placed at a corner offset in
  ``[0, 2 * shift]`` of the 36x36 canvas; no pixel of the digit is ever cut;
- the partner is drawn uniformly from the digits *of another class* of the same split;
- the two shifted digits are **summed and clipped to [0, 1]** (``combine="sum"``, the
  official code's ``np.minimum(a + b, 255)``); ``combine="max"`` takes the pixel-wise
  maximum instead.

Training pairs are never stored: every call of :meth:`MultiMNISTData.train_batch` draws
fresh partners and shifts from the training loop's generator, so one epoch shows each
training digit once as the base of a new pair, and a resumed run (whose generator state
is checkpointed) sees exactly the pairs the uninterrupted run would have seen. The paper
pre-generates 1,000 pairs per digit (60M training, 10M test pairs). Here the test set
is a fixed, reproducible set of ``test_pairs`` (default 10,000) pairs of test digits and
the validation set one pair per validation digit (held out of the training file); both
are rendered batch by batch from a stored recipe (indices and offsets) that depends only
on ``pairs_seed``, so runs with different seeds are scored on the same pairs.

Targets are a :class:`MultiDigitTarget`: the two classes ``(B, 2)`` and each digit's own
shifted image ``(B, 2, C, 36, 36)``, which the reconstruction loss needs (each digit is
reconstructed separately against its own image, Sec. 6). The model sees only the overlay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from .base import ExperimentData, Split
from .registry import load_dataset, register_dataset
from .transforms import to_float

__all__ = [
    "ClassIndex",
    "MultiDigitTarget",
    "MultiMNISTData",
    "PairRecipe",
    "class_index",
    "combine_digits",
    "fixed_pairs",
    "multimnist_data",
    "place_digits",
    "render_pairs",
    "sample_pairs",
]

#: Pixel-combination rules; "sum" is the official code's (sum, clipped at the maximum).
COMBINE_RULES = ("sum", "max")


@dataclass(frozen=True)
class MultiDigitTarget:
    """Targets of a multi-digit batch; indexes, moves and measures like a batch tensor.

    classes: ``(B, K)`` int64 class of each digit (all different within a row).
    digits: ``(B, K, C, H, W)`` each digit alone, shifted exactly as in the overlay: the
    reconstruction target of the capsule of ``classes[:, k]``.

    ``len(target)`` is ``B``, ``target[index]`` selects samples and ``target.to(device)``
    moves both tensors, so a training loop can shard and move it as it does label tensors.
    """

    classes: Tensor
    digits: Tensor

    def __post_init__(self):
        if self.classes.dim() != 2 or self.digits.dim() != 5 or self.digits.shape[:2] != self.classes.shape:
            raise ValueError(
                f"need classes (B, K) and digits (B, K, C, H, W) with the same B, K; "
                f"got {tuple(self.classes.shape)} and {tuple(self.digits.shape)}"
            )

    def __len__(self) -> int:
        return self.classes.shape[0]

    def __getitem__(self, index) -> "MultiDigitTarget":
        if isinstance(index, int):
            raise ValueError(f"index a MultiDigitTarget with a slice or an index tensor (it keeps the batch axis), got {index!r}")
        return MultiDigitTarget(self.classes[index], self.digits[index])

    def to(self, device) -> "MultiDigitTarget":
        return MultiDigitTarget(self.classes.to(device), self.digits.to(device))


class PairRecipe(NamedTuple):
    """Everything that defines a set of pairs, without pixels.

    first, second: ``(N,)`` indices into the split's digits (different classes).
    offsets: ``(N, 2, 2)`` int64 top-left corner ``(row, col)`` of each digit in the canvas,
    in ``[0, 2 * shift]``: offset ``shift + d`` is a shift by ``d`` pixels.
    """

    first: Tensor
    second: Tensor
    offsets: Tensor

    def __len__(self) -> int:
        return self.first.shape[0]

    def take(self, index: Tensor) -> "PairRecipe":
        return PairRecipe(self.first[index], self.second[index], self.offsets[index])


def place_digits(images: Tensor, offsets: Tensor, size: int) -> Tensor:
    """Paste each image on a black ``size x size`` canvas with its top-left corner at ``offsets``.

    Shape:
        images: ``(B, C, h, w)``; offsets: ``(B, 2)`` integer ``(row, col)`` with
        ``0 <= row <= size - h`` and ``0 <= col <= size - w``; returns ``(B, C, size, size)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, h, w), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if offsets.shape != (b, 2) or offsets.dtype.is_floating_point:
        raise ValueError(f"offsets must be ({b}, 2) integers (row, col), got shape {tuple(offsets.shape)} dtype {offsets.dtype}")
    if size < max(h, w):
        raise ValueError(f"canvas size {size} is smaller than the {h}x{w} images")
    if b and (int(offsets.min()) < 0 or int(offsets[:, 0].max()) > size - h or int(offsets[:, 1].max()) > size - w):
        raise ValueError(
            f"offsets must keep the {h}x{w} images inside the {size}x{size} canvas: rows in [0, {size - h}], "
            f"cols in [0, {size - w}]; got min {int(offsets.min())}, max row {int(offsets[:, 0].max())}, "
            f"max col {int(offsets[:, 1].max())}"
        )
    offsets = offsets.to(images.device)
    canvas = images.new_zeros(b, c, size, size)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (B, h) canvas row of each image row
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (B, w)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    canvas[batch, chan, rows[:, None, :, None], cols[:, None, None, :]] = images
    return canvas


def combine_digits(digits: Tensor, rule: str = "sum") -> Tensor:
    """Overlay the digits of each sample: ``"sum"`` clipped to [0, 1] (official code) or ``"max"``.

    Shape:
        digits: ``(B, K, C, H, W)`` floats in [0, 1]; returns ``(B, C, H, W)`` in [0, 1].
    """
    if digits.dim() != 5:
        raise ValueError(f"digits must be (B, K, C, H, W), got shape {tuple(digits.shape)}")
    if rule == "sum":
        return digits.sum(dim=1).clamp_(0.0, 1.0)
    if rule == "max":
        return digits.amax(dim=1)
    raise ValueError(f"combine rule must be one of {COMBINE_RULES}, got {rule!r}")


class ClassIndex(NamedTuple):
    """The digits of a split grouped by class, computed once per split (sorting 55,000 labels per batch is slow).

    labels: ``(N,)`` int64; order: ``(N,)`` digit indices sorted by class (stable);
    counts, starts: ``(J,)`` size and first position of each class's block in ``order``.
    """

    labels: Tensor
    order: Tensor
    counts: Tensor
    starts: Tensor


def class_index(labels: Tensor) -> ClassIndex:
    """Group the digits of a split by class for :func:`sample_pairs`.

    Shape:
        labels: ``(N,)`` integer classes; returns a :class:`ClassIndex`.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be (N,) integer classes, got {shape} {getattr(labels, 'dtype', '')}")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
    counts = torch.bincount(labels, minlength=1)
    return ClassIndex(labels, torch.argsort(labels, stable=True), counts, torch.cumsum(counts, 0) - counts)


def sample_pairs(
    labels: Tensor | ClassIndex, index: Tensor, generator: Optional[torch.Generator] = None, *, shift: int = 4
) -> PairRecipe:
    """For each base digit ``index[b]``, draw a partner of another class and both digits' shifts.

    The partner is uniform over all digits of the split whose class differs from the
    base's (the official code draws candidates uniformly and drops same-class ones);
    each digit's shift is uniform in ``[-shift, shift]`` per axis (Sec. 6: "up to 4
    pixels in each direction"). Random numbers come from ``generator`` only: exactly
    ``B`` uniforms, then ``4 B`` integers.

    Shape:
        labels: ``(N,)`` integer classes of the split's digits, or their :func:`class_index`;
        index: ``(B,)``; returns a :class:`PairRecipe` of ``B`` pairs.
    """
    grouped = labels if isinstance(labels, ClassIndex) else class_index(labels)
    if index.dim() != 1:
        raise ValueError(f"index must be (B,) digit indices, got shape {tuple(index.shape)}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    base_class = grouped.labels[index]
    size = grouped.counts[base_class]  # (B,) digits of the base's class
    others = grouped.labels.shape[0] - size  # (B,) digits of another class
    if index.numel() and int(others.min()) == 0:
        raise ValueError(f"every digit of the split has class {int(base_class[others.argmin()])}: no partner of another class exists")
    # A uniform position among the `others` digits of `order`, skipping the base class's block.
    u = torch.rand(index.shape[0], generator=generator, dtype=torch.float64)
    r = torch.minimum((u * others).long(), others - 1)
    position = r + (r >= grouped.starts[base_class]).long() * size
    offsets = torch.randint(0, 2 * shift + 1, (index.shape[0], 2, 2), generator=generator)
    return PairRecipe(index.long(), grouped.order[position], offsets)


def render_pairs(images: Tensor, labels: Tensor, recipe: PairRecipe, *, shift: int = 4, combine: str = "sum") -> tuple[Tensor, MultiDigitTarget]:
    """Draw the pairs of ``recipe``: the overlays and, as targets, the classes and each shifted digit.

    Shape:
        images: ``(N, C, h, h)`` the split's digits (uint8 or floats in [0, 1]); labels: ``(N,)``;
        returns overlays ``(B, C, S, S)`` with ``S = h + 2 * shift`` and a :class:`MultiDigitTarget`
        with classes ``(B, 2)`` and digits ``(B, 2, C, S, S)``.
    """
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be square (N, C, h, h) digits, got shape {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be ({images.shape[0]},) to match the images, got shape {tuple(labels.shape)}")
    size = images.shape[2] + 2 * shift
    pair = torch.stack([recipe.first, recipe.second], dim=1)  # (B, 2)
    placed = place_digits(to_float(images[pair.reshape(-1)]), recipe.offsets.reshape(-1, 2), size)  # (2B, C, S, S)
    placed = placed.reshape(*pair.shape, *placed.shape[1:])  # (B, 2, C, S, S)
    return combine_digits(placed, combine), MultiDigitTarget(labels[pair].long(), placed)


class MultiMNISTData(ExperimentData):
    """MultiMNIST pairs drawn from the digits of the train / val / test splits of a source dataset.

    ``size("train")`` is the number of training digits (one epoch = each digit once as a
    base); ``size("val")`` and ``size("test")`` are the numbers of fixed pairs.
    """

    def __init__(
        self,
        *,
        digits: dict[str, Split],
        recipes: dict[str, PairRecipe],
        num_classes: int,
        shift: int = 4,
        combine: str = "sum",
        name: str = "multimnist",
    ):
        super().__init__(name=name, train=digits["train"], val=digits["val"], test=digits["test"], num_classes=num_classes)
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
        self.recipes, self.shift, self.combine = recipes, shift, combine
        self.by_class = class_index(digits["train"].labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.splits["train"].images.shape[1:]
        return (c, h + 2 * self.shift, w + 2 * self.shift)

    def size(self, split: str) -> int:
        self._split(split)
        return len(self.splits["train"]) if split == "train" else len(self.recipes[split])

    def render(self, split: str, recipe: PairRecipe) -> tuple[Tensor, MultiDigitTarget]:
        """Overlays and targets of the pairs of ``recipe``, whose indices point into ``split``'s digits.

        Shape:
            returns ``(B, C, S, S)`` overlays and a :class:`MultiDigitTarget` (``(B, 2)``, ``(B, 2, C, S, S)``).
        """
        digits = self._split(split)
        return render_pairs(digits.images, digits.labels, recipe, shift=self.shift, combine=self.combine)

    def train_batch(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, MultiDigitTarget]:
        """Fresh pairs whose bases are the training digits at ``index``; partners and shifts from ``generator``.

        Shape:
            index: ``(B,)``; returns ``(B, C, S, S)`` overlays and a :class:`MultiDigitTarget`.
        """
        recipe = sample_pairs(self.by_class, index, generator, shift=self.shift)
        return self.render("train", recipe)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, MultiDigitTarget]]:
        """Yield the fixed pairs of ``split`` in order, ``batch_size`` at a time.

        Shape:
            yields ``(b, C, S, S)`` overlays and a :class:`MultiDigitTarget` with ``b <= batch_size``.
        """
        self._split(split)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        recipe = self.recipes[split]
        for start in range(0, len(recipe), batch_size):
            yield self.render(split, recipe.take(slice(start, start + batch_size)))


def fixed_pairs(labels: Tensor, n_pairs: int, seed: int, *, shift: int = 4) -> PairRecipe:
    """A reproducible set of ``n_pairs`` pairs: bases cycle through the split's digits in order.

    Shape:
        labels: ``(N,)``; returns a :class:`PairRecipe` of ``n_pairs`` pairs.
    """
    if n_pairs < 0:
        raise ValueError(f"the number of pairs must be >= 0, got {n_pairs}")
    if labels.shape[0] == 0:
        raise ValueError("cannot build pairs from a split with no digits")
    bases = torch.arange(n_pairs) % labels.shape[0]
    return sample_pairs(labels, bases, torch.Generator().manual_seed(seed), shift=shift)


@register_dataset("multimnist")
def multimnist_data(
    root,
    *,
    download: bool = False,
    seed: int = 0,
    source: str = "mnist",
    shift: int = 4,
    combine: str = "sum",
    val_pairs: Optional[int] = None,
    test_pairs: int = 10_000,
    pairs_seed: int = 0,
    **source_options,
) -> MultiMNISTData:
    """MultiMNIST built from the digits of the registered dataset ``source`` (MNIST by default).

    ``source_options`` go to the source's builder (MNIST: ``val_size``, ``limit_train``,
    ``limit_eval``; ``source="synthetic"`` gives a file-free smoke dataset). Validation
    pairs come from the validation digits (held out of the training file), test pairs from
    the test digits: ``val_pairs`` (default: one per validation digit) and ``test_pairs``
    (default 10,000; the paper uses 10M), fixed by ``pairs_seed``.

    Shape:
        batches: overlays ``(B, C, h + 2 shift, h + 2 shift)`` (MNIST: ``(B, 1, 36, 36)``) and a
        :class:`MultiDigitTarget` (classes ``(B, 2)``, digits ``(B, 2, C, 36, 36)``).
    """
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    base = load_dataset(source, root, download=download, seed=seed, **source_options)
    digits = dict(base.splits)
    val_n = len(digits["val"]) if val_pairs is None else val_pairs
    counts = {"train": len(digits["train"]), "val": val_n, "test": test_pairs}
    recipes = {
        split: fixed_pairs(digits[split].labels, n, pairs_seed * 3 + k, shift=shift)
        for k, (split, n) in enumerate(counts.items())
    }
    return MultiMNISTData(digits=digits, recipes=recipes, num_classes=base.num_classes, shift=shift, combine=combine)

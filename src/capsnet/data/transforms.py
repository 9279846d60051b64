"""Batched tensor transforms (no per-sample Python loops) and the train/validation split."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "efficient_capsnet_augment",
    "erase",
    "random_erase",
    "random_rotation",
    "random_shift",
    "random_shift_within_margins",
    "random_squeeze",
    "rotate",
    "squeeze_horizontally",
    "to_float",
    "train_val_split",
    "translate",
]


def to_float(images: Tensor) -> Tensor:
    """uint8 pixels to floats in [0, 1]; floating images pass through unchanged."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by an independent random offset in ``[-max_shift, max_shift]`` per axis, filling with zeros.

    The paper's only MNIST augmentation (Sabour et al. 2017, Sec. 5: "shifted by up to
    2 pixels in each direction with zero padding").

    Shape:
        images: ``(B, C, H, W)``; returns the same shape and dtype.
    """
    if images.dim() != 4:
        raise ValueError(f"random_shift expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0 or images.shape[0] == 0:
        return images
    b, c, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=generator).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def train_val_split(n: int, val_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed, seeded split of ``range(n)`` into sorted train and validation indices."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must lie in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


# --------------------------------------------------------------------------- Efficient-CapsNet augmentation
#
# Mazzia, Salvetti & Chiaberge 2021 train on MNIST with random rotations, shifts within the
# digit's margins, horizontal squeezes ("squish") and a random erased patch. The paper names
# the four; the ranges below are those of the authors' published pipeline
# (github.com/EscVM/Efficient-CapsNet, utils/pre_process_mnist.py), cited per number. Every
# draw comes from the caller's generator (one batched draw per quantity, in a fixed order), so
# a run resumed from a checkpoint replays the same images bit for bit.

#: Spread of the authors' draws: each amount is ``|N(0, 0.33)|`` (or ``N(0, 0.33)``), clipped
#: to below 1, times the range (pre_process_mnist.py: ``tf.random.normal([2], 0, .33)``).
EFFICIENT_SPREAD = 0.33
#: Clip of those draws: strictly below 1, so ``floor(a * (1 + margin)) <= margin`` (ibid.: ``.9999``).
_BELOW_ONE = 0.9999


def _clipped_normal(shape: tuple[int, ...], spread: float, generator: Optional[torch.Generator]) -> Tensor:
    """``N(0, spread)`` clipped to ``(-1, 1)``: the authors' random amounts, on the CPU."""
    return (torch.randn(shape, generator=generator) * spread).clamp_(-_BELOW_ONE, _BELOW_ONE)


def _check_float_images(images: Tensor, name: str) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{name} expects float (B, C, H, W) images, got shape {tuple(images.shape)} and dtype {images.dtype}")


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image counter-clockwise by ``degrees[b]`` about its centre (bilinear, zero fill).

    Shape:
        images: ``(B, C, H, W)`` floats; degrees: ``(B,)``; returns ``(B, C, H, W)``.
    """
    _check_float_images(images, "rotate")
    if degrees.shape != images.shape[:1]:
        raise ValueError(f"rotate needs one angle per image, got degrees of shape {tuple(degrees.shape)} for {images.shape[0]} images")
    h, w = images.shape[2:]
    radians = torch.deg2rad(degrees.to(device=images.device, dtype=images.dtype))
    cos, sin = torch.cos(radians), torch.sin(radians)
    # affine_grid maps output to input in coordinates normalised per axis; with y pointing down a
    # counter-clockwise turn by t sends input p to R p, R = [[cos, sin], [-sin, cos]], so the
    # output samples R^-1 q, rescaled by the aspect ratio for non-square images.
    theta = torch.stack(
        [torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], dim=1), torch.stack([sin * w / h, cos, torch.zeros_like(cos)], dim=1)],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(
    images: Tensor, max_degrees: float, generator: Optional[torch.Generator] = None, *, p: float = 0.5, spread: float = EFFICIENT_SPREAD
) -> Tensor:
    """With probability ``p`` rotate each image by ``max_degrees * clip(N(0, spread), -1, 1)`` degrees.

    Authors' code: ``max_degrees`` 30, ``p`` 0.5 (rotated when a second normal draw is <= 0),
    ``spread`` 0.33. They rotate with OpenCV about pixel (14, 14) by a whole number of degrees;
    here the rotation is about the true centre by the exact angle (our choice). Images that are
    not rotated come back bit-identical. ``max_degrees=0`` or ``p=0`` returns ``images``.

    Shape:
        images: ``(B, C, H, W)`` floats; returns the same shape.
    """
    _check_float_images(images, "random_rotation")
    if not (max_degrees >= 0 and 0 <= p <= 1 and spread >= 0):
        raise ValueError(f"random_rotation needs max_degrees >= 0, 0 <= p <= 1 and spread >= 0, got {max_degrees}, {p}, {spread}")
    if max_degrees == 0 or p == 0 or images.shape[0] == 0:
        return images
    b = images.shape[0]
    degrees = _clipped_normal((b,), spread, generator) * max_degrees  # (B,)
    turn = (torch.rand(b, generator=generator) < p).to(images.device)  # (B,)
    return torch.where(turn[:, None, None, None], rotate(images, degrees), images)


def _margins(ink: Tensor) -> tuple[Tensor, Tensor]:
    """Empty lines before the first and after the last inked one, per row of ``ink`` (B, L); 0, 0 when blank."""
    ink = ink.to(torch.uint8)
    return ink.argmax(dim=1), ink.flip(1).argmax(dim=1)  # argmax finds the first 1, or 0 when there is none


def translate(images: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Move image ``b`` down by ``dy[b]`` and right by ``dx[b]`` whole pixels, filling with zeros.

    Shape:
        images: ``(B, C, H, W)``; dy, dx: ``(B,)`` integers; returns ``(B, C, H, W)``.
    """
    if images.dim() != 4 or dy.shape != images.shape[:1] or dx.shape != images.shape[:1]:
        raise ValueError(f"translate needs (B, C, H, W) images and (B,) offsets, got {tuple(images.shape)}, {tuple(dy.shape)}, {tuple(dx.shape)}")
    b, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device) - dy.to(device)[:, None]  # (B, H) source row of each output row
    cols = torch.arange(w, device=device) - dx.to(device)[:, None]  # (B, W)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    moved = images[batch, chan, rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
    return torch.where(inside[:, None], moved, torch.zeros((), dtype=images.dtype, device=device))


def random_shift_within_margins(images: Tensor, generator: Optional[torch.Generator] = None, *, spread: float = EFFICIENT_SPREAD) -> Tensor:
    """Shift each image by whole pixels that never push ink out of the frame.

    Per axis (authors' code, ``image_shift_rand``): an amount ``a = min(|N(0, spread)|, 0.9999)``
    and a direction, either with probability 1/2: right (down) by ``floor(a * (1 + m))`` pixels,
    ``m`` the empty columns (rows) right of (below) the ink, or left (up) by ``ceil(a * m)``
    with ``m`` those on the other side (the authors' ``floor(-a * m)``). Since ``a < 1`` no ink
    leaves the frame. ``spread=0`` returns ``images``; blank images are not moved.

    Shape:
        images: ``(B, C, H, W)`` floats; returns the same shape.
    """
    _check_float_images(images, "random_shift_within_margins")
    if spread < 0:
        raise ValueError(f"random_shift_within_margins needs spread >= 0, got {spread}")
    if spread == 0 or images.shape[0] == 0:
        return images
    b = images.shape[0]
    ink = (images != 0).any(dim=1).cpu()  # (B, H, W)
    left, right = _margins(ink.any(dim=1))  # (B,) empty columns
    top, bottom = _margins(ink.any(dim=2))  # (B,) empty rows
    amount = _clipped_normal((b, 2), spread, generator).abs_()  # (B, 2): x, y
    forward = torch.rand(b, 2, generator=generator) < 0.5  # (B, 2): right / down
    dx = torch.where(forward[:, 0], torch.floor(amount[:, 0] * (right + 1)), torch.floor(-amount[:, 0] * left)).long()
    dy = torch.where(forward[:, 1], torch.floor(amount[:, 1] * (bottom + 1)), torch.floor(-amount[:, 1] * top)).long()
    return translate(images, dy, dx)


def squeeze_horizontally(images: Tensor, width: Tensor, offset: Tensor) -> Tensor:
    """Resize image ``b`` to ``width[b]`` columns (area averaging) and place it ``offset[b]`` columns from the left.

    Each output column averages the input columns it covers, weighted by overlap, so every
    row keeps its ink times ``width / W``; a width of ``W`` at offset 0 is the identity, exactly.

    Shape:
        images: ``(B, C, H, W)`` floats; width, offset: ``(B,)`` integers with
        ``1 <= width`` and ``offset + width <= W``; returns ``(B, C, H, W)``.
    """
    _check_float_images(images, "squeeze_horizontally")
    w = images.shape[3]
    if width.shape != images.shape[:1] or offset.shape != images.shape[:1]:
        raise ValueError(f"squeeze_horizontally needs (B,) widths and offsets, got {tuple(width.shape)} and {tuple(offset.shape)} for {images.shape[0]} images")
    if images.shape[0] and (int(width.min()) < 1 or int(offset.min()) < 0 or int((offset + width).max()) > w):
        raise ValueError(f"squeeze_horizontally needs 1 <= width and 0 <= offset, offset + width <= {w}; got widths {width.tolist()} offsets {offset.tolist()}")
    dtype, device = images.dtype, images.device
    scale = (w / width.to(device=device, dtype=dtype))[:, None, None]  # (B, 1, 1) input columns per output column
    out = torch.arange(w, device=device, dtype=dtype)[None, :, None] - offset.to(device=device, dtype=dtype)[:, None, None]  # (B, W, 1)
    low, high = out * scale, (out + 1) * scale  # (B, W, 1) span of input each output column covers
    src = torch.arange(w, device=device, dtype=dtype)  # (W,) left edge of each input column
    weights = (torch.minimum(high, src + 1) - torch.maximum(low, src)).clamp_(min=0) / scale  # (B, W_out, W_in)
    return torch.einsum("boi,bchi->bcho", weights, images)


def random_squeeze(
    images: Tensor, generator: Optional[torch.Generator] = None, *, max_fraction: float = 0.25, spread: float = EFFICIENT_SPREAD
) -> Tensor:
    """Squeeze each image horizontally by ``1 + floor(a * max_fraction * W)`` columns, ``a = min(|N(0, spread)|, 0.9999)``.

    Authors' code (``image_squish_random``): ``max_fraction`` 1/4 (1 to 7 columns of 28), the
    squeezed image shifted right by half the columns removed, plus one more when a second
    amount is >= 1/2. They resize with Lanczos-3; here by area averaging (our choice: torch
    only, every output a weighted mean of the input). ``max_fraction=0`` returns ``images``.

    Shape:
        images: ``(B, C, H, W)`` floats; returns the same shape.
    """
    _check_float_images(images, "random_squeeze")
    if not (0 <= max_fraction < 1 and spread >= 0):
        raise ValueError(f"random_squeeze needs 0 <= max_fraction < 1 and spread >= 0, got {max_fraction} and {spread}")
    if max_fraction == 0 or images.shape[0] == 0:
        return images
    b, w = images.shape[0], images.shape[3]
    amount = _clipped_normal((b, 2), spread, generator).abs_()  # (B, 2)
    removed = torch.floor(amount[:, 0] * (max_fraction * w) + 1).long().clamp_(max=w - 1)  # (B,) columns squeezed out
    offset = removed // 2 + torch.floor(amount[:, 1] * 2).long()  # (B,) never past `removed`
    return squeeze_horizontally(images, w - removed, offset)


def erase(images: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Zero the ``size x size`` patch with corner ``(top[b], left[b])`` in every channel of image ``b``.

    Shape:
        images: ``(B, C, H, W)``; top, left: ``(B,)`` integers; returns ``(B, C, H, W)``.
    """
    if images.dim() != 4 or top.shape != images.shape[:1] or left.shape != images.shape[:1]:
        raise ValueError(f"erase needs (B, C, H, W) images and (B,) corners, got {tuple(images.shape)}, {tuple(top.shape)}, {tuple(left.shape)}")
    h, w = images.shape[2:]
    device = images.device
    rows = torch.arange(h, device=device) - top.to(device)[:, None]  # (B, H) row within the patch
    cols = torch.arange(w, device=device) - left.to(device)[:, None]  # (B, W)
    patch = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]  # (B, H, W)
    return torch.where(patch[:, None], torch.zeros((), dtype=images.dtype, device=device), images)


def random_erase(
    images: Tensor, generator: Optional[torch.Generator] = None, *, size: int = 4, margins: tuple[int, int] = (4, 2)
) -> Tensor:
    """Zero one ``size x size`` patch per image, its corner uniform over the positions ``margins`` leave.

    Authors' code (``image_erase_random``): a 4 x 4 patch whose top-left corner is uniform over
    rows and columns 4..22 of 28, i.e. at least ``margins = (4, 2)`` pixels from the top / left
    and the bottom / right edge. ``size=0`` returns ``images``.

    Shape:
        images: ``(B, C, H, W)``; returns the same shape.
    """
    if images.dim() != 4:
        raise ValueError(f"random_erase expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    h, w = images.shape[2:]
    lead, trail = margins
    if size < 0 or lead < 0 or trail < 0 or lead + size + trail > min(h, w):
        raise ValueError(f"random_erase needs size >= 0 and margins >= 0 that fit in {h} x {w}, got size={size} margins={margins}")
    if size == 0 or images.shape[0] == 0:
        return images
    b = images.shape[0]
    top = torch.randint(lead, h - size - trail + 1, (b,), generator=generator)
    left = torch.randint(lead, w - size - trail + 1, (b,), generator=generator)
    return erase(images, top, left, size)


def efficient_capsnet_augment(
    images: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    max_degrees: float = 30.0,
    rotate_p: float = 0.5,
    shift_spread: float = EFFICIENT_SPREAD,
    squeeze_fraction: float = 0.25,
    erase_size: int = 4,
) -> Tensor:
    """The Efficient-CapsNet MNIST augmentation: rotate, shift within the margins, squeeze, erase.

    In the authors' order (``generate_tf_data``), each piece with the authors' ranges (see
    :func:`random_rotation`, :func:`random_shift_within_margins`, :func:`random_squeeze`,
    :func:`random_erase`); a zero range turns its piece off, all zero is the identity.

    Shape:
        images: ``(B, C, H, W)`` floats; returns the same shape.
    """
    images = random_rotation(images, max_degrees, generator, p=rotate_p)
    images = random_shift_within_margins(images, generator, spread=shift_spread)
    images = random_squeeze(images, generator, max_fraction=squeeze_fraction)
    return random_erase(images, generator, size=erase_size)

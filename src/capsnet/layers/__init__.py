"""Reusable capsule layers; assembled models live in :mod:`capsnet.models`."""

from ..ops.conv import Conv2d
from .decoder import CapsuleDecoder, mask_poses
from .dense import DenseCaps
from .primary import PrimaryCaps

__all__ = ["CapsuleDecoder", "Conv2d", "DenseCaps", "PrimaryCaps", "mask_poses"]

"""Reusable capsule layers; assembled models live in :mod:`capsnet.models`."""

from .decoder import CapsuleDecoder, mask_poses
from .dense import DenseCaps
from .primary import PrimaryCaps

__all__ = ["CapsuleDecoder", "DenseCaps", "PrimaryCaps", "mask_poses"]

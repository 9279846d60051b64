"""Reusable capsule layers; assembled models live in :mod:`capsnet.models`."""

import sys

from ..ops import conv as _conv
from ..ops.conv import Conv2d
from .decoder import CapsuleDecoder, mask_poses
from .dense import DenseCaps
from .primary import PrimaryCaps

# The convolution's old path, ``capsnet.layers.conv`` (``models/em.py`` imports it): the same
# module object as ``capsnet.ops.conv``. Goes when nothing imports the old path any more.
sys.modules.setdefault(f"{__name__}.conv", _conv)

__all__ = ["CapsuleDecoder", "Conv2d", "DenseCaps", "PrimaryCaps", "mask_poses"]

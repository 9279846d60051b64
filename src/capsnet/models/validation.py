"""The models' boundary checks; they live in :mod:`capsnet.validation`, shared with the layers."""

from ..validation import check_images, check_labels

__all__ = ["check_images", "check_labels"]

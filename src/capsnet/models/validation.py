"""Old path of the models' boundary checks (:mod:`capsnet.validation`, :mod:`capsnet.models.registry`).

``models/em.py`` and ``train/config.py`` import it; it goes when they name the homes.
"""

from ..validation import check_images, check_labels
from .registry import check_model_kwargs

__all__ = ["check_images", "check_labels", "check_model_kwargs"]

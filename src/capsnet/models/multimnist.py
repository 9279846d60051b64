"""The MultiMNIST CapsNet (Sabour et al. 2017, Sec. 6): each digit reconstructed through its own mask.

Same network as on MNIST, on 36x36 input: 10 x 10 x 32 = 3,200 primary capsules and
11,361,808 parameters (the paper's 11.36M). Each digit is reconstructed separately, the
decoder seeing only that digit's capsule: in training the capsules of the true classes,
at test time the two longest capsules.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..validation import check_images, check_labels
from .capsnet import CapsNet
from .registry import register_model

__all__ = ["MultiCapsNetOutput", "MultiDigitCapsNet", "capsnet_multimnist", "check_label_sets"]


class MultiCapsNetOutput(NamedTuple):
    """A :class:`~capsnet.models.CapsNetOutput` with one reconstruction per masked capsule.

    lengths ``(B, J)``, poses ``(B, J, D)``, coupling ``(B, I, J)``, primary ``(B, I, in_dim)``:
    as in ``CapsNetOutput``.
    reconstruction: ``(B, C, H, W)`` the reconstructions overlaid (summed, clipped to 1, as
    MultiMNIST combines digits), so single-image consumers (figures, plain margin loss) work.
    reconstructions: ``(B, K, C, H, W)`` one image per masked capsule, or None without a decoder.
    masks: ``(B, K)`` the class whose capsule produced each reconstruction, or None.
    """

    lengths: Tensor
    poses: Tensor
    reconstruction: Optional[Tensor]
    coupling: Tensor
    primary: Tensor
    reconstructions: Optional[Tensor]
    masks: Optional[Tensor]


def check_label_sets(y: Tensor, batch: int, num_classes: int, *, name: str = "labels") -> None:
    """Raise ``ValueError`` unless ``y`` is ``(batch, K)`` integer classes in ``[0, num_classes)``.

    Shape:
        y: ``(batch, K)``.
    """
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() != 2 or y.shape[0] != batch or y.shape[1] < 1:
        raise ValueError(f"{name} must have shape ({batch}, K) with K >= 1, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} must lie in [0, {num_classes - 1}], got min {int(y.min())} max {int(y.max())}")


class MultiDigitCapsNet(CapsNet):
    """CapsNet whose decoder runs once per digit, each time masked to a single class capsule.

    ``num_digits`` is how many of the longest capsules are reconstructed when no labels
    are given (2 for MultiMNIST). Other keywords: :class:`CapsNet`'s.

    Shape:
        x: ``(B, in_channels, image_size, image_size)``; y: ``(B, K)`` classes (one
        reconstruction each), ``(B,)`` (one reconstruction) or None (the ``num_digits``
        longest capsules, longest first).
    """

    def __init__(self, *, num_digits: int = 2, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= num_digits <= self.num_classes:
            raise ValueError(f"num_digits must lie in [1, {self.num_classes}], got {num_digits}")
        self.num_digits = num_digits

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> MultiCapsNetOutput:
        check_images(x, self.in_channels, (self.image_size, self.image_size), dtype=self.conv1.weight.dtype)
        if y is not None:
            if isinstance(y, Tensor) and y.dim() == 1:
                check_labels(y, x.shape[0], self.num_classes)
                y = y[:, None]
            check_label_sets(y, x.shape[0], self.num_classes)
        u, routed, lengths = self.encode(x)
        reconstruction = reconstructions = masks = None
        if self.decoder is not None:
            # True classes in training, the longest capsules otherwise (Sec. 4.1 and 6).
            masks = y.long() if y is not None else lengths.topk(self.num_digits, dim=1).indices  # (B, K)
            b, k = masks.shape
            poses = routed.poses[:, None].expand(b, k, *routed.poses.shape[1:])  # (B, K, J, D), a view
            flat = self.decoder(poses.reshape(b * k, *routed.poses.shape[1:]), masks.reshape(-1))
            reconstructions = flat.view(b, k, *flat.shape[1:])  # (B, K, C, H, W)
            reconstruction = reconstructions.sum(dim=1).clamp(max=1.0)
        return MultiCapsNetOutput(lengths, routed.poses, reconstruction, routed.coupling, u, reconstructions, masks)


@register_model
def capsnet_multimnist(**overrides) -> MultiDigitCapsNet:
    """The paper's MultiMNIST CapsNet: the MNIST CapsNet on 36x36 input, 11,361,808 parameters."""
    kwargs = dict(image_size=36)
    kwargs.update(overrides)
    return MultiDigitCapsNet(**kwargs)

"""Masked reconstruction decoder of Sabour et al. 2017, Sec. 4.1."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..validation import check_dtype, check_labels

__all__ = ["CapsuleDecoder", "mask_poses"]


def mask_poses(poses: Tensor, labels: Tensor) -> Tensor:
    """Zero every capsule but the one named by ``labels`` and flatten.

    Shape:
        poses: ``(B, J, D)``; labels: ``(B,)`` integers in ``[0, J)``; returns ``(B, J * D)``.
    """
    if poses.dim() != 3:
        raise ValueError(f"poses must have shape (B, J, D), got {tuple(poses.shape)}")
    check_labels(labels, poses.shape[0], poses.shape[1])
    # The labels are checked: a comparison makes the (B, J) mask without one_hot's second range check.
    mask = labels.unsqueeze(1) == torch.arange(poses.shape[1], device=labels.device)
    return (poses * mask.unsqueeze(-1).to(poses.dtype)).flatten(1)


class CapsuleDecoder(nn.Module):
    """FC 512 ReLU -> FC 1024 ReLU -> FC pixels sigmoid, fed the masked class capsules.

    Shape:
        poses: ``(B, J, D)``; labels: ``(B,)``; returns ``(B, *image_shape)``.
    """

    def __init__(self, num_caps: int, caps_dim: int, image_shape: tuple[int, ...], *, hidden: tuple[int, ...] = (512, 1024)):
        super().__init__()
        self.image_shape, hidden = tuple(image_shape), tuple(hidden)
        if min(num_caps, caps_dim, *self.image_shape, *hidden) < 1:
            raise ValueError(
                f"CapsuleDecoder sizes must be positive, got num_caps={num_caps} caps_dim={caps_dim} "
                f"image_shape={self.image_shape} hidden={hidden}"
            )
        self.num_caps, self.caps_dim = num_caps, caps_dim
        sizes = [num_caps * caps_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], math.prod(self.image_shape)), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, poses: Tensor, labels: Tensor) -> Tensor:
        if poses.dim() != 3 or poses.shape[1:] != (self.num_caps, self.caps_dim):
            raise ValueError(
                f"CapsuleDecoder expects poses of shape (B, {self.num_caps}, {self.caps_dim}), got {tuple(poses.shape)}"
            )
        check_dtype(poses, self.net[0].weight.dtype, name="CapsuleDecoder poses")
        out = self.net(mask_poses(poses, labels))
        return out.view(poses.shape[0], *self.image_shape)

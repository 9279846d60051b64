"""Masked reconstruction decoder of Sabour et al. 2017, Sec. 4.1."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["CapsuleDecoder", "mask_poses"]


def mask_poses(poses: Tensor, labels: Tensor) -> Tensor:
    """Zero every capsule but the one named by ``labels`` and flatten.

    Shape:
        poses: ``(B, J, D)``; labels: ``(B,)`` integers in ``[0, J)``; returns ``(B, J * D)``.
    """
    mask = torch.nn.functional.one_hot(labels.long(), poses.shape[1]).to(poses.dtype)
    return (poses * mask.unsqueeze(-1)).flatten(1)


class CapsuleDecoder(nn.Module):
    """FC 512 ReLU -> FC 1024 ReLU -> FC pixels sigmoid, fed the masked class capsules.

    Shape:
        poses: ``(B, J, D)``; labels: ``(B,)``; returns ``(B, *image_shape)``.
    """

    def __init__(self, num_caps: int, caps_dim: int, image_shape: tuple[int, ...], *, hidden: tuple[int, ...] = (512, 1024)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        sizes = [num_caps * caps_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], math.prod(self.image_shape)), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, poses: Tensor, labels: Tensor) -> Tensor:
        out = self.net(mask_poses(poses, labels))
        return out.view(poses.shape[0], *self.image_shape)

"""Primary capsule layer of Sabour et al. 2017: a convolution cut into capsules."""

from __future__ import annotations

from typing import Optional

from einops import rearrange
from torch import Tensor, nn

from .._shapes import conv_output_size
from ..functional import squash
from ..ops.conv import Conv2d
from ..validation import check_dtype

__all__ = ["PrimaryCaps"]


class PrimaryCaps(nn.Module):
    """Convolution with ``types * dim`` channels, regrouped into ``dim``-D capsules and squashed.

    The MNIST model: 256 -> 32 types of 8-D capsules, 9x9 kernel, stride 2, giving
    6 x 6 x 32 = 1152 capsules. Capsules are ordered type-major: index ``(t, h, w)``.

    Shape:
        x: ``(B, C, H, W)``; returns ``(B, I, D)`` with ``I = types * H' * W'``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        types: int = 32,
        dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        weight_grad: Optional[str] = None,
        algorithm: Optional[str] = None,
    ):
        super().__init__()
        if min(in_channels, types, dim, kernel_size, stride) < 1:
            raise ValueError(
                f"PrimaryCaps sizes must be positive, got in_channels={in_channels} types={types} dim={dim} "
                f"kernel_size={kernel_size} stride={stride}"
            )
        self.types, self.dim = types, dim
        self.conv = Conv2d(in_channels, types * dim, kernel_size, stride=stride, weight_grad=weight_grad, algorithm=algorithm)

    def output_size(self, size: int) -> int:
        """Spatial side of the capsule grid for an input of side ``size``."""
        return conv_output_size(size, self.conv.kernel_size[0], self.conv.stride[0])

    def forward(self, x: Tensor) -> Tensor:
        channels, (kh, kw) = self.conv.in_channels, self.conv.kernel_size
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] < kh or x.shape[3] < kw:
            raise ValueError(
                f"PrimaryCaps expects feature maps of shape (B, {channels}, H >= {kh}, W >= {kw}), got {tuple(x.shape)}"
            )
        check_dtype(x, self.conv.weight.dtype, name="PrimaryCaps input")
        u = rearrange(self.conv(x), "b (t d) h w -> b (t h w) d", t=self.types, d=self.dim)
        return squash(u, dim=-1)

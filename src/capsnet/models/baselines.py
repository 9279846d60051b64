"""The baseline CNNs that Sabour et al. 2017 compare CapsNet against.

- ``cnn_mnist`` (Sec. 5): conv 256, 256, 128 channels, 5x5, stride 1, SAME padding, no
  pooling -> FC 328 -> FC 192 -> dropout -> FC 10, softmax cross-entropy: 35,445,522
  parameters (the paper's 35.4M; only SAME padding without pooling gives that count).
- ``cnn_multimnist`` (Sec. 6): conv 512 9x9 -> 2x2 max-pool -> conv 256 5x5 -> 2x2 max-pool
  -> FC 1024 -> 10 sigmoid outputs (sigmoid cross-entropy): 24,563,978 parameters with
  SAME padding (the paper's 24.56M). The official code uses 5x5 for the first convolution
  too (``kernels=(5, 5)``: 24,535,306) and no dropout.
- ``cnn_affine`` (Sec. 5.2, affNIST): the paper only says a CNN with max-pooling and
  dropout and a similar number of parameters; it gives no architecture.
  Ours: the MNIST baseline's layers with a 2x2 max-pool after each of the first two
  convolutions, on 40x40 expanded MNIST: 6,728,466 parameters, within 1.2% of
  ``capsnet_mnist`` *without* its decoder (6,804,224; the decoder only regularises
  training, it takes no part in classification). The CapsNet of that experiment, on
  40x40 input, is larger: 13,475,648 parameters (11,227,904 without the decoder).

Every layer is followed by ReLU except the last; dropout (p = 0.5, the paper gives no
rate) sits before the last layer where the paper names it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from torch import Tensor, nn

from ..validation import check_images
from .registry import register_model

__all__ = ["BaselineCNN", "CNNOutput", "cnn_affine", "cnn_mnist", "cnn_multimnist"]


class CNNOutput(NamedTuple):
    """logits: ``(B, num_classes)`` class scores before softmax / sigmoid."""

    logits: Tensor


class BaselineCNN(nn.Module):
    """ReLU convolutions (SAME padding, optional 2x2 max-pool after each) -> ReLU FC layers -> dropout -> FC.

    Shape:
        x: ``(B, in_channels, image_size, image_size)``; y is accepted and ignored (the
        training loop passes labels to every model); returns :class:`CNNOutput`.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: Sequence[int] = (256, 256, 128),
        kernels: Sequence[int] = (5, 5, 5),
        pool: Sequence[bool] = (False, False, False),
        hidden: Sequence[int] = (328, 192),
        dropout: float = 0.5,
    ):
        super().__init__()
        channels, kernels, pool, hidden = tuple(channels), tuple(kernels), tuple(pool), tuple(hidden)
        if not len(channels) == len(kernels) == len(pool):
            raise ValueError(
                f"channels, kernels and pool need one entry per convolution, got {len(channels)}, {len(kernels)} and {len(pool)}"
            )
        if any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"SAME padding needs odd kernel sizes, got {kernels}")
        if min((in_channels, image_size, num_classes) + channels + hidden) < 1:
            raise ValueError(
                f"sizes must be positive, got in_channels={in_channels} image_size={image_size} "
                f"num_classes={num_classes} channels={channels} hidden={hidden}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        layers: list[nn.Module] = []
        size, c_in = image_size, in_channels
        for c_out, k, p in zip(channels, kernels, pool):
            layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU(inplace=True)]
            if p:
                if size < 2:
                    raise ValueError(f"image_size {image_size} is too small for {sum(pool)} 2x2 max-pools")
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c_in = c_out
        self.features = nn.Sequential(*layers)
        sizes = [c_in * size * size, *hidden]
        fc: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            fc += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        if dropout:
            fc.append(nn.Dropout(dropout))
        fc.append(nn.Linear(sizes[-1], num_classes))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> CNNOutput:
        check_images(x, self.in_channels, (self.image_size, self.image_size), dtype=self.classifier[-1].weight.dtype)
        return CNNOutput(self.classifier(self.features(x)))


@register_model
def cnn_mnist(**overrides) -> BaselineCNN:
    """The paper's MNIST baseline (Sec. 5): 35,445,522 parameters."""
    return BaselineCNN(**overrides)


@register_model
def cnn_multimnist(**overrides) -> BaselineCNN:
    """The paper's MultiMNIST baseline (Sec. 6), 36x36 input, 10 sigmoid outputs: 24,563,978 parameters."""
    kwargs = dict(image_size=36, channels=(512, 256), kernels=(9, 5), pool=(True, True), hidden=(1024,), dropout=0.0)
    kwargs.update(overrides)
    return BaselineCNN(**kwargs)


@register_model
def cnn_affine(**overrides) -> BaselineCNN:
    """Max-pooling + dropout CNN for the affNIST test (Sec. 5.2), 40x40 input: 6,728,466 parameters."""
    kwargs = dict(image_size=40, pool=(True, True, False))
    kwargs.update(overrides)
    return BaselineCNN(**kwargs)

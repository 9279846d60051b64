"""The dynamic-routing CapsNet of Sabour, Frosst & Hinton 2017 (Fig. 1 and 2)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..layers import CapsuleDecoder, Conv2d, DenseCaps, PrimaryCaps
from ..routing import RoutingResult
from ..validation import check_images, check_labels
from .registry import register_model

__all__ = ["CapsNet", "CapsNetOutput", "capsnet_mnist", "capsnet_tiny"]


class CapsNetOutput(NamedTuple):
    """Everything a forward pass produces.

    lengths: ``(B, J)`` class capsule lengths ``|v_j|`` (the class "probabilities").
    poses: ``(B, J, D)`` class capsules ``v_j``.
    reconstruction: ``(B, C, H, W)`` decoder output, or None without a decoder.
    coupling: ``(B, I, J)`` coupling coefficients of the last routing iteration.
    primary: ``(B, I, in_dim)`` primary capsules ``u_i``.
    """

    lengths: Tensor
    poses: Tensor
    reconstruction: Optional[Tensor]
    coupling: Tensor
    primary: Tensor


class CapsNet(nn.Module):
    """Conv1 -> PrimaryCaps -> DigitCaps (routing) -> masked reconstruction decoder.

    Keyword-only hyper-parameters default to the paper's MNIST model. How Conv1 and
    PrimaryCaps convolve on the CPU is a setting of the process, ``capsnet.backends.conv``
    (``algorithm``: ``"auto"`` takes the DFT algorithm of :mod:`capsnet.ops.dft` for
    PrimaryCaps at batches of 25 or more, ``"direct"`` PyTorch's; ``weight_grad``), not of
    the model: it changes speed, not results (beyond rounding). ``conv_weight_grad`` and
    ``conv_algorithm`` pin one model's layers to a choice (None: follow the backend); they
    stay accepted for configs and checkpoints that name them.

    Shape:
        x: ``(B, in_channels, image_size, image_size)`` floats; y: ``(B,)`` labels or None.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        conv_channels: int = 256,
        conv_kernel: int = 9,
        primary_types: int = 32,
        primary_dim: int = 8,
        primary_kernel: int = 9,
        primary_stride: int = 2,
        class_dim: int = 16,
        routing_iterations: int = 3,
        detach_intermediate: bool = False,
        leaky_routing: bool = False,
        class_bias: bool = False,
        decoder: bool = True,
        decoder_hidden: tuple[int, ...] = (512, 1024),
        conv_weight_grad: Optional[str] = None,
        conv_algorithm: Optional[str] = None,
    ):
        super().__init__()
        sizes = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, conv_channels=conv_channels,
            conv_kernel=conv_kernel, primary_types=primary_types, primary_dim=primary_dim, primary_kernel=primary_kernel,
            primary_stride=primary_stride, class_dim=class_dim, routing_iterations=routing_iterations,
        )
        bad = [f"{key!r}={value}" for key, value in sizes.items() if value < 1]
        if any(h < 1 for h in decoder_hidden):
            bad.append(f"'decoder_hidden'={tuple(decoder_hidden)} (every entry)")
        if bad:  # before any layer: nn.Conv2d / nn.Linear would crash or build a model that cannot run
            raise ValueError(f"CapsNet sizes must be positive (>= 1), got {', '.join(bad)}; fix these keyword arguments")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.conv1 = Conv2d(in_channels, conv_channels, conv_kernel, weight_grad=conv_weight_grad, algorithm=conv_algorithm)
        self.primary = PrimaryCaps(
            conv_channels,
            types=primary_types,
            dim=primary_dim,
            kernel_size=primary_kernel,
            stride=primary_stride,
            weight_grad=conv_weight_grad,
            algorithm=conv_algorithm,
        )
        grid = self.primary.output_size(image_size - conv_kernel + 1)
        if grid < 1:
            raise ValueError(f"image_size {image_size} is too small for conv kernel {conv_kernel} and primary kernel {primary_kernel}")
        self.num_primary = primary_types * grid * grid
        self.digits = DenseCaps(
            self.num_primary,
            primary_dim,
            num_classes,
            class_dim,
            iterations=routing_iterations,
            detach_intermediate=detach_intermediate,
            leaky=leaky_routing,
            bias=class_bias,
        )
        self.decoder = (
            CapsuleDecoder(num_classes, class_dim, (in_channels, image_size, image_size), hidden=decoder_hidden)
            if decoder
            else None
        )

    def reconstruct(self, poses: Tensor, labels: Tensor) -> Tensor:
        """Decode the capsule named by ``labels`` (B,) from ``poses`` (B, J, D)."""
        if self.decoder is None:
            raise ValueError("this CapsNet was built with decoder=False and cannot reconstruct")
        return self.decoder(poses, labels)

    def encode(self, x: Tensor) -> tuple[Tensor, RoutingResult, Tensor]:
        """Primary capsules ``u`` (B, I, in_dim), the routing result and the lengths ``|v_j|`` (B, J)."""
        # In place: the convolution keeps its input, not its output, for the backward, and a
        # fresh (B, 256, 20, 20) tensor costs 8x the ReLU itself in page faults (docs/performance.md).
        u = self.primary(torch.relu_(self.conv1(x)))  # (B, I, 8)
        routed = self.digits(u)  # poses (B, J, 16)
        # Exact |v_j|: safe_norm's eps would floor the tiny lengths of an untrained model at
        # 1e-4 and damp the margin loss's gradient; vector_norm's gradient at 0 is 0, not NaN.
        return u, routed, torch.linalg.vector_norm(routed.poses, dim=-1)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> CapsNetOutput:
        check_images(x, self.in_channels, (self.image_size, self.image_size), dtype=self.conv1.weight.dtype)
        if y is not None:
            check_labels(y, x.shape[0], self.num_classes)
        u, routed, lengths = self.encode(x)
        reconstruction = None
        if self.decoder is not None:
            # Mask with the true class in training, the longest capsule otherwise (Sec. 4.1).
            mask_labels = y if y is not None else lengths.argmax(dim=1)
            reconstruction = self.decoder(routed.poses, mask_labels)
        return CapsNetOutput(lengths, routed.poses, reconstruction, routed.coupling, u)


@register_model
def capsnet_mnist(**overrides) -> CapsNet:
    """The paper's MNIST CapsNet: 8,215,568 parameters (6,804,224 without the decoder)."""
    return CapsNet(**overrides)


@register_model
def capsnet_tiny(**overrides) -> CapsNet:
    """A few-thousand-parameter CapsNet on 28x28 input for fast tests and smoke runs."""
    kwargs = dict(
        conv_channels=16, primary_types=4, primary_dim=4, class_dim=8, decoder_hidden=(32,), conv_kernel=9
    )
    kwargs.update(overrides)
    return CapsNet(**kwargs)

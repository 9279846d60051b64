"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge, "Efficient-CapsNet: capsule network with
self-attention routing", Scientific Reports 11, 14634, 2021), written from the paper.

Conv stem with batch norm -> depthwise primary capsules -> fully connected capsule layer with
self-attention routing (:func:`~capsnet.routing.self_attention_routing`) -> the masked
reconstruction decoder of Sabour et al. 2017. The model is a :class:`~capsnet.models.CapsNet`
to the rest of the library: the same forward (masking by label in training, by the longest
capsule otherwise), the same :class:`~capsnet.models.CapsNetOutput` (``coupling`` holds the
self-attention coefficients ``c_ij``), so the ``margin`` objective, evaluation and figures
work unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._shapes import conv_output_size
from ..functional import SQUASH_KINDS, squash
from ..layers import CapsuleDecoder
from ..routing import RoutingResult, SelfAttentionRoutingResult, self_attention_routing
from ..validation import check_dtype
from .capsnet import CapsNet
from .multimnist import MultiDigitCapsNet
from .registry import register_model

__all__ = [
    "DepthwisePrimaryCaps",
    "EfficientCapsNet",
    "MultiDigitEfficientCapsNet",
    "SelfAttentionCaps",
    "efficient_capsnet_mnist",
    "efficient_capsnet_multimnist",
]


def _running_affine(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Per-channel ``a, b`` with ``norm(x) = a x + b`` in eval (Ioffe & Szegedy 2015, Algorithm 2)."""
    a = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    return a, norm.bias - norm.running_mean * a


def _folded(conv: nn.Conv2d, affine: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Optional[Tensor]]:
    """Weights and bias of ``x -> conv(a x + b)`` for the per-channel ``affine = (a, b)`` (None: ``conv``'s own).

    Exact for an unpadded convolution (every tap reads ``a x + b``): ``W' = W a`` along the input
    channels and ``bias' = bias + sum W b``. Dense (``groups=1``) or depthwise convolutions.
    """
    if affine is None:
        return conv.weight, conv.bias
    if conv.padding != (0, 0) or not (conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels):
        raise ValueError(f"a batch norm folds only into an unpadded dense or depthwise convolution, got {conv}")
    a, b, w = *affine, conv.weight
    if conv.groups == 1:
        folded, shift = w * a.view(1, -1, 1, 1), w.sum((2, 3)) @ b
    else:  # depthwise: output channel c reads input channel c alone
        folded, shift = w * a.view(-1, 1, 1, 1), w.sum((1, 2, 3)) * b
    folded = folded.contiguous(memory_format=torch.channels_last)  # the layout oneDNN computes in
    return folded, shift if conv.bias is None else conv.bias + shift


def _conv_relu(conv: nn.Conv2d, x: Tensor, affine: Optional[tuple[Tensor, Tensor]]) -> Tensor:
    """``relu(conv(a x + b))`` with the affine folded (:func:`_folded`); on CPU in float32 one
    oneDNN primitive with the ReLU as its post-op (the kernel PyTorch's compiler fuses to), so
    the output is not read and written a second time; elsewhere the two steps."""
    w, bias = _folded(conv, affine)
    if (
        _FUSED_CONV_RELU
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and conv.padding_mode == "zeros"
        and not torch.is_grad_enabled()  # oneDNN's fused kernel has no backward
    ):
        return torch.ops.mkldnn._convolution_pointwise(x, w, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "relu", [], "")
    return torch.relu_(F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups))


#: Whether this PyTorch has oneDNN's fused convolution + pointwise operator (CPU builds with mkldnn).
_FUSED_CONV_RELU = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class DepthwisePrimaryCaps(nn.Module):
    """Primary capsules from one depthwise convolution (Mazzia et al. 2021, Methods: primary capsules).

    Each of the ``C`` channels is convolved with its own ``K x K`` kernel; the ``C`` outputs at
    each position are cut into ``C / dim`` capsules of ``dim`` and squashed. On MNIST the kernel
    covers the whole 9 x 9 map: 128 channels become 16 capsules of 8 at one position.

    ``stride`` is the convolution's (the authors' MultiMNIST graph: 5 x 5 at stride 2 on a 6 x 6
    map, again one position).

    Shape:
        x: ``(B, C, H, W)``; returns ``(B, I, dim)`` with ``I = types * H' * W'``, type-major
        (the order :func:`capsnet.viz.coupling_figure` reads).
    """

    def __init__(self, channels: int, *, kernel_size: int = 9, dim: int = 8, stride: int = 1, squash_kind: str = "efficient"):
        super().__init__()
        if min(channels, kernel_size, dim, stride) < 1 or channels % dim:
            raise ValueError(
                f"DepthwisePrimaryCaps needs positive sizes with channels divisible by dim, got channels={channels} "
                f"kernel_size={kernel_size} dim={dim} stride={stride}"
            )
        if squash_kind not in SQUASH_KINDS:
            raise ValueError(f"squash_kind must be one of {SQUASH_KINDS}, got {squash_kind!r}")
        self.types, self.dim, self.kernel_size, self.stride, self.squash_kind = channels // dim, dim, kernel_size, stride, squash_kind
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=stride, groups=channels)  # depthwise: one kernel per channel

    def output_size(self, size: int) -> int:
        return conv_output_size(size, self.kernel_size, self.stride) if size >= self.kernel_size else 0

    def capsules(self, s: Tensor) -> Tensor:
        """Squashed capsules ``(B, I, dim)`` from the convolution's output ``(B, C, H', W')``."""
        return squash(rearrange(s, "b (n d) h w -> b (n h w) d", d=self.dim), dim=-1, kind=self.squash_kind)

    def forward(self, x: Tensor) -> Tensor:
        return self.capsules(self.conv(x))


class SelfAttentionCaps(nn.Module):
    """Fully connected capsule layer with self-attention routing (Mazzia et al. 2021, Methods).

    Votes ``u_hat_{j|i} = u_i W_ij`` from one ``einsum`` with weights that carry no batch axis,
    then :func:`~capsnet.routing.self_attention_routing` with the learned log priors
    ``b_ij`` (``prior``, initialised at 0 as in the paper).

    Args:
        in_caps, in_dim: number ``I`` and dimension of the input capsules.
        out_caps, out_dim: number ``J`` and dimension ``D`` of the output capsules.
        init_std: std of the normal initialisation of ``W``; None is He's ``sqrt(2 / fan_in)`` with
            the fan-in of the authors' ``(J, I, in_dim, D)`` weight, ``J * I * in_dim`` (0.0395 on MNIST).
        squash_kind: see :func:`~capsnet.routing.self_attention_routing`.

    Shape:
        u: ``(B, I, in_dim)``; returns a :class:`~capsnet.routing.SelfAttentionRoutingResult`
        with poses ``(B, J, D)``, coupling and logits ``(B, I, J)``.
    """

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        *,
        init_std: Optional[float] = None,
        squash_kind: str = "efficient",
    ):
        super().__init__()
        if min(in_caps, in_dim, out_caps, out_dim) < 1:
            raise ValueError(
                f"SelfAttentionCaps sizes must be positive, got in_caps={in_caps} in_dim={in_dim} "
                f"out_caps={out_caps} out_dim={out_dim}"
            )
        if init_std is None:
            init_std = math.sqrt(2.0 / (out_caps * in_caps * in_dim))
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"SelfAttentionCaps init_std must be finite and >= 0 or None, got {init_std}")
        if squash_kind not in SQUASH_KINDS:
            raise ValueError(f"squash_kind must be one of {SQUASH_KINDS}, got {squash_kind!r}")
        self.in_caps, self.in_dim, self.squash_kind = in_caps, in_dim, squash_kind
        self.weight = nn.Parameter(torch.randn(in_caps, out_caps, in_dim, out_dim) * init_std)  # W_ij: (I, J, in_dim, D)
        self.prior = nn.Parameter(torch.zeros(in_caps, out_caps))  # log priors b_ij: (I, J)

    def votes(self, u: Tensor) -> Tensor:
        """``u_hat_{j|i} = u_i W_ij``: ``(B, I, in_dim)`` -> ``(B, I, J, D)``."""
        return torch.einsum("bie,ijed->bijd", u, self.weight)

    def forward(self, u: Tensor) -> SelfAttentionRoutingResult:
        if u.dim() != 3 or u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(f"SelfAttentionCaps expects capsules of shape (B, {self.in_caps}, {self.in_dim}), got {tuple(u.shape)}")
        check_dtype(u, self.weight.dtype, name="SelfAttentionCaps input")
        return self_attention_routing(self.votes(u), self.prior, squash_kind=self.squash_kind)


class EfficientCapsNet(CapsNet):
    """Conv stem (conv, ReLU, batch norm) -> depthwise PrimaryCaps -> self-attention class capsules -> decoder.

    Keyword-only hyper-parameters default to the paper's MNIST model: stem convolutions of
    32 (5 x 5), 64 (3 x 3), 64 (3 x 3) and 128 (3 x 3, stride 2) channels, unpadded, each
    followed by ReLU and batch norm; a 9 x 9 depthwise convolution (stride 1) making 16 primary
    capsules of 8; 10 class capsules of 16; the decoder FC 512 -> FC 1024 -> FC 784.

    Shares :class:`~capsnet.models.CapsNet`'s ``forward`` and ``reconstruct`` (so its output
    is a :class:`~capsnet.models.CapsNetOutput`) and replaces ``encode``.

    Shape:
        x: ``(B, in_channels, image_size, image_size)`` floats; y: ``(B,)`` labels or None.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        stem_channels: tuple[int, ...] = (32, 64, 64, 128),
        stem_kernels: tuple[int, ...] = (5, 3, 3, 3),
        stem_strides: tuple[int, ...] = (1, 1, 1, 2),
        primary_kernel: int = 9,
        primary_stride: int = 1,
        primary_dim: int = 8,
        class_dim: int = 16,
        squash_kind: str = "efficient",
        transform_std: Optional[float] = None,
        decoder: bool = True,
        decoder_hidden: tuple[int, ...] = (512, 1024),
    ):
        nn.Module.__init__(self)  # CapsNet's layers are not these; its forward and reconstruct are
        sizes = dict(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, primary_kernel=primary_kernel,
            primary_stride=primary_stride, primary_dim=primary_dim, class_dim=class_dim,
        )
        bad = [f"{key!r}={value}" for key, value in sizes.items() if value < 1]
        for key, values in dict(stem_channels=stem_channels, stem_kernels=stem_kernels, stem_strides=stem_strides, decoder_hidden=decoder_hidden).items():
            if any(v < 1 for v in values) or (key != "decoder_hidden" and not values):
                bad.append(f"{key!r}={tuple(values)} (every entry, at least one)")
        if not len(stem_channels) == len(stem_kernels) == len(stem_strides):
            bad.append(f"stem_channels, stem_kernels and stem_strides of one length each (got {len(stem_channels)}, {len(stem_kernels)}, {len(stem_strides)})")
        if stem_channels and stem_channels[-1] % max(primary_dim, 1):
            bad.append(f"stem_channels[-1]={stem_channels[-1]} divisible by primary_dim={primary_dim}")
        if bad:
            raise ValueError(f"EfficientCapsNet sizes must be positive, got {', '.join(bad)}; fix these keyword arguments")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for out, kernel, stride in zip(stem_channels, stem_kernels, stem_strides):
            layers += [nn.Conv2d(channels, out, kernel, stride=stride), nn.ReLU(inplace=True), nn.BatchNorm2d(out)]
            channels, size = out, conv_output_size(size, kernel, stride)
        self.stem = nn.Sequential(*layers)
        self.primary = DepthwisePrimaryCaps(channels, kernel_size=primary_kernel, dim=primary_dim, stride=primary_stride, squash_kind=squash_kind)
        # Channels-last convolution weights make the stem's convolutions and batch norms run in
        # the layout oneDNN and cuDNN compute in, instead of converting every call (docs/performance.md).
        self.stem.to(memory_format=torch.channels_last)
        self.primary.conv.to(memory_format=torch.channels_last)
        grid = self.primary.output_size(size) if size >= 1 else 0
        if grid < 1:
            raise ValueError(f"image_size {image_size} is too small for the stem {tuple(stem_kernels)} / {tuple(stem_strides)} and primary kernel {primary_kernel} (stride {primary_stride})")
        self.num_primary = self.primary.types * grid * grid
        self.digits = SelfAttentionCaps(self.num_primary, primary_dim, num_classes, class_dim, init_std=transform_std, squash_kind=squash_kind)
        self.decoder = (
            CapsuleDecoder(num_classes, class_dim, (in_channels, image_size, image_size), hidden=decoder_hidden)
            if decoder
            else None
        )

    @property
    def conv1(self) -> nn.Conv2d:
        """The first convolution (CapsNet's ``forward`` reads the model's dtype from it)."""
        return self.stem[0]

    def _can_fold(self, x: Tensor) -> bool:
        """Whether :meth:`features` may fold: inference (no gradient), every stem module in eval,
        no hooks on them (folding skips their forward), float32/64 and no autocast."""
        modules = [*self.stem, self.primary, self.primary.conv]
        hooked = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks or any(
            m._forward_hooks or m._forward_pre_hooks for m in modules
        )
        return (
            not torch.is_grad_enabled()
            and not any(m.training for m in modules)
            and not hooked
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def features(self, x: Tensor) -> Tensor:
        """The depthwise primary convolution of the stem's output, ``(B, C, H', W')`` before squashing.

        In inference (eval, no gradient), every batch norm, which sits between a ReLU and an
        unpadded convolution, is folded into that convolution (:func:`_folded`): one
        convolution of the ReLU's output whose weights and bias carry the batch norm's running
        scale and shift, with the next ReLU fused into it on CPU (:func:`_conv_relu`). The same
        function to rounding, without the passes that write the normalised copy of each
        activation and apply the ReLU (inference about 10% less CPU time, docs/performance.md).
        Everything else takes the modules one by one (:meth:`_can_fold`): training, a call
        that needs gradients, a stem module in train mode or with forward hooks, autocast.
        """
        x = x.contiguous(memory_format=torch.channels_last)
        return self._folded_features(x) if self._can_fold(x) else self.primary.conv(self.stem(x))

    def _folded_features(self, x: Tensor) -> Tensor:
        """:meth:`features` with the batch norms folded and the ReLUs fused (channels-last ``x``)."""
        layers = list(self.stem)
        affine = None
        for conv, norm in zip(layers[0::3], layers[2::3]):
            x = _conv_relu(conv, x, affine)
            affine = _running_affine(norm)
        conv = self.primary.conv
        return F.conv2d(x, *_folded(conv, affine), conv.stride, conv.padding, conv.dilation, conv.groups)

    def encode(self, x: Tensor) -> tuple[Tensor, RoutingResult, Tensor]:
        """Primary capsules ``u`` (B, I, primary_dim), the routing result and the lengths ``|v_j|`` (B, J)."""
        x = x.contiguous(memory_format=torch.channels_last)
        u = self.primary.capsules(self._folded_features(x)) if self._can_fold(x) else self.primary(self.stem(x))  # (B, 16, 8) on MNIST
        routed = self.digits(u)  # poses (B, J, 16)
        # Exact |v_j| as in CapsNet: vector_norm's gradient at 0 is 0, not NaN.
        return u, routed, torch.linalg.vector_norm(routed.poses, dim=-1)


@register_model
def efficient_capsnet_mnist(**overrides) -> EfficientCapsNet:
    """Efficient-CapsNet for MNIST: 161,824 parameters without the decoder (1,573,168 with it).

    Source of the count: the paper's Table 2 lists Efficient-CapsNet on MNIST with "161 K"
    parameters, the reconstruction regularizer marked as used in training but its decoder not
    counted (the decoder alone has 1,411,344). The exact 161,824 is the sum over the layers of
    the authors' published MNIST graph (github.com/EscVM/Efficient-CapsNet,
    ``models/efficient_capsnet_graph_mnist.py``, the Keras model without the generator):
    stem 832 + 18,496 + 36,928 + 73,856 (convolutions with biases) and 2 x (32 + 64 + 64 + 128)
    = 576 batch-norm scales and shifts; depthwise primary capsules 128 x 81 + 128 = 10,496;
    class capsules 16 x 10 x 8 x 16 = 20,480 weights + 160 log priors. Batch norm's running
    means and variances are buffers here (Keras lists them as 576 non-trainable parameters).
    """
    return EfficientCapsNet(**overrides)


class MultiDigitEfficientCapsNet(EfficientCapsNet):
    """Efficient-CapsNet whose decoder runs once per digit, each time masked to one class capsule.

    The ``multi_margin`` objective needs one reconstruction per digit (``reconstructions``
    ``(B, K, C, H, W)`` and ``masks`` ``(B, K)``), which the single-digit forward does not
    give; this is :class:`~capsnet.models.multimnist.MultiDigitCapsNet`'s forward on
    Efficient-CapsNet's encoder, as the authors' MultiMNIST graph masks the capsules twice and
    decodes each. ``num_digits``: how many of the longest capsules are reconstructed without
    labels (2 for MultiMNIST). Other keywords: :class:`EfficientCapsNet`'s.

    Shape:
        x: ``(B, in_channels, image_size, image_size)``; y: ``(B, K)`` or ``(B,)`` classes or None;
        returns a :class:`~capsnet.models.multimnist.MultiCapsNetOutput`.
    """

    def __init__(self, *, num_digits: int = 2, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= num_digits <= self.num_classes:
            raise ValueError(f"num_digits must lie in [1, {self.num_classes}], got {num_digits}")
        self.num_digits = num_digits

    # It reads only what both classes have: encode, decoder, conv1, the sizes and num_digits.
    forward = MultiDigitCapsNet.forward


@register_model
def efficient_capsnet_multimnist(**overrides) -> MultiDigitEfficientCapsNet:
    """Efficient-CapsNet for MultiMNIST (36 x 36): 154,656 parameters without the decoder.

    The authors' MultiMNIST graph (github.com/EscVM/Efficient-CapsNet,
    ``models/efficient_capsnet_graph_multimnist.py``), not the MNIST one at a larger input: the
    third and fourth stem convolutions have stride 2 (36 -> 32 -> 30 -> 14 -> 6) and the
    depthwise primary convolution is 5 x 5 at stride 2, so the 128 channels are again 16
    capsules of 8 at one position. Count, summed over those layers: stem 130,112 and batch norm
    576 as on MNIST, primary capsules 128 x 25 + 128 = 3,328, class capsules 20,480 + 160. The
    decoder (FC 512 -> FC 1024 -> FC 1296) adds 1,936,144 and runs once per digit.
    """
    kwargs = dict(image_size=36, stem_strides=(1, 1, 2, 2), primary_kernel=5, primary_stride=2)
    kwargs.update(overrides)
    return MultiDigitEfficientCapsNet(**kwargs)

"""Matrix capsules with EM routing (Hinton, Sabour & Frosst, ICLR 2018), Fig. 1 / Sec. 3.

ReLU Conv1 (5x5, stride 2, A channels) -> PrimaryCaps (1x1, B types) -> ConvCaps1 (3x3,
stride 2, C types) -> ConvCaps2 (3x3, stride 1, D types) -> ClassCaps (shared transforms,
coordinate addition). VALID padding: 32 -> 14 -> 14 -> 6 -> 4 on smallNORB crops.

Parameter counts (conv biases, PrimaryCaps biases, beta_a and beta_v per output type), one
input channel / the stereo pair as two: ``em_small`` (A=64, B=8, C=D=16) 67,154 / 68,754 (the
paper's "68K"); ``em_full`` (A=B=C=D=32) 316,394 / 317,194 (the paper's "310K").
Initialisation follows Google's release of the authors' code: Conv1 truncated normal std 0.05
with bias 0.1, the capsule layers as documented in :mod:`capsnet.layers.matrix`.

Two parametrisations. The class :class:`MatrixCapsNet` defaults to the paper's (:data:`PAPER`:
Procedure 1's activation logit, Google's transform init). The registered builders default to
:data:`TRAINABLE`, which learns far faster (docs/em_training.md): the activation logit centred
over the parent types of a position with ``beta_a`` as a plain offset (``activation="offset"``),
ConvCaps transforms that start at the identity plus noise of std 0.1 (``caps_init="identity"``)
and a fan-in lambda of 5, 5 and 1/2 in the three routed layers. Everything else, 3 EM
iterations, the receptive-field E-step, coordinate addition, the spread loss, is the paper's.
``create_model("em_mnist", **PAPER)`` gives the paper's parametrisation.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from .._shapes import conv_output_size
from ..layers.decoder import CapsuleDecoder
from ..layers.matrix import COORD_ORDERS, ClassMatCaps, ConvMatCaps, PrimaryMatCaps, _trunc_normal_
from ..ops.conv import Conv2d
from ..routing.em import MASS_EPS, VAR_FLOOR
from ..validation import check_images, check_labels
from .registry import register_model

__all__ = ["EM_BUILDERS", "MatrixCapsNet", "MatrixCapsOutput", "PAPER", "TRAINABLE", "em_full", "em_mnist", "em_small", "em_tiny"]

#: The paper's parametrisation: Procedure 1's ``a_j = logistic(lambda (beta_a - sum_h cost^h))``
#: and ConvCaps transforms of Google's release (truncated normal, std 0.3).
PAPER = dict(activation="paper", caps_init="normal", final_lambda=None)

#: What the builders use (not in the paper; docs/em_training.md has the measurements). With the
#: paper's logit every cost is negative, so a parent without votes sits at a = 0.5 and beta_a,
#: scaled by lambda ~ 1e-3, cannot move it: centring the cost over a position's parent types
#: makes activations relative (0.5 = average). Random ConvCaps transforms average the child
#: poses away (pose RMS 0.41 -> 0.10 -> 0.02 over the two layers), so the class layer starts
#: blind and each extra EM iteration makes that worse; identity-plus-noise transforms keep the
#: pose scale (3 iterations: 71.5% -> 90.7% validation after 300 steps). With the fan-in
#: lambda at 1/2 in every layer, the ConvCaps layers' logits stay within about +-0.5 (p05-p95)
#: even after three epochs (activations 0.50 +- 0.05: they gate nothing); lambda 10x larger there (5, 5, and 1/2
#: in the class layer) lets them say present / absent (300 steps: 91.2% -> 94.2% validation,
#: docs/em_training.md, session 8). With the centred logit beta_a sits inside lambda (~1e-4 in
#: the class layer), so the classes no child chooses stay at a ~ 0.29 and a spread-loss margin
#: above ~0.71 cannot be met; ``activation="offset"`` makes beta_a a logit offset (three
#: epochs, seeds 0 / 1 / 2: 98.97 / 99.03 / 98.89% test against 98.89 / 98.88 / 98.80%, validation
#: level or better in each; docs/em_training.md, session 9).
TRAINABLE = dict(activation="offset", caps_init="identity", final_lambda=(5.0, 5.0, 0.5))

#: The registered builders that apply :data:`TRAINABLE` (checkpoints written before they did
#: are rebuilt with :data:`PAPER`, those written before its per-layer lambda with one lambda,
#: and those before its offset activation with the centred one, see
#: ``capsnet.train.restore.checkpoint_model_kwargs``).
EM_BUILDERS = ("em_small", "em_full", "em_mnist", "em_tiny")


def _build(defaults: dict, overrides: dict) -> "MatrixCapsNet":
    """``MatrixCapsNet`` with :data:`TRAINABLE`, then a builder's sizes, then the caller's keywords.

    TRAINABLE's lambdas are values of the fan-in schedule: a caller who picks another schedule
    without a ``final_lambda`` gets that schedule's own default.
    """
    kwargs = {**TRAINABLE, **defaults, **overrides}
    if "schedule" in overrides and "final_lambda" not in overrides and kwargs["schedule"] != "fan_in":
        kwargs["final_lambda"] = None
    return MatrixCapsNet(**kwargs)


class MatrixCapsOutput(NamedTuple):
    """Everything a forward pass produces.

    activations: ``(B, J)`` class capsule activations (the scores the spread loss reads).
    poses: ``(B, J, 4, 4)`` class capsule pose matrices.
    assignments: ``(B, I, J)`` class-layer routing assignments ``R`` of the last iteration,
        ``I = D H W`` ConvCaps2 capsules ordered ``(type, h, w)``.
    reconstruction: ``(B, C, H, W)`` the decoder's image (``decoder=True``), or None.
    """

    activations: Tensor
    poses: Tensor
    assignments: Tensor
    reconstruction: Optional[Tensor] = None


class MatrixCapsNet(nn.Module):
    """The smallNORB network of Fig. 1; keyword-only hyper-parameters default to ``em_small``.

    Args:
        in_channels, image_size, num_classes: input images ``(B, in_channels, image_size,
            image_size)`` and ``num_classes`` class capsules (smallNORB: 1 or 2, 32, 5).
        conv_channels, primary_types, caps1_types, caps2_types: A, B, C, D of the paper.
        conv_kernel, conv_stride: Conv1 (5, 2); caps_kernel (3), caps1_stride (2), caps2_stride (1).
        conv_padding: zero padding of Conv1 (the paper: 0, VALID). VALID Conv1 and ConvCaps1 on
            28x28 MNIST leave pixel rows and columns 25-27 unseen (their gradient is exactly zero);
            padding 1 makes the grids 13 -> 6 -> 4 and every pixel count (padding 2 still misses
            the last row and column).
        conv_norm: batch norm between Conv1 and its ReLU (not in the paper; yl-1993's PyTorch code).
        stem_depth: extra ReLU convolutions (3x3, stride 1, padding 1, A channels, He init) between
            Conv1 and PrimaryCaps, so the primary poses are not linear in one layer of features
            (not in the paper, which has 0; the grids do not change).
        caps_init_std, class_init_std: truncated-normal std of the ConvCaps and class transforms
            (Google's code: 0.3 and 0.01). ``caps_init_std=None``: 0.3 for ``caps_init="normal"``,
            0.1 for ``"identity"``.
        class_beta_a: initial ``beta_a`` of the class capsules; None: the layer's own (0 as in the
            paper's codes; IBM's N(-1000, 500) with ``schedule="authors"``). With
            ``activation="offset"`` it is the class logits' offset: a negative one starts the
            classes that no child chooses low, so a late spread-loss margin (0.9 needs losers
            below ~0.1) can be met (docs/em_training.md, session 10).
        class_transforms: ``"shared"`` (the paper): one transform per (ConvCaps2 type, class), shared
            over the grid, with coordinate addition; ``"position"``: one per (position, type, class),
            the class layer a ConvCaps layer whose kernel covers the whole grid (no coordinate
            addition: the position is in the transform). Not in the paper: one transform per grid
            cell, so on MNIST's 3x3 grid 9x the class layer's parameters (23,040 against 2,560).
        caps_init: ``"normal"`` (Google's code): ConvCaps transforms are noise of ``caps_init_std``;
            ``"identity"``: the identity plus that noise, so each vote starts as its child's pose.
        routing_stats: measure routing in every forward pass for the training logs, see
            :meth:`training_metrics` (off by default: it costs a little time).
        decoder, decoder_hidden: a reconstruction decoder on the class poses (not in the EM paper:
            Sabour et al. 2017's, Sec. 4.1, with the 4x4 poses flattened to 16): FC ``decoder_hidden``
            ReLU layers, then the image's pixels through a sigmoid, fed the poses of the labelled class
            (the most active class without labels). The spread objective's ``recon_weight`` uses it.
        iterations: EM iterations in every routed layer (the paper: 3), or a sequence of three:
            ConvCaps1, ConvCaps2, ClassCaps.
        schedule, final_lambda: inverse-temperature schedule, see
            :func:`~capsnet.routing.em.inverse_temperatures` ("fan_in" default; "linear", "authors");
            ``final_lambda`` is one value for every routed layer or three (ConvCaps1, ConvCaps2, ClassCaps).
        activation: how the M-step makes the activation logit, see
            :func:`~capsnet.routing.em.em_routing` ("paper" default; "centred", "standardised", "offset").
        beta: ``"type"`` or ``"capsule"``, see :class:`~capsnet.layers.matrix.ConvMatCaps`.
        coordinate_addition, coordinate_order: see :func:`~capsnet.layers.matrix.coordinate_offsets`.
        var_floor, eps, detach_intermediate, truncate_gradient, iteration_grad_scale: passed to
            :func:`~capsnet.routing.em.em_routing` (the last is not in the paper: docs/em_training.md, session 12).
        e_step_temperature: the E-steps' temperature (:func:`~capsnet.routing.em.em_routing`; 1, the
            paper's, by default; not in the paper), one number for every routed layer or three
            (ConvCaps1, ConvCaps2, ClassCaps).

    Shape:
        x: ``(B, in_channels, image_size, image_size)`` floats; y: ``(B,)`` labels or None
        (EM capsules need no labels in the forward pass; ``y`` is only validated).
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        image_size: int = 32,
        num_classes: int = 5,
        conv_channels: int = 64,
        primary_types: int = 8,
        caps1_types: int = 16,
        caps2_types: int = 16,
        conv_kernel: int = 5,
        conv_stride: int = 2,
        conv_padding: int = 0,
        conv_norm: bool = False,
        stem_depth: int = 0,
        caps_kernel: int = 3,
        caps1_stride: int = 2,
        caps2_stride: int = 1,
        iterations: Union[int, Sequence[int]] = 3,
        schedule: Union[str, Sequence[float]] = "fan_in",
        final_lambda: Union[None, float, Sequence[float]] = None,
        activation: str = "paper",
        beta: str = "type",
        coordinate_addition: bool = True,
        coordinate_order: str = "column_row",
        var_floor: float = VAR_FLOOR,
        eps: float = MASS_EPS,
        detach_intermediate: bool = False,
        truncate_gradient: bool = False,
        iteration_grad_scale: float = 1.0,
        e_step_temperature: Union[float, Sequence[float]] = 1.0,
        caps_init_std: Optional[float] = None,
        class_init_std: float = 0.01,
        class_beta_a: Optional[float] = None,
        class_transforms: str = "shared",
        caps_init: str = "normal",
        routing_stats: bool = False,
        decoder: bool = False,
        decoder_hidden: tuple[int, ...] = (512, 1024),
    ):
        super().__init__()
        sizes = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                     conv_channels=conv_channels, primary_types=primary_types, caps1_types=caps1_types,
                     caps2_types=caps2_types, conv_kernel=conv_kernel, conv_stride=conv_stride,
                     caps_kernel=caps_kernel, caps1_stride=caps1_stride, caps2_stride=caps2_stride)  # fmt: skip
        if min(sizes.values()) < 1:
            raise ValueError(f"MatrixCapsNet sizes must be positive, got {sizes}")
        if conv_padding < 0:
            raise ValueError(f"conv_padding must be >= 0, got {conv_padding}")
        if isinstance(stem_depth, bool) or not isinstance(stem_depth, int) or stem_depth < 0:
            raise ValueError(f"stem_depth must be an int >= 0, got {stem_depth!r}")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        grid0 = conv_output_size(image_size, conv_kernel, conv_stride, conv_padding)
        grid1 = conv_output_size(grid0, caps_kernel, caps1_stride) if grid0 >= caps_kernel else 0
        grid2 = conv_output_size(grid1, caps_kernel, caps2_stride) if grid1 >= caps_kernel else 0
        if image_size + 2 * conv_padding < conv_kernel or grid2 < 1:
            raise ValueError(
                f"image_size {image_size} is too small: Conv1 {conv_kernel}/{conv_stride} then two {caps_kernel}x{caps_kernel} "
                f"capsule convolutions (strides {caps1_stride}, {caps2_stride}) leave no capsule"
            )
        per_layer = (iterations,) * 3 if isinstance(iterations, int) else tuple(iterations)
        if len(per_layer) != 3 or any(isinstance(n, bool) or not isinstance(n, int) for n in per_layer):
            raise ValueError(f"iterations must be an int or three ints (ConvCaps1, ConvCaps2, ClassCaps), got {iterations!r}")
        if not isinstance(schedule, str) and any(len(tuple(schedule)) != n for n in per_layer):
            raise ValueError(f"an explicit schedule holds one lambda per iteration, so every layer needs {len(tuple(schedule))} "
                             f"iterations; got iterations={iterations!r}")
        if caps_init_std is None:
            caps_init_std = 0.1 if caps_init == "identity" else 0.3
        lambdas = (final_lambda,) * 3 if final_lambda is None or isinstance(final_lambda, numbers.Real) else tuple(final_lambda)
        if len(lambdas) != 3 or any(x is not None and (isinstance(x, bool) or not isinstance(x, numbers.Real)) for x in lambdas):
            raise ValueError(f"final_lambda must be None, a number or three numbers (ConvCaps1, ConvCaps2, ClassCaps), got {final_lambda!r}")
        temps = (e_step_temperature,) * 3 if isinstance(e_step_temperature, numbers.Real) else tuple(e_step_temperature)
        if len(temps) != 3 or any(isinstance(t, bool) or not isinstance(t, numbers.Real) for t in temps):
            raise ValueError(f"e_step_temperature must be a number or three numbers (ConvCaps1, ConvCaps2, ClassCaps), "
                             f"got {e_step_temperature!r}")
        routing = dict(schedule=schedule, activation=activation,
                       beta=beta, var_floor=var_floor, eps=eps, detach_intermediate=detach_intermediate,
                       truncate_gradient=truncate_gradient, iteration_grad_scale=iteration_grad_scale)  # fmt: skip
        self.conv1 = Conv2d(in_channels, conv_channels, conv_kernel, stride=conv_stride, padding=conv_padding)
        _trunc_normal_(self.conv1.weight.data, 0.05)
        nn.init.constant_(self.conv1.bias, 0.1)
        self.conv_norm = nn.BatchNorm2d(conv_channels) if conv_norm else nn.Identity()
        self.stem = nn.ModuleList(Conv2d(conv_channels, conv_channels, 3, padding=1) for _ in range(stem_depth))
        for conv in self.stem:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.primary = PrimaryMatCaps(conv_channels, primary_types)
        self.caps1 = ConvMatCaps(primary_types, caps1_types, kernel_size=caps_kernel, stride=caps1_stride,
                                 in_size=(grid0, grid0), init_std=caps_init_std, iterations=per_layer[0], final_lambda=lambdas[0], e_step_temperature=temps[0], **routing)  # fmt: skip
        self.caps2 = ConvMatCaps(caps1_types, caps2_types, kernel_size=caps_kernel, stride=caps2_stride,
                                 in_size=(grid1, grid1), init_std=caps_init_std, iterations=per_layer[1], final_lambda=lambdas[1], e_step_temperature=temps[1], **routing)  # fmt: skip
        if coordinate_order not in COORD_ORDERS:  # checked here too: "position" and no coordinate addition never read it
            raise ValueError(f"coordinate_order must be one of {COORD_ORDERS}, got {coordinate_order!r}")
        if class_transforms not in ("shared", "position"):
            raise ValueError(f"class_transforms must be 'shared' or 'position', got {class_transforms!r}")
        self.class_transforms = class_transforms
        if class_transforms == "shared":
            self.classes = ClassMatCaps(caps2_types, num_classes, in_size=(grid2, grid2),
                                        coordinate_addition=coordinate_addition, coordinate_order=coordinate_order,
                                        init_std=class_init_std, iterations=per_layer[2], final_lambda=lambdas[2], e_step_temperature=temps[2], **routing)  # fmt: skip
        else:
            self.classes = ConvMatCaps(caps2_types, num_classes, kernel_size=grid2, stride=1, in_size=(grid2, grid2),
                                       init_std=class_init_std, iterations=per_layer[2], final_lambda=lambdas[2], e_step_temperature=temps[2], **routing)  # fmt: skip
        if class_beta_a is not None:
            if isinstance(class_beta_a, bool) or not isinstance(class_beta_a, numbers.Real) or not math.isfinite(class_beta_a):
                raise ValueError(f"class_beta_a must be None or a finite number, got {class_beta_a!r}")
            nn.init.constant_(self.classes.beta_a, float(class_beta_a))
        if caps_init not in ("normal", "identity"):
            raise ValueError(f"caps_init must be 'normal' or 'identity', got {caps_init!r}")
        if caps_init == "identity":  # W = I + noise: votes start as the child poses, the pose scale carries through
            for layer in (self.caps1, self.caps2):
                layer.weight.data += torch.eye(4, dtype=layer.weight.dtype)
        if not isinstance(decoder, bool):
            raise ValueError(f"decoder must be True or False, got {decoder!r}")
        # Not in the EM paper: Sabour et al.'s reconstruction decoder (Sec. 4.1) on the flattened
        # 4x4 class poses, masked by the label in training and by the most active class otherwise.
        self.decoder = CapsuleDecoder(num_classes, 16, (in_channels, image_size, image_size), hidden=tuple(decoder_hidden)) if decoder else None
        self.record_routing_stats(routing_stats)

    def forward(self, x: Tensor, y: Optional[Tensor] = None) -> MatrixCapsOutput:
        check_images(x, self.in_channels, (self.image_size, self.image_size), dtype=self.conv1.weight.dtype)
        if y is not None:
            check_labels(y, x.shape[0], self.num_classes)
        features = torch.relu_(self.conv_norm(self.conv1(x)))
        for conv in self.stem:
            features = torch.relu_(conv(features))
        primary = self.primary(features)  # poses (B, 14, 14, B_types, 4, 4)
        caps1 = self.caps1(primary.poses, primary.activations)  # (B, 6, 6, C, 4, 4)
        caps2 = self.caps2(caps1.poses, caps1.activations)  # (B, 4, 4, D, 4, 4)
        out = self.classes(caps2.poses, caps2.activations)  # (B, J, 4, 4); "position": (B, 1, 1, J, 4, 4)
        activations, poses, assignments = out.activations, out.poses, out.assignments
        if self.class_transforms == "position":  # a 1x1 grid; children (h, w, t) -> (t, h, w) as ClassMatCaps orders them
            h, w = caps2.poses.shape[1:3]
            assignments = rearrange(assignments, "b 1 (h w t) j -> b (t h w) j", h=h, w=w)
            activations, poses = activations.flatten(1), poses.flatten(1, 3)
        reconstruction = None
        if self.decoder is not None:
            mask_labels = y if y is not None else activations.argmax(dim=1)
            reconstruction = self.decoder(poses.flatten(2), mask_labels)
        return MatrixCapsOutput(activations, poses, assignments, reconstruction)

    def reconstruct(self, poses: Tensor, labels: Tensor) -> Tensor:
        """Decode the class capsule named by ``labels`` ``(B,)`` from ``poses`` ``(B, J, 16)`` or ``(B, J, 4, 4)``."""
        if self.decoder is None:
            raise ValueError("this MatrixCapsNet was built with decoder=False and cannot reconstruct")
        return self.decoder(poses.flatten(2) if poses.dim() == 4 else poses, labels)

    def record_routing_stats(self, enabled: bool = True) -> None:
        """Measure every routed layer's iterations from the next forward pass on (see :meth:`training_metrics`)."""
        for layer in self.routed_layers().values():
            layer.record_stats = enabled
            layer.stats = []

    def routed_layers(self) -> dict:
        """``{"caps1": ..., "caps2": ..., "classes": ...}``: the layers with EM routing."""
        return {"caps1": self.caps1, "caps2": self.caps2, "classes": self.classes}

    def training_metrics(self) -> dict[str, float]:
        """Routing statistics of the last forward pass and gradient norms, for training logs.

        ``routing/<layer>/it<k>/<stat>`` per routed layer and iteration (the statistics of
        ``stats`` in :func:`~capsnet.routing.em.em_routing`; only after
        :meth:`record_routing_stats`), and ``grad_norm/<layer>/<parameter>`` of the gradients
        the last backward pass left (Conv1, PrimaryCaps, the transforms, beta_a and beta_v).
        """
        metrics = {}
        for name, layer in self.routed_layers().items():
            for it, stats in enumerate(layer.stats):
                metrics.update({f"routing/{name}/it{it + 1}/{k}": v for k, v in stats.items()})
        for name, param in self.named_parameters():
            if param.grad is not None:
                metrics[f"grad_norm/{name.replace('.', '/')}"] = float(param.grad.norm())
        return metrics


@register_model
def em_small(**overrides) -> MatrixCapsNet:
    """The paper's small smallNORB model, A=64, B=8, C=D=16: 67,154 parameters (68,754 stereo).

    Parametrised by :data:`TRAINABLE` unless overridden (``**PAPER`` for the paper's)."""
    return _build({}, overrides)


@register_model
def em_full(**overrides) -> MatrixCapsNet:
    """The paper's smallNORB model, A=B=C=D=32: 316,394 parameters (317,194 stereo); :data:`TRAINABLE` unless overridden."""
    return _build(dict(conv_channels=32, primary_types=32, caps1_types=32, caps2_types=32), overrides)


@register_model
def em_mnist(**overrides) -> MatrixCapsNet:
    """``em_small`` on 28x28 one-channel MNIST / Fashion-MNIST, 10 classes (grids 12, 5, 3); :data:`TRAINABLE` unless overridden."""
    return _build(dict(image_size=28, num_classes=10), overrides)


@register_model
def em_tiny(**overrides) -> MatrixCapsNet:
    """A few-thousand-parameter EM network on 32x32 for fast tests and smoke runs (A=8, B=C=D=4); :data:`TRAINABLE` unless overridden."""
    return _build(dict(conv_channels=8, primary_types=4, caps1_types=4, caps2_types=4), overrides)

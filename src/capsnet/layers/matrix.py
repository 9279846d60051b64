"""Matrix capsule layers of Hinton, Sabour & Frosst 2018 ("Matrix capsules with EM routing").

A capsule is a 4x4 pose matrix ``M`` and an activation ``a``. Capsule grids travel between
layers as :class:`MatrixCaps` with poses ``(B, H, W, T, 4, 4)`` and activations ``(B, H, W, T)``
(``T`` capsule types). A capsule ``i`` votes for a parent ``j`` with ``V_ij = M_i W_ij`` and the
parents come from :func:`~capsnet.routing.em.em_routing`.

Initialisation follows Google's release of the authors' code (truncated normal, cut at two
standard deviations): PrimaryCaps pose kernel std 0.5, activation kernel std 3.0 with the
logit shifted by -1 (here: the bias starts at -1); ConvCaps transforms std 0.3; class
transforms std 0.01. ``beta_a`` and ``beta_v`` start at zero, except that the authors'
lambda schedule starts ``beta_a`` at IBM's truncated N(-1000, 500), without which that
schedule does not train.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .._shapes import conv_output_size
from ..precision import float32_under_autocast
from ..routing.em import (
    ACTIVATIONS,
    LAMBDA_SCHEDULES,
    MASS_EPS,
    VAR_FLOOR,
    ConvGeometry,
    FactoredVotes,
    check_e_step_temperature,
    em_routing,
    to_patches,
)

__all__ = ["ClassMatCaps", "ConvMatCaps", "MatrixCaps", "PrimaryMatCaps", "coordinate_offsets"]

#: The pose is a 4x4 matrix: 16 elements ``D``.
POSE = 4

#: Where the paper adds the scaled (row, column) coordinate: the first two elements of the
#: right-hand column of the vote matrix, row-major flat indices 3 and 7.
COORD_INDICES = (3, 7)

#: Which coordinate goes to index 3 and which to index 7 (IBM puts the column first).
COORD_ORDERS = ("column_row", "row_column")

BETA_MODES = ("type", "capsule")


class MatrixCaps(NamedTuple):
    """A grid of matrix capsules, or a layer of class capsules.

    poses: ``(B, H, W, T, 4, 4)`` (class capsules: ``(B, J, 4, 4)``).
    activations: ``(B, H, W, T)`` in [0, 1] (class capsules: ``(B, J)``).
    assignments: the routing assignments ``R`` that produced them, ``(B, L, I, J)`` in patch
        layout (class capsules: ``(B, I, J)``); None for primary capsules.
    """

    poses: Tensor
    activations: Tensor
    assignments: Optional[Tensor] = None


def _trunc_normal_(t: Tensor, std: float, mean: float = 0.0) -> Tensor:
    """TensorFlow's ``truncated_normal``: resample beyond two standard deviations."""
    return nn.init.trunc_normal_(t, mean=mean, std=std, a=mean - 2 * std, b=mean + 2 * std)


def _block_weight(weight: Tensor) -> Tensor:
    """Transforms as one matrix per child type: ``M W`` for all parents is then one ``bmm``.

    ``V = M W`` with ``M``, ``W`` 4x4 is linear in the 16 elements of ``M``:
    ``V[p, r] = sum_{p', q} M[p', q] delta(p, p') W[q, r]``. Stacking this 16 x 16 map for
    every parent gives a ``(16, J 16)`` matrix per child type, so the votes of all patches
    come out of a single batched matrix product in routing's layout, with weights that carry
    no batch axis.

    Shape:
        weight: ``(I, J, 4, 4)``; returns ``(I, 16, J 16)``.
    """
    eye = torch.eye(POSE, dtype=weight.dtype, device=weight.device)
    return rearrange(torch.einsum("ap,ijqr->iaqjpr", eye, weight), "i a q j p r -> i (a q) (j p r)")


def _check_grid(poses: Tensor, activations: Tensor, types: int, size: Optional[tuple[int, int]], who: str) -> None:
    shape = f"(B, H, W, {types}, 4, 4)" if size is None else f"(B, {size[0]}, {size[1]}, {types}, 4, 4)"
    if poses.dim() != 6 or poses.shape[3:] != (types, POSE, POSE):
        raise ValueError(f"{who} expects poses {shape}, got {tuple(poses.shape)}")
    if size is not None and tuple(poses.shape[1:3]) != tuple(size):
        raise ValueError(f"{who} expects poses {shape}, got {tuple(poses.shape)}")
    if activations.shape != poses.shape[:4]:
        raise ValueError(f"{who} expects activations {tuple(poses.shape[:4])} to match poses, got {tuple(activations.shape)}")


class _EMRouted(nn.Module):
    """Shared parts of the routed layers: betas and the routing options, with their defaults.

    The layers pass their routing keywords (``iterations``, ``schedule``, ``final_lambda``,
    ``activation``, ``beta``, ``var_floor``, ``eps``, ``detach_intermediate``, ``truncate_gradient``, ``iteration_grad_scale``, ``e_step_temperature``) through unchanged,
    so each option and its default is written once, here. With ``record_stats`` set, every
    forward pass keeps the routing statistics of each iteration in :attr:`stats` (see
    ``stats`` of :func:`~capsnet.routing.em.em_routing`). ``num_capsules``: output capsules per type
    (positions), None where the layer does not know them; only ``beta="capsule"`` needs them.
    """

    def __init__(
        self,
        out_types: int,
        num_capsules: Optional[int],
        *,
        iterations: int = 3,
        schedule: Union[str, Sequence[float]] = "fan_in",
        final_lambda: Optional[float] = None,
        activation: str = "paper",
        beta: str = "type",
        var_floor: float = VAR_FLOOR,
        eps: float = MASS_EPS,
        detach_intermediate: bool = False,
        truncate_gradient: bool = False,
        iteration_grad_scale: float = 1.0,
        e_step_temperature: float = 1.0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if beta not in BETA_MODES:
            raise ValueError(f"beta must be one of {BETA_MODES}, got {beta!r}")
        if beta == "capsule" and num_capsules is None:
            raise ValueError("beta='capsule' needs in_size=(H, W) to know how many output capsules there are")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if isinstance(schedule, str) and schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"schedule must be one of {LAMBDA_SCHEDULES} or a sequence of floats, got {schedule!r}")
        self.iterations, self.schedule, self.final_lambda, self.activation = iterations, schedule, final_lambda, activation
        self.record_stats, self.stats = False, []
        self.var_floor, self.eps, self.detach_intermediate = var_floor, eps, detach_intermediate
        self.truncate_gradient, self.iteration_grad_scale = truncate_gradient, iteration_grad_scale
        check_e_step_temperature(e_step_temperature)
        self.e_step_temperature = e_step_temperature
        shape = (out_types,) if beta == "type" else (num_capsules, out_types)
        # beta_a, beta_v of Procedure 1, one per parent type (both public codes) or per capsule.
        self.beta_a = nn.Parameter(torch.zeros(shape))
        self.beta_v = nn.Parameter(torch.zeros(shape))
        if schedule == "authors":
            # The authors' tiny lambda needs IBM's large negative beta_a: N(-1000, 500).
            _trunc_normal_(self.beta_a.data, std=500.0, mean=-1000.0)

    def _route(self, votes: Tensor, activations: Tensor, geometry: Optional[ConvGeometry]):
        stats = [] if self.record_stats else None
        routed = em_routing(
            votes,
            activations,
            self.beta_a,
            self.beta_v,
            iterations=self.iterations,
            geometry=geometry,
            schedule=self.schedule,
            final_lambda=self.final_lambda,
            activation=self.activation,
            var_floor=self.var_floor,
            eps=self.eps,
            detach_intermediate=self.detach_intermediate,
            truncate_gradient=self.truncate_gradient,
            iteration_grad_scale=self.iteration_grad_scale,
            e_step_temperature=self.e_step_temperature,
            stats=stats,
        )
        if stats is not None:
            self.stats = stats
        return routed


class PrimaryMatCaps(nn.Module):
    """1x1 convolutions to ``types`` 4x4 pose matrices and sigmoid activations (PrimaryCaps, Sec. 3).

    Parameters: ``(in_channels + 1) * types * 17`` (16 pose and 1 activation channels with biases).

    Shape:
        x: ``(B, in_channels, H, W)``; returns :class:`MatrixCaps` with poses ``(B, H, W, T, 4, 4)``
        and activations ``(B, H, W, T)``.
    """

    def __init__(self, in_channels: int, types: int, *, pose_std: float = 0.5, activation_std: float = 3.0):
        super().__init__()
        if min(in_channels, types) < 1:
            raise ValueError(f"PrimaryMatCaps sizes must be positive, got in_channels={in_channels} types={types}")
        self.in_channels, self.types = in_channels, types
        self.pose = nn.Conv2d(in_channels, types * POSE * POSE, 1)
        self.activation = nn.Conv2d(in_channels, types, 1)
        _trunc_normal_(self.pose.weight.data, pose_std)
        nn.init.zeros_(self.pose.bias)
        _trunc_normal_(self.activation.weight.data, activation_std)
        nn.init.constant_(self.activation.bias, -1.0)  # Google: sigmoid(logit - 1)

    def forward(self, x: Tensor) -> MatrixCaps:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"PrimaryMatCaps expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        poses = rearrange(self.pose(x), "b (t p q) h w -> b h w t p q", t=self.types, p=POSE)
        activations = rearrange(torch.sigmoid(self.activation(x)), "b t h w -> b h w t")
        return MatrixCaps(poses, activations)


class ConvMatCaps(_EMRouted):
    """Convolutional capsules with EM routing (ConvCaps1 and ConvCaps2, Sec. 3).

    One 4x4 transform per (kernel position, input type, output type), VALID padding. Votes are
    one ``F.unfold`` and one batched matrix product whose weights carry no batch axis (see
    :func:`_block_weight`), handed to routing as :class:`~capsnet.routing.em.FactoredVotes` so
    they are never stored; routing normalises each child over all parents of every patch that
    holds it.

    Args:
        in_types, out_types: capsule types ``T`` below and ``J`` above.
        kernel_size, stride: of the capsule convolution (the paper: 3x3, strides 2 then 1).
        in_size: ``(H, W)`` of the input grid; needed only for ``beta="capsule"``.
        init_std: truncated-normal std of the transforms (Google: 0.3).
        routing: keyword-only routing options. ``iterations`` (3), ``schedule`` ("fan_in"),
            ``final_lambda``, ``activation`` ("paper"), ``var_floor``, ``eps``, ``detach_intermediate``, ``truncate_gradient``,
            ``iteration_grad_scale``, ``e_step_temperature``: passed to
            :func:`~capsnet.routing.em.em_routing` (same defaults). ``beta``: ``"type"``
            (default, both public codes): beta_a and beta_v per output type; ``"capsule"``: per
            output capsule (type and position; the paper's "per capsule").

    Shape:
        poses ``(B, H, W, T, 4, 4)``, activations ``(B, H, W, T)``; returns :class:`MatrixCaps`
        with poses ``(B, H', W', J, 4, 4)``, activations ``(B, H', W', J)`` and assignments
        ``(B, H' W', kh kw T, J)``.
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        in_size: Optional[tuple[int, int]] = None,
        init_std: float = 0.3,
        **routing,
    ):
        if min(in_types, out_types, kernel_size, stride) < 1:
            raise ValueError(
                f"ConvMatCaps sizes must be positive, got in_types={in_types} out_types={out_types} "
                f"kernel_size={kernel_size} stride={stride}"
            )
        num_capsules = None
        if in_size is not None:
            geometry = ConvGeometry(tuple(in_size), (kernel_size,) * 2, (stride,) * 2, in_types)
            geometry.check()
            num_capsules = geometry.num_patches
        super().__init__(out_types, num_capsules, **routing)
        self.in_types, self.out_types = in_types, out_types
        self.kernel_size, self.stride = kernel_size, stride
        self.in_size = None if in_size is None else tuple(in_size)
        # W: (kh kw T, J, 4, 4), slot order (kh, kw, t) as in ConvGeometry.
        self.weight = nn.Parameter(torch.empty(kernel_size * kernel_size * in_types, out_types, POSE, POSE))
        _trunc_normal_(self.weight.data, init_std)

    def output_size(self, size: int) -> int:
        """Side of the output grid for an input grid of side ``size`` (VALID padding)."""
        return conv_output_size(size, self.kernel_size, self.stride)

    def geometry(self, in_size: tuple[int, int]) -> ConvGeometry:
        """The :class:`~capsnet.routing.em.ConvGeometry` of this layer on an ``in_size`` grid."""
        return ConvGeometry(tuple(in_size), (self.kernel_size,) * 2, (self.stride,) * 2, self.in_types)

    def votes(self, poses: Tensor) -> Tensor:
        """``V_ij = M_i W_ij`` for every child slot of every patch.

        Shape:
            poses: ``(B, H, W, T, 4, 4)``; returns ``(B, L, I, J, 16)``, a view of an
            ``(I, B, L, J, 16)`` contiguous tensor (the layout :func:`em_routing` reads fastest).
        """
        patches, block, _, _ = self._factors(poses)
        votes = torch.bmm(patches, block)  # (I, B L, J 16)
        return rearrange(votes, "i (b l) (j d) -> b l i j d", b=poses.shape[0], j=self.out_types)

    def _factors(self, poses: Tensor) -> FactoredVotes:
        """The votes as ``patches (I, B L, 16) @ block transforms (I, 16, J 16)``."""
        cols = F.unfold(rearrange(poses, "b h w t p q -> b (t p q) h w"), self.kernel_size, stride=self.stride)
        patches = rearrange(cols, "b (t d k) l -> (k t) (b l) d", t=self.in_types, d=POSE * POSE)
        return FactoredVotes(patches, _block_weight(self.weight), matrices=self.weight)

    @float32_under_autocast  # votes and routing in float32 (see capsnet.precision)
    def forward(self, poses: Tensor, activations: Tensor) -> MatrixCaps:
        _check_grid(poses, activations, self.in_types, self.in_size, "ConvMatCaps")
        geometry = self.geometry(tuple(poses.shape[1:3]))
        if min(*geometry.in_size) < self.kernel_size:
            raise ValueError(f"ConvMatCaps input grid {geometry.in_size} is smaller than its kernel {self.kernel_size}")
        a_in = to_patches(rearrange(activations, "b h w t -> b t h w"), geometry)  # (B, L, I)
        routed = self._route(self._factors(poses), a_in, geometry)  # votes = self.votes(poses), never stored
        out_h, out_w = geometry.out_size
        return MatrixCaps(
            poses=rearrange(routed.poses, "b (h w) j (p q) -> b h w j p q", h=out_h, p=POSE),
            activations=rearrange(routed.activations, "b (h w) j -> b h w j", h=out_h),
            assignments=routed.assignments,
        )


def coordinate_offsets(size: tuple[int, int], types: int, *, order: str = "column_row") -> Tensor:
    """Coordinate addition offsets for the votes of every capsule of an ``H x W x T`` grid.

    The paper adds "the scaled coordinate (row, column) of the center of the receptive field of
    each capsule to the first two elements of the right-hand column of its vote matrix", i.e. to
    row-major elements 3 and 7. Scaling as IBM's code: ``(index + 0.5) / size``. ``order``:
    ``"column_row"`` (IBM: column to element 3, row to 7) or ``"row_column"`` (the paper's
    wording taken literally).

    Shape:
        returns ``(T H W, 16)``, capsules ordered ``(t, h, w)``, zero except columns 3 and 7.
    """
    if order not in COORD_ORDERS:
        raise ValueError(f"order must be one of {COORD_ORDERS}, got {order!r}")
    h, w = size
    rows = ((torch.arange(h, dtype=torch.float64) + 0.5) / h).view(1, h, 1).expand(types, h, w)
    cols = ((torch.arange(w, dtype=torch.float64) + 0.5) / w).view(1, 1, w).expand(types, h, w)
    first, second = (cols, rows) if order == "column_row" else (rows, cols)
    offsets = torch.zeros(types, h, w, POSE * POSE, dtype=torch.float64)
    offsets[..., COORD_INDICES[0]] = first
    offsets[..., COORD_INDICES[1]] = second
    return offsets.reshape(types * h * w, POSE * POSE)


class ClassMatCaps(_EMRouted):
    """Class capsules: one transform per (input type, class) shared across positions (Sec. 3).

    With coordinate addition (the paper's default) the scaled position of each input capsule
    is added to elements 3 and 7 of its votes, see :func:`coordinate_offsets`. All capsules of
    the grid are children of every class capsule: a fully connected routing.

    Args:
        in_types, num_classes: capsule types ``T`` below and classes ``J``.
        in_size: ``(H, W)`` of the input grid (the coordinate offsets depend on it).
        coordinate_addition, coordinate_order: see :func:`coordinate_offsets`.
        init_std: truncated-normal std of the transforms (Google: 0.01).
        routing: as :class:`ConvMatCaps` (one class capsule per type, so both ``beta`` modes
            give ``J`` values, stored ``(J,)`` or ``(1, J)``).

    Shape:
        poses ``(B, H, W, T, 4, 4)``, activations ``(B, H, W, T)``; returns :class:`MatrixCaps` with
        poses ``(B, J, 4, 4)``, activations ``(B, J)`` and assignments ``(B, T H W, J)`` (children
        ordered ``(t, h, w)``).
    """

    def __init__(
        self,
        in_types: int,
        num_classes: int,
        *,
        in_size: tuple[int, int],
        coordinate_addition: bool = True,
        coordinate_order: str = "column_row",
        init_std: float = 0.01,
        **routing,
    ):
        if min(in_types, num_classes, *in_size) < 1:
            raise ValueError(
                f"ClassMatCaps sizes must be positive, got in_types={in_types} num_classes={num_classes} in_size={in_size}"
            )
        super().__init__(num_classes, 1, **routing)  # one class capsule per type
        self.in_types, self.num_classes, self.in_size = in_types, num_classes, tuple(in_size)
        self.coordinate_addition = coordinate_addition
        self.weight = nn.Parameter(torch.empty(in_types, num_classes, POSE, POSE))
        _trunc_normal_(self.weight.data, init_std)
        offsets = coordinate_offsets(self.in_size, in_types, order=coordinate_order) if coordinate_addition else None
        self.register_buffer("offsets", None if offsets is None else offsets.to(torch.get_default_dtype()), persistent=False)

    def votes(self, poses: Tensor) -> Tensor:
        """``V_ij = M_i W_{t(i) j}`` (+ coordinates) for every capsule ``i = (t, h, w)`` of the grid.

        Shape:
            poses: ``(B, H, W, T, 4, 4)``; returns ``(B, 1, I, J, 16)`` with ``I = T H W`` ordered
            ``(t, h, w)``: a view of an ``(I, B, 1, J, 16)`` contiguous tensor.
        """
        flat, block, offsets, _ = self._factors(poses)
        votes = torch.bmm(flat, block)  # (T, H W B, J 16)
        votes = rearrange(votes, "t (n b) (j d) -> (t n) b 1 j d", b=poses.shape[0], j=self.num_classes)
        if offsets is not None:
            votes = votes + offsets[:, None, None, None, :]  # coordinate addition, Sec. 3
        return rearrange(votes, "i b 1 j d -> b 1 i j d")

    def _factors(self, poses: Tensor) -> FactoredVotes:
        """The votes as ``poses (T, H W B, 16) @ block transforms (T, 16, J 16) + coordinates``."""
        flat = rearrange(poses, "b h w t p q -> t (h w b) (p q)")
        offsets = None if self.offsets is None else self.offsets.to(poses.dtype)
        return FactoredVotes(flat, _block_weight(self.weight), offsets, self.weight)

    @float32_under_autocast  # votes and routing in float32 (see capsnet.precision)
    def forward(self, poses: Tensor, activations: Tensor) -> MatrixCaps:
        _check_grid(poses, activations, self.in_types, self.in_size, "ClassMatCaps")
        a_in = rearrange(activations, "b h w t -> b 1 (t h w)")  # same child order as the votes
        routed = self._route(self._factors(poses), a_in, None)  # one "patch" holding every child
        return MatrixCaps(
            poses=rearrange(routed.poses, "b 1 j (p q) -> b j p q", p=POSE),
            activations=routed.activations.squeeze(1),
            assignments=routed.assignments.squeeze(1),
        )

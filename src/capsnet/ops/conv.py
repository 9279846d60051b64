"""``nn.Conv2d`` with faster CPU algorithms for the CapsNet's convolutions.

The results are the convolution's, equal to PyTorch's up to rounding; how they are
computed differs where oneDNN's CPU kernels are slow for the CapsNet's shapes (the
measurements: docs/performance.md, "The convolutions on CPU"; the choice: docs/fast_paths.md):

* PrimaryCaps (256 -> 256, 9x9, stride 2 on 20x20): oneDNN's weight gradient runs at
  about half the speed of its forward of the same FLOPs. The weight gradient is
  itself a convolution, over the batch instead of the channels::

      grad_W[o, c, p, q] = sum_{n, y, x} grad_out[n, o, y, x] * x[n, c, s y + p, s x + q]
                         = conv2d(x^T, grad_out^T, dilation=s)[c, o, p, q]

  with ``x^T = x.transpose(0, 1)`` (channels as the batch, the batch as the channels)
  and the output gradient as the kernel, which oneDNN runs at the speed of a forward.
* Conv1 (1 -> 256, 9x9): with one input channel the column matrix is small (81 rows),
  so the forward is one matmul over ``unfold``-ed columns and the weight gradient a
  batched matmul against the same columns, both faster than oneDNN's.

* Large kernels over many channels (PrimaryCaps again): the whole convolution, forward
  and backward, as a bilinear algorithm over the DFT (:mod:`capsnet.ops.dft`), with
  about a third of the multiply-adds. ``algorithm="auto"`` takes it when it saves at least
  half of them for the batch at hand (PrimaryCaps from batch 25 on, never Conv1).

* Under CPU bfloat16 autocast (``amp="bf16"``), ``"auto"`` and ``"direct"`` convolve in
  bfloat16 like autocast's ``nn.Conv2d`` (oneDNN's AMX kernels, float32 accumulation), with
  the weight gradient above and, for strided kernels, the input gradient as one stride-1
  convolution per polyphase component (:func:`_input_grad_phases`): oneDNN's bf16 input
  gradient of PrimaryCaps takes 0.40 s at batch 128, the four phase convolutions 0.16 s,
  against 0.58 s in float32. The whole PrimaryCaps step then takes 0.41 s in bf16 against
  0.63 s by the float32 DFT (``benchmarks/bf16.py``). The DFT runs on the bf16 casts too
  (one slab of channels: float32 sums inside each matmul), at about twice the direct bf16
  rounding error; ``"auto"`` takes it where it is faster, from a saving of
  :data:`BF16_DFT_MIN_SAVING` (PrimaryCaps from batch 64: 0.30 against 0.43 s at batch 128).

``benchmarks/run.py`` measures the effect on whole models; ``tests/test_conv.py`` holds
values and gradients (first and second order) to ``F.conv2d`` in float64. Off CPU, for
groups, dilation, non-zero padding modes, under ``torch.func`` transforms and under float16
autocast the layer is a plain ``nn.Conv2d``; ``"auto"`` keeps the direct algorithm for half
precisions (the DFT's rounding error there is about twice oneDNN's). With dual tensors
(forward-mode AD) the layer is ``nn.Conv2d`` too.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from .. import _slabs as slab_sizes
from .. import backends
from .._compat import convolution_input_grad, functorch_transforms_active
from .._shapes import conv_output_size as _out_size
from .dft import MAX_GRID as DFT_MAX_GRID
from .dft import KernelCache, dft_conv2d, dft_grid, dft_macs, direct_macs

ALGORITHMS, WEIGHT_GRADIENTS = backends.ALGORITHMS, backends.WEIGHT_GRADIENTS

__all__ = ["ALGORITHMS", "Conv2d", "WEIGHT_GRADIENTS", "conv2d"]

#: ``weight_grad="auto"`` picks ``"im2col"`` when a column of the unfolded input is short
#: (``in_channels * kh * kw <= IM2COL_MAX_ROWS``) and ``"conv"`` otherwise (:data:`WEIGHT_GRADIENTS`).
IM2COL_MAX_ROWS = 256
#: ``algorithm="auto"`` takes ``"dft"`` when it needs at most half the multiply-adds of ``"direct"``
#: for the batch at hand and the weight gradient is ``"auto"`` (:data:`ALGORITHMS`).
DFT_MIN_SAVING = 2.0
#: Under bfloat16 autocast ``"auto"`` takes the DFT (on the bf16 casts) only when it saves this
#: many multiply-adds: the direct convolution runs on AMX there, and the DFT's kernel transform
#: is a fixed cost per call. PrimaryCaps, forward + backward, 1 thread: direct faster up to
#: batch 48 (a saving of 2.53x), the DFT from batch 64 (2.71x; 0.30 against 0.43 s at 128).
BF16_DFT_MIN_SAVING = 2.6


class Conv2d(nn.Conv2d):
    """A drop-in ``nn.Conv2d`` (same parameters and state dict, results equal to rounding), faster on CPU.

    Args:
        weight_grad: one of :data:`WEIGHT_GRADIENTS`; ``"native"`` makes this exactly
            ``nn.Conv2d`` (whatever ``algorithm`` says). None (default): the process-wide
            ``capsnet.backends.conv.weight_grad``, read at every call.
        algorithm: one of :data:`ALGORITHMS`. ``"auto"`` chooses per call (the
            choice depends on the batch size); with an explicit ``weight_grad`` other
            than ``"auto"`` it means ``"direct"``, and ``"dft"`` with one is an error
            (the weight gradient belongs to the direct algorithm). None (default):
            ``capsnet.backends.conv.algorithm``. Everything else as ``nn.Conv2d``.

    Shape:
        x: ``(B, in_channels, H, W)``; returns ``(B, out_channels, H', W')`` as ``nn.Conv2d``
        (input of another shape, or channel count, gets ``nn.Conv2d``'s own error).

    Inference: on the DFT path, a call that needs no gradient keeps the kernel's transform in
    :attr:`kernel_cache` (:class:`~capsnet.ops.dft.KernelCache`) for the next one, while the
    weight tensor is the same and unchanged (its version counter); ``train()`` / ``eval()``,
    module conversions and state-dict loads free it. Changes made through ``weight.data``
    bypass the version counter: call ``kernel_cache.clear()`` after them.

    Finiteness: ``x`` is not checked, as in ``nn.Conv2d``. A NaN / inf pixel spoils, under
    ``"direct"``, the outputs whose window holds it; under ``"dft"`` (``"auto"`` picks it
    for large batches) every output of that image, since the transform mixes all pixels.
    Other images stay finite either way. The models check images first
    (:func:`capsnet.validation.check_images`).
    """

    def __init__(self, *args, weight_grad: Optional[str] = None, algorithm: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        backends.check_conv_choice(algorithm or "auto", weight_grad or "auto", who="Conv2d")
        self._algorithm, self._weight_grad = algorithm, weight_grad  # None: capsnet.backends.conv's
        # The DFT kernel transform between calls that need no gradient (inference): ops.dft.KernelCache.
        self.kernel_cache = KernelCache()

    def train(self, mode: bool = True) -> "Conv2d":
        """As ``nn.Module.train``; also frees the kernel transform kept for inference (:attr:`kernel_cache`)."""
        self.kernel_cache.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.kernel_cache.clear()  # .to(), .half(), ... may replace the weight's data in place
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.kernel_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def weight_grad(self) -> str:
        """The weight gradient this layer computes now: its own choice or the backend's, ``"auto"`` resolved."""
        return _resolve(self._algorithm, self._weight_grad, self.weight)[1]

    @weight_grad.setter
    def weight_grad(self, value: Optional[str]) -> None:
        backends.check_conv_choice(self._algorithm or "auto", value or "auto", who="Conv2d")
        self._weight_grad = value

    @property
    def algorithm(self) -> str:
        """The algorithm this layer uses now: its own choice or the backend's (``"auto"`` per call)."""
        return _resolve(self._algorithm, self._weight_grad, self.weight)[0]

    @algorithm.setter
    def algorithm(self, value: Optional[str]) -> None:
        backends.check_conv_choice(value or "auto", self._weight_grad or "auto", who="Conv2d")
        self._algorithm = value

    def forward(self, x: Tensor) -> Tensor:
        if self.groups != 1 or self.dilation != (1, 1) or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)  # nn.Conv2d's own options: its own convolution
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, algorithm=self._algorithm, weight_grad=self._weight_grad,
                      kernel_cache=self.kernel_cache)

    def _use_dft(self, x: Tensor, *, autocast: bool = False) -> bool:
        """Whether a call on ``x`` goes to :func:`~capsnet.ops.dft.dft_conv2d` (see :func:`conv2d`)."""
        return _use_dft(x, self.weight, self.stride, self.padding, self.algorithm, autocast=autocast)


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, tuple[int, int]] = 1,
    padding: Union[int, tuple[int, int]] = 0,
    *,
    algorithm: Optional[str] = None,
    weight_grad: Optional[str] = None,
    kernel_cache: Optional[KernelCache] = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (one group, dilation 1), computed by the
    algorithm chosen for this call: :class:`Conv2d`'s computation as a function.

    ``algorithm`` / ``weight_grad``: as :class:`Conv2d`'s (None: ``capsnet.backends.conv``'s).
    ``kernel_cache``: see :func:`~capsnet.ops.dft.dft_conv2d` (used on the DFT path only).
    Off the CPU, under ``torch.func`` transforms, under float16 autocast, with dual tensors
    (forward-mode AD), an empty batch or ``weight_grad="native"`` it is ``F.conv2d`` itself.

    Shape:
        x: ``(B, C, H, W)``; weight: ``(O, C, kh, kw)``; bias: ``(O,)`` or None; returns ``(B, O, H', W')``.
    """
    stride, padding = _pair(stride), _pair(padding)
    backends.check_conv_choice(algorithm or "auto", weight_grad or "auto", who="conv2d")
    algorithm, weight_grad = _resolve(algorithm, weight_grad, weight)
    if not _fast(x, weight, weight_grad):
        return F.conv2d(x, weight, bias, stride, padding)
    if _bf16_autocast(x):
        return _autocast_conv2d(x, weight, bias, stride, padding, algorithm, weight_grad, kernel_cache)
    if _use_dft(x, weight, stride, padding, algorithm):
        return dft_conv2d(x, weight, bias, stride, padding, kernel_cache=kernel_cache)
    return _direct(x, weight, bias, stride, padding, weight_grad)


def _pair(value: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _resolve(algorithm: Optional[str], weight_grad: Optional[str], weight: Tensor) -> tuple[str, str]:
    """The concrete ``(algorithm, weight_grad)`` of a call: the caller's choice, else the backend's;
    an explicit weight gradient means the direct algorithm; ``weight_grad="auto"`` by the column length."""
    algorithm, weight_grad = algorithm or backends.conv.algorithm, weight_grad or backends.conv.weight_grad
    if (algorithm == "auto" and weight_grad != "auto") or (algorithm == "dft" and weight_grad not in ("auto", "native")):
        algorithm = "direct"  # a weight gradient was asked for (by the caller or the backend): it belongs to the direct algorithm
    if weight_grad == "auto":
        rows = weight.shape[1] * weight.shape[2] * weight.shape[3]
        weight_grad = "im2col" if rows <= IM2COL_MAX_ROWS else "conv"
    return algorithm, weight_grad


def _fast(x: Tensor, weight: Tensor, weight_grad: str) -> bool:
    """Whether this project's CPU paths apply (else ``F.conv2d``)."""
    return (
        weight_grad != "native"
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[0] > 0  # an empty batch: nothing to speed up, and unfold's reshapes refuse it
        and x.shape[1] == weight.shape[1]  # else F.conv2d's own error message
        and not functorch_transforms_active()
        and (not torch.is_autocast_enabled(x.device.type) or _bf16_autocast(x))  # else autocast's F.conv2d
        # Forward-mode AD (dual tensors): the custom backwards have no forward derivative.
        and not any(forward_ad.unpack_dual(t).tangent is not None for t in (x, weight))
    )


def _direct(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, weight_grad: str) -> Tensor:
    inputs = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _Conv2d.apply(x, weight, bias, stride, padding, weight_grad)
    if weight_grad == "im2col":
        return _im2col_forward(x, weight, bias, stride, padding)[0]
    return F.conv2d(x, weight, bias, stride, padding)


def _autocast_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, algorithm: str, weight_grad: str,
                     kernel_cache: Optional[KernelCache] = None) -> Tensor:
    """Under CPU bfloat16 autocast: on bfloat16 casts (what autocast does for ``nn.Conv2d``), the
    direct algorithm or the DFT (:data:`BF16_DFT_MIN_SAVING`; see the module docstring)."""
    use_dft = _use_dft(x, weight, stride, padding, algorithm, autocast=True)
    bf16, source = torch.bfloat16, weight
    x, weight, bias = x.to(bf16), weight.to(bf16), None if bias is None else bias.to(bf16)
    with torch.autocast(x.device.type, enabled=False):
        if use_dft:  # the cache is keyed by the float32 parameter, not by this call's cast of it
            return dft_conv2d(x, weight, bias, stride, padding, kernel_cache=kernel_cache, cache_key=source)
        return _direct(x, weight, bias, stride, padding, weight_grad)


def _use_dft(x: Tensor, weight: Tensor, stride, padding, algorithm: str, *, autocast: bool = False) -> bool:
    """Whether a call goes to :func:`~capsnet.ops.dft.dft_conv2d` (see :data:`ALGORITHMS`);
    ``autocast``: under bf16 autocast, where both operands become bf16 casts."""
    if algorithm == "direct":
        return False
    if algorithm == "dft":
        return True
    if not autocast and (x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype):
        return False  # half-precision tensors: the DFT's rounding is about twice oneDNN's
    shapes = (x.shape, weight.shape, stride, padding)
    if any(_out_size(x.shape[2 + k], weight.shape[2 + k], stride[k], padding[k]) < 1 for k in range(2)):
        return False  # too small: F.conv2d's own error
    if dft_grid(*shapes) > DFT_MAX_GRID:
        return False
    return dft_macs(*shapes) * (BF16_DFT_MIN_SAVING if autocast else DFT_MIN_SAVING) <= direct_macs(*shapes)


def _bf16_autocast(x: Tensor) -> bool:
    """Whether bfloat16 autocast is on for ``x``'s device and would cast ``x`` (float32, or bf16 already;
    autocast leaves float64 alone)."""
    return (
        torch.is_autocast_enabled(x.device.type)
        and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
        and x.dtype in (torch.float32, torch.bfloat16)
    )


def _im2col_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding) -> tuple[Tensor, Tensor]:
    """The convolution as ``W (O, C kh kw) @ columns (N, C kh kw, L)``; returns the output and the columns."""
    n, out_channels = x.shape[0], weight.shape[0]
    kh, kw = weight.shape[2:]
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (N, C kh kw, L)
    # One GEMM per image against the same weights (a stride-0 batch): no copy of the columns
    # or of the output, which matmul's broadcasting makes (about half of its time).
    weights = weight.reshape(1, out_channels, -1).expand(n, -1, -1)
    height = _out_size(x.shape[2], kh, stride[0], padding[0])
    width = _out_size(x.shape[3], kw, stride[1], padding[1])
    # Written into the 4-D result (not a view of a 3-D one), so callers may modify it in place.
    out = x.new_empty(n, out_channels, height, width)
    torch.bmm(weights, cols, out=out.view(n, out_channels, height * width))
    if bias is not None:  # in place: baddbmm would first copy the broadcast bias into the output
        out += bias.view(1, out_channels, 1, 1)
    return out, cols


def _weight_grad_conv(x: Tensor, grad_out: Tensor, weight_shape, stride, padding) -> Tensor:
    """``grad_W`` as a forward convolution over the batch (see the module docstring).

    In slabs of input channels (the convolution's batch here), so that the contiguous copy
    of the transposed input that oneDNN makes stays near :data:`capsnet._slabs.CONV_SLAB` (whole, it
    is the size of ``x``); slabs were no slower than the whole.
    """
    kh, kw = weight_shape[2:]
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    # Rows and columns the strided kernel reaches; the rest of x gets no gradient weight.
    rows = stride[0] * (grad_out.shape[2] - 1) + kh
    cols = stride[1] * (grad_out.shape[3] - 1) + kw
    x_t = x[:, :, :rows, :cols].transpose(0, 1)  # (C, N, rows, cols)
    kernel = grad_out.transpose(0, 1).contiguous()  # (O, N, H', W'), once for every slab
    grad = x.new_empty(weight_shape)
    size = max(1, slab_sizes.CONV_SLAB // (x.shape[0] * rows * cols))
    for start in range(0, x_t.shape[0], size):
        part = F.conv2d(x_t[start : start + size], kernel, dilation=stride)  # (c, O, kh, kw)
        grad[:, start : start + size] = part.transpose(0, 1)
    return grad


def _input_grad_phases(grad_out: Tensor, x_shape, weight: Tensor, stride, padding) -> Tensor:
    """The input gradient of a strided convolution as one stride-1 convolution per polyphase component.

    Pixel ``(s i + a, s j + b)`` of the (padded) input meets only the taps ``(s p + a, s q + b)``::

        grad_x[n, c, s i + a, s j + b] = sum_{o, p, q} grad_out[n, o, i - p, j - q] w[o, c, s p + a, s q + b]

    a full correlation of ``grad_out`` with the flipped, transposed sub-kernel ``w[:, :, a::s, b::s]``.
    Same multiply-adds as the transposed convolution, but as forward convolutions, which oneDNN
    runs 2.4x faster in bfloat16 (see the module docstring). Differentiable ops only.
    """
    n, channels, height, width = x_shape
    (sh, sw), (ph, pw) = stride, padding
    grad = grad_out.new_zeros(n, channels, height + 2 * ph, width + 2 * pw)
    for a in range(min(sh, weight.shape[2])):
        for b in range(min(sw, weight.shape[3])):
            part = weight[:, :, a::sh, b::sw]  # (O, C, kp, kq)
            kp, kq = part.shape[2:]
            full = F.conv2d(grad_out, part.flip(2, 3).transpose(0, 1), padding=(kp - 1, kq - 1))  # (N, C, H' + kp - 1, W' + kq - 1)
            phase = grad[:, :, a::sh, b::sw]
            rows, cols = min(full.shape[2], phase.shape[2]), min(full.shape[3], phase.shape[3])
            phase[:, :, :rows, :cols] = full[:, :, :rows, :cols]
    return grad[:, :, ph : ph + height, pw : pw + width]


def _input_grad(grad_out: Tensor, x: Tensor, weight: Tensor, stride, padding) -> Tensor:
    """PyTorch's input gradient, in chunks of images of about :data:`capsnet._slabs.CONV_SLAB` input elements
    (oneDNN's temporaries for the whole batch are as large as the input again); for strided
    convolutions in half precision :func:`_input_grad_phases` instead."""
    if x.dtype in (torch.bfloat16, torch.float16) and stride != (1, 1):
        return _input_grad_phases(grad_out, x.shape, weight, stride, padding)

    def piece(g: Tensor, xs: Tensor) -> Tensor:
        return convolution_input_grad(g, xs, weight, stride, padding)

    n = x.shape[0]
    chunks = -(-n // max(1, slab_sizes.CONV_SLAB // x[0].numel()))
    if torch.is_grad_enabled() or chunks == 1:  # create_graph=True: one differentiable call
        return piece(grad_out, x)
    size = -(-n // chunks)  # equal chunks (4 x 32 at batch 128, not 40, 40, 40, 8)
    grad_x = torch.empty_like(x)
    for start in range(0, x.shape[0], size):
        grad_x[start : start + size] = piece(grad_out[start : start + size], x[start : start + size])
    return grad_x


class _Conv2d(torch.autograd.Function):
    """``F.conv2d(x, W, b, stride, padding)`` with the weight gradient of ``weight_grad``.

    The backward is built from differentiable ops (``convolution_backward`` for the input
    gradient, ``conv2d`` / ``matmul`` for the weights), so ``create_graph=True`` works.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, weight_grad):
        ctx.stride, ctx.padding, ctx.weight_grad, ctx.has_bias = stride, padding, weight_grad, bias is not None
        if weight_grad == "im2col":
            out, cols = _im2col_forward(x, weight, bias, stride, padding)
            # The columns only serve the weight gradient. Kept when no larger than the input;
            # else (any overlapping kernel: the CapsNet's and the EM models' Conv1, whose
            # columns are 40 times the images) unfolded again in the backward, a small cost
            # that lowers every peak of memory in between.
            keep = ctx.needs_input_grad[1] and cols.numel() <= x.numel()
            ctx.save_for_backward(x, weight, *([cols] if keep else []))
        else:
            out = F.conv2d(x, weight, bias, stride, padding)
            ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *cols = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        grad_out = grad_out.contiguous()
        if need_w:
            if ctx.weight_grad == "im2col":
                if torch.is_grad_enabled() or not cols:  # create_graph=True (columns with their history), or not kept
                    cols = [F.unfold(x, weight.shape[2:], padding=ctx.padding, stride=ctx.stride)]
                n, out_channels = grad_out.shape[:2]
                per_image = torch.bmm(grad_out.view(n, out_channels, -1), cols[0].transpose(1, 2))  # (N, O, C kh kw)
                grad_w = per_image.sum(0).view(weight.shape)
            else:
                grad_w = _weight_grad_conv(x, grad_out, weight.shape, ctx.stride, ctx.padding)
        if need_x:  # after the weights, whose temporaries are gone by then (a lower peak of memory)
            grad_x = _input_grad(grad_out, x, weight, ctx.stride, ctx.padding)
        if need_b and ctx.has_bias:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None

"""Convolution as a bilinear algorithm over the discrete Fourier transform (CPU, large kernels).

A strided convolution is a stride-1 correlation of its polyphase components (space to
depth: ``x'[c, a, b, i, j] = x[c, s i + a, s j + b]``, the kernel likewise), and a
stride-1 correlation of a ``P x Q`` input with a ``Kp x Kq`` kernel is, on its
``(P - Kp + 1) x (Q - Kq + 1)`` valid outputs, the circular correlation of size ``P x Q``
(no index wraps), so by the convolution theorem, with ``X = DFT(x')``, ``W = DFT(w')``::

    y[n, o] = IDFT( sum_c' X[n, c', f] * conj(W[o, c', f]) )        (every frequency f)

The sum over channels is, per frequency, one matrix product ``(N, C') @ (C', O)``. The
input and kernel are real, so only the non-redundant half of the spectrum is kept, and each
complex product uses Gauss's three real multiplications (``k1 = a (c + d)``,
``k2 = c (b - a)``, ``k3 = d (a + b)``; real part ``k1 - k3``, imaginary ``k1 + k2``). Every
step is linear in ``x`` or in ``w``: the whole convolution is

    X_m = T_x[m] x'    W_m = T_w[m] w'    M_m = X_m^T W_m    y = sum_m T_y[m] M_m

over ``M ~ 1.5 P Q`` real components ``m``, with the three transforms precomputed from
the DFT matrices (:func:`plan`). For the CapsNet's PrimaryCaps (256 -> 256, 9x9, stride 2
on 20x20: ``P = Q = 10``, ``M = 148``) the products take 148 x 1024 multiply-adds per output
channel and image where the direct convolution takes 36 x 20736, 4.9 times fewer; with the
transforms about 3 times fewer in all. Transforms and products are plain matmuls
(``torch.mm``/``bmm``), so the speed is the BLAS's. The DFT is exact in exact arithmetic
and well conditioned (unlike Winograd's minimal filtering at these sizes): in float64 the
result equals ``F.conv2d`` to about 1e-13, in float32 it is as close to the float64
result as oneDNN's direct convolution (``tests/test_dft.py``).

The backward is the same three kinds of matmul, transposed; nothing is kept for it but
``x`` and ``w``. Forward and backward work in slabs of input channels, so the transforms
(the kernel's is the largest, ``M x C' x O``) exist one slab at a time; what remains
whole is the ``(M, N, O)`` products, their gradient, and the input and its gradient.
In bfloat16 (``Conv2d`` under CPU autocast) all channels form one slab, so that each sum
over channels stays inside one matmul (float32 accumulation, one rounding); the result is
within about twice the rounding error of the direct bf16 convolution (``benchmarks/bf16.py``).

The transforms are dense ``M x P Q`` matrices, so the algorithm is for small grids
(:data:`MAX_GRID`), i.e. for large kernels with large strides on small maps.

Non-finite input is not checked here (a check costs a pass over the data) and does not
stay local: every frequency mixes every pixel, so one NaN or inf pixel makes every output
of its image NaN, where the direct convolution spoils only the outputs whose window holds
it (``tests/test_input_validation.py``); the other images of the batch are untouched. The
models refuse non-finite images before any convolution (:func:`capsnet.validation.check_images`),
and so does the CLI; call the layer directly only with finite input.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _slabs as slab_sizes
from .._shapes import conv_output_size as _out_size

__all__ = ["DFTPlan", "KernelCache", "MAX_GRID", "plan", "dft_conv2d", "dft_grid", "dft_macs", "direct_macs"]

#: Largest polyphase grid ``P Q`` (the transforms are about ``1.5 (P Q)^2`` numbers).
MAX_GRID = 1024


@dataclass(frozen=True)
class DFTPlan:
    """Sizes of one convolution as a bilinear DFT algorithm; :meth:`transforms` gives its matrices."""

    stride: tuple[int, int]
    kernel: tuple[int, int]  # Kp, Kq: the polyphase kernel
    grid: tuple[int, int]  # P, Q: the polyphase input, also the DFT size
    out: tuple[int, int]  # Ho, Wo

    @functools.cached_property
    def frequencies(self) -> list[tuple[int, int, bool]]:
        """``(f1, f2, real)`` of the distinct frequencies of a real ``P x Q`` signal."""
        p, q = self.grid
        found = []
        for f1 in range(p):
            for f2 in range(q // 2 + 1):  # half the spectrum, plus ...
                edge = f2 == 0 or 2 * f2 == q  # ... the columns that are their own mirror image,
                if edge and (-f1) % p < f1:  # where f1 and -f1 are conjugate: keep one of each pair
                    continue
                found.append((f1, f2, edge and (-f1) % p == f1))
        return found

    @functools.cached_property
    def components(self) -> int:
        """``M``: one real product per real frequency, three per complex one."""
        return sum(1 if real else 3 for _, _, real in self.frequencies)

    def transforms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``tx`` ``(M, P Q)``, ``tw`` ``(M, Kp Kq)``, ``ty`` ``(M, Ho Wo)`` (float64): component ``m``
        of the input, of the kernel, and its share of the output."""
        return _matrices(self)


@functools.lru_cache(maxsize=64)
def plan(out: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]) -> DFTPlan:
    """The bilinear algorithm for a convolution with ``kernel`` and ``stride`` and ``out`` outputs per side."""
    (ho, wo), (kh, kw), (sh, sw) = out, kernel, stride
    kp, kq = -(-kh // sh), -(-kw // sw)  # the polyphase kernel
    return DFTPlan((sh, sw), (kp, kq), (ho - 1 + kp, wo - 1 + kq), (ho, wo))  # P, Q: what the outputs read


@functools.lru_cache(maxsize=16)
def _matrices(plan: DFTPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (p, q), (kp, kq), (ho, wo) = plan.grid, plan.kernel, plan.out
    i, j = np.arange(p)[:, None], np.arange(q)[None, :]
    ki, kj = np.arange(kp)[:, None], np.arange(kq)[None, :]
    yi, yj = np.arange(ho)[:, None], np.arange(wo)[None, :]
    tx, tw, ty = [], [], []
    for f1, f2, real in plan.frequencies:
        x_f = np.exp(-2j * np.pi * (f1 * i / p + f2 * j / q))  # X_f = sum x e^{-i theta}
        w_f = np.exp(2j * np.pi * (f1 * ki / p + f2 * kj / q))  # conj(W_f): a correlation
        y_f = np.exp(2j * np.pi * (f1 * yi / p + f2 * yj / q)) / (p * q)  # the inverse DFT
        if real:  # one real product
            tx.append(x_f.real), tw.append(w_f.real), ty.append(y_f.real)
            continue
        # A complex frequency stands for its conjugate too: y += 2 Re(Y_f y_f), Y_f = (c + i d)(a + i b)
        c, d, a, b = x_f.real, x_f.imag, w_f.real, w_f.imag
        re, im = 2 * y_f.real, 2 * y_f.imag  # 2 Re(Y y_f) = Re(Y) re - Im(Y) im
        tx += [c + d, c, d]
        tw += [a, b - a, a + b]
        ty += [re - im, -im, -re]  # Re(Y) = k1 - k3, Im(Y) = k1 + k2
    matrices = tuple(np.stack([t.ravel() for t in ts]) for ts in (tx, tw, ty))
    for m in matrices:
        m.setflags(write=False)  # cached: shared by every later call
    return matrices


def _plan_for(x_shape, w_shape, stride, padding) -> DFTPlan:
    out = tuple(_out_size(x_shape[2 + k], w_shape[2 + k], stride[k], padding[k]) for k in range(2))
    return plan(out, tuple(w_shape[2:]), tuple(stride))


def direct_macs(x_shape, w_shape, stride, padding) -> int:
    """Multiply-adds of the direct convolution."""
    (o, c, kh, kw), n = w_shape, x_shape[0]
    ho, wo = (_out_size(x_shape[2 + k], w_shape[2 + k], stride[k], padding[k]) for k in range(2))
    return n * o * c * kh * kw * ho * wo


def dft_grid(x_shape, w_shape, stride, padding) -> int:
    """``P Q``: the size of the polyphase grid (and of the DFT)."""
    return math.prod(_plan_for(x_shape, w_shape, stride, padding).grid)


def dft_macs(x_shape, w_shape, stride, padding) -> int:
    """Multiply-adds of :func:`dft_conv2d`: the three transforms and the products."""
    p = _plan_for(x_shape, w_shape, stride, padding)
    (o, c), n = w_shape[:2], x_shape[0]
    channels = c * p.stride[0] * p.stride[1]
    per_component = n * channels * math.prod(p.grid) + o * channels * math.prod(p.kernel)
    per_component += n * o * math.prod(p.out) + n * o * channels
    return p.components * per_component


def _transforms(p: DFTPlan, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.tensor(t, dtype=like.dtype, device=like.device) for t in p.transforms())


def _pads(shape, p: DFTPlan, padding) -> tuple[int, int, int, int]:
    """``F.pad`` amounts that zero-pad (or, negative, crop) a map to the ``P s x Q s`` pixels of the polyphase input."""
    (sh, sw), (pp, qq) = p.stride, p.grid
    return (padding[1], qq * sw - shape[3] - padding[1], padding[0], pp * sh - shape[2] - padding[0])


def _fit(x: Tensor, p: DFTPlan, padding) -> Tensor:
    """``x`` padded or cropped to the polyphase input's pixels; ``x`` itself when it fits."""
    pads = _pads(x.shape, p, padding)
    return F.pad(x, pads) if any(pads) else x


def _unfit(g: Tensor, p: DFTPlan, x_shape, padding) -> Tensor:
    """The adjoint of :func:`_fit`."""
    pads = _pads(x_shape, p, padding)
    return F.pad(g, tuple(-k for k in pads)) if any(pads) else g


def _kernel_fit(w: Tensor, p: DFTPlan) -> Tensor:
    """The kernel zero-padded to ``Kp s x Kq s`` taps."""
    (sh, sw), (kp, kq) = p.stride, p.kernel
    pads = (0, kq * sw - w.shape[3], 0, kp * sh - w.shape[2])
    return F.pad(w, pads) if any(pads) else w


def _phases(t: Tensor, p: DFTPlan, side: tuple[int, int]) -> Tensor:
    """``(B, C, side s)`` maps as a ``(C, s, s, B, side)`` view: the polyphase components (space to depth)."""
    (sh, sw), (rows, cols) = p.stride, side
    return t.view(t.shape[0], t.shape[1], rows, sh, cols, sw).permute(1, 3, 5, 0, 2, 4)


def _rows(t: Tensor) -> Tensor:
    """A ``(C, s, s, B, h, w)`` view as ``(C s s B, h w)`` rows (a copy)."""
    return t.reshape(-1, t.shape[-2] * t.shape[-1])


def _input_transform(tx: Tensor, x: Tensor, p: DFTPlan) -> Tensor:
    """``(M, C s s, N)``: component ``m`` of every polyphase map of a fitted ``x`` ``(N, C, P s, Q s)``."""
    return torch.mm(tx, _rows(_phases(x, p, p.grid)).T).view(p.components, -1, x.shape[0])


def _kernel_transform(tw: Tensor, w: Tensor, p: DFTPlan) -> Tensor:
    """``(M, C s s, O)``: component ``m`` of every polyphase kernel of ``w`` ``(O, C, kh, kw)``."""
    return torch.mm(tw, _rows(_phases(_kernel_fit(w, p), p, p.kernel)).T).view(p.components, -1, w.shape[0])


def _slabs(channels: int, p: DFTPlan, out_channels: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Ranges of input channels whose kernel transform has about :data:`capsnet._slabs.DFT_SLAB` elements (equal slabs).

    Half precisions get one slab: then each sum over channels is one matmul, which oneDNN
    accumulates in float32 and rounds once; slabs would add their products in bf16 (1.3x the
    error, and slower: ``benchmarks/bf16.py``).
    """
    if dtype in (torch.bfloat16, torch.float16):
        return [(0, channels)]
    size = max(1, slab_sizes.DFT_SLAB // (p.components * out_channels * p.stride[0] * p.stride[1]))
    count = -(-channels // size)
    size = -(-channels // count)
    return [(start, min(start + size, channels)) for start in range(0, channels, size)]


class KernelCache:
    """The kernel transform of a :func:`dft_conv2d` call that needed no gradient, for the next such call.

    ``W_m = T_w w'`` depends on the weight alone, and at inference batch sizes computing it is
    a large share of the convolution (a ``(M, Kp Kq) @ (Kp Kq, C' O)`` product with a short
    inner dimension: memory-bound). A cache holds one transform with the weight tensor it came
    from, and hits only for that same tensor object at the same storage address, dtype, shape
    and version counter (which every in-place change bumps: optimiser steps,
    ``load_state_dict``, ``copy_``) and the same plan; anything else transforms again.
    :class:`capsnet.ops.Conv2d` keeps one per layer and also clears it in ``train()`` /
    ``eval()``, module conversions (``.to()``, ``.half()``, ...) and state-dict loads. Not
    cached: weights that are inference tensors (no version counter), and transforms computed
    in slabs (:func:`_slabs`: float32 kernels above :data:`capsnet._slabs.DFT_SLAB`), so it holds
    no more than one forward pass makes anyway, between the calls. Changes through ``.data``
    bypass the version counter: :meth:`clear` after them. Never saved (pickling drops it).
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._entry = None  # (source weight, key, transform), replaced as one object

    @staticmethod
    def _key(weight: Tensor, key: tuple) -> tuple:
        return (weight.data_ptr(), weight.dtype, weight.shape, weight.device, weight._version, *key)

    def get(self, weight: Tensor, key: tuple) -> Optional[Tensor]:
        """The transform stored for ``weight`` (the same tensor, unchanged since) and ``key``, else None."""
        entry = self._entry
        if entry is None or entry[0] is not weight or weight.is_inference() or entry[1] != self._key(weight, key):
            return None
        return entry[2]

    def put(self, weight: Tensor, key: tuple, value: Tensor) -> None:
        """Keep ``value`` for ``weight`` and ``key`` (nothing for an inference-mode weight)."""
        self._entry = None if weight.is_inference() else (weight, self._key(weight, key), value)

    def __getstate__(self):
        return "empty"  # a true value, so that unpickling calls __setstate__

    def __setstate__(self, state) -> None:
        self.clear()

    def __deepcopy__(self, memo) -> "KernelCache":
        return KernelCache()

    def __repr__(self) -> str:
        return f"KernelCache({'empty' if self._entry is None else tuple(self._entry[2].shape)})"


def _forward(x: Tensor, w: Tensor, bias: Optional[Tensor], p: DFTPlan, padding, cache: Optional[tuple] = None) -> Tensor:
    """The convolution, slab by slab of input channels; ``cache``: ``(KernelCache, source weight)`` or None."""
    n, o = x.shape[0], w.shape[0]
    tx, tw, ty = _transforms(p, x)
    x = _fit(x, p, padding)
    products = x.new_empty(p.components, n, o)
    slabs = _slabs(x.shape[1], p, o, x.dtype)
    cached = None
    if cache is not None and len(slabs) == 1:
        store, source = cache
        key = (p, w.dtype, w.device)
        cached = store.get(source, key)
        if cached is None:
            cached = _kernel_transform(tw, w, p)
            store.put(source, key, cached)
    for k, (start, stop) in enumerate(slabs):
        # This slab's polyphase input and kernel as rows, then their transforms (M, c s s, N or O).
        x_m = _input_transform(tx, x[:, start:stop], p)
        w_m = cached if cached is not None else _kernel_transform(tw, w[:, start:stop], p)
        torch.baddbmm(products, x_m.transpose(1, 2), w_m, beta=1 if k else 0, out=products)  # (M, N, O)
        del x_m, w_m  # before the next slab's are made: one slab of temporaries at a time
    # Written into the 4-D result (not a view of a 2-D one), so callers may modify it in place.
    y = x.new_empty(n, o, *p.out)
    torch.mm(products.view(p.components, n * o).T, ty, out=y.view(n * o, -1))  # (N O, Ho Wo)
    if bias is not None:
        y += bias.view(1, o, 1, 1)
    return y


def _backward(grad_y: Tensor, x: Tensor, w: Tensor, p: DFTPlan, padding, need_x: bool, need_w: bool):
    """Gradients of ``x`` and ``w``, slab by slab of input channels (the transforms exist one slab at a time)."""
    n, o = x.shape[0], w.shape[0]
    tx, tw, ty = _transforms(p, x)
    grad_products = torch.mm(ty, grad_y.reshape(n * o, -1).T).view(-1, n, o)  # (M, N, O)
    xf = _fit(x, p, padding)
    grad_xf = torch.empty_like(xf) if need_x else None
    grad_w = torch.empty_like(w) if need_w else None
    kh, kw = w.shape[2:]
    for start, stop in _slabs(xf.shape[1], p, o, xf.dtype):
        if need_w:  # needs the input's transform
            x_m = _input_transform(tx, xf[:, start:stop], p)
            grad_w_m = torch.bmm(x_m, grad_products)  # (M, c s s, O)
            grad_rows = torch.mm(grad_w_m.view(p.components, -1).T, tw)  # (c s s O, Kp Kq)
            grad_wf = w.new_empty(o, stop - start, p.kernel[0] * p.stride[0], p.kernel[1] * p.stride[1])
            _phases(grad_wf, p, p.kernel).copy_(grad_rows.view(-1, *p.stride, o, *p.kernel))
            grad_w[:, start:stop] = grad_wf[:, :, :kh, :kw]  # the taps of the padded kernel that exist
            del x_m, grad_w_m, grad_rows, grad_wf
        if need_x:  # needs the kernel's
            w_m = _kernel_transform(tw, w[:, start:stop], p)
            grad_x_m = torch.bmm(w_m, grad_products.transpose(1, 2))  # (M, c s s, N)
            grad_rows = torch.mm(grad_x_m.view(p.components, -1).T, tx)  # (c s s N, P Q)
            _phases(grad_xf[:, start:stop], p, p.grid).copy_(grad_rows.view(-1, *p.stride, n, *p.grid))
            del w_m, grad_x_m, grad_rows
    grad_x = _unfit(grad_xf, p, x.shape, padding) if need_x else None
    return grad_x, grad_w


class _DFTConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        p = _plan_for(x.shape, weight.shape, stride, padding)
        ctx.plan, ctx.padding, ctx.has_bias = p, padding, bias is not None
        ctx.save_for_backward(x, weight)
        return _forward(x, weight, bias, p, padding)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = None
        if (need_x or need_w) and torch.is_grad_enabled():  # create_graph=True: the same algorithm, through autograd
            y = _differentiable(x, weight, ctx.plan, ctx.padding)
            wanted = [t for t, need in ((x, need_x), (weight, need_w)) if need]
            found = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
            grad_x = next(found) if need_x else None
            grad_w = next(found) if need_w else None
        elif need_x or need_w:
            grad_x, grad_w = _backward(grad_y.contiguous(), x, weight, ctx.plan, ctx.padding, need_x, need_w)
        grad_b = grad_y.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


def _differentiable(x: Tensor, w: Tensor, p: DFTPlan, padding) -> Tensor:
    """:func:`_forward` without slabs, from differentiable ops (for ``create_graph=True``)."""
    n, o = x.shape[0], w.shape[0]
    tx, tw, ty = _transforms(p, x)
    x_m, w_m = _input_transform(tx, _fit(x, p, padding), p), _kernel_transform(tw, w, p)
    products = torch.bmm(x_m.transpose(1, 2), w_m)
    return torch.mm(products.view(p.components, n * o).T, ty).view(n, o, *p.out)


def dft_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=(1, 1),
    padding=(0, 0),
    *,
    kernel_cache: Optional[KernelCache] = None,
    cache_key: Optional[Tensor] = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (zero padding, no dilation, one group) by the bilinear DFT algorithm.

    Equal to the direct convolution up to rounding; fewer multiply-adds when the kernel is
    large and the batch not tiny (:func:`dft_macs` against :func:`direct_macs`).

    ``kernel_cache``: a :class:`KernelCache` that keeps the kernel's transform from one call
    that needs no gradient to the next (inference), while the weight is unchanged; the
    result is the same bits. ``cache_key``: the tensor whose identity and version key the
    cache (default ``weight``; a layer that passes a cast of its parameter names the parameter).

    Shape:
        x: ``(N, C, H, W)``; weight: ``(O, C, kh, kw)``; bias: ``(O,)`` or None; returns
        ``(N, O, H', W')`` with ``H' = (H + 2 padding - kh) // stride + 1`` (likewise ``W'``).
        A ValueError names what is wrong: shapes, strides or paddings, mixed dtypes, or a
        polyphase grid above :data:`MAX_GRID`. A NaN / inf in ``x`` is not checked and makes
        every output of its image NaN (the module docstring says why).
    """
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    stride, padding = pair(stride), pair(padding)
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"dft_conv2d expects x (N, C, H, W) and weight (O, C, kh, kw), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not all(isinstance(v, int) for v in stride + padding) or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"dft_conv2d needs integer strides >= 1 and paddings >= 0, got stride={stride} padding={padding}")
    if any(_out_size(x.shape[2 + k], weight.shape[2 + k], stride[k], padding[k]) < 1 for k in range(2)):
        raise ValueError(f"dft_conv2d: input {tuple(x.shape)} is smaller than kernel {tuple(weight.shape[2:])} with padding {padding}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        found = (x.dtype, weight.dtype) + ((bias.dtype,) if bias is not None else ())
        raise ValueError(f"dft_conv2d needs input, weight and bias of one dtype, got {found}")
    p = _plan_for(x.shape, weight.shape, stride, padding)
    if math.prod(p.grid) > MAX_GRID:
        raise ValueError(
            f"dft_conv2d: a polyphase grid of {p.grid[0]} x {p.grid[1]} is above MAX_GRID={MAX_GRID} "
            "(its transforms grow with the square); use the direct convolution (F.conv2d)"
        )
    if x.shape[0] == 0:  # nothing to transform
        return F.conv2d(x, weight, bias, stride, padding)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _DFTConv2d.apply(x, weight, bias, stride, padding)
    cache = None if kernel_cache is None else (kernel_cache, weight if cache_key is None else cache_key)
    return _forward(x, weight, bias, p, padding, cache)

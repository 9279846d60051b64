"""Pure functions shared by every capsule model: norms, squash and the losses.

Axis letters used throughout the package: ``B`` batch, ``I`` input (child)
capsules, ``J`` output (parent) capsules, ``D`` pose dimension, ``K`` kernel,
``H W`` spatial.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .validation import assert_on_device, check_labels

__all__ = ["safe_norm", "squash", "margin_loss", "reconstruction_loss", "spread_loss"]
__all__ += ["multi_digit_classes", "multi_hot", "two_digit_correct", "two_digit_accuracy"]
__all__ += ["matched_reconstruction_loss", "sigmoid_cross_entropy", "activation_cross_entropy"]

#: Added under the square root of every norm: keeps ``d|s|/ds`` finite at s = 0
#: (the gradient of a plain norm is 0/0 there, which turns a model's weights NaN).
NORM_EPS = 1e-8


def _overflow_scale(x: Tensor, dim: int) -> Tensor:
    """``m = max(1, max |x|)`` along ``dim`` (kept, size 1), detached: ``|x / m|^2 <= D`` cannot overflow.

    ``m`` is a constant to autograd and the callers' results do not depend on it (to
    rounding), so values and gradients are those of the unscaled formula; for
    ``max |x| <= 1`` (``m = 1``) they are bit-identical to it. NaN / inf in ``x`` make
    ``m`` non-finite, which keeps them to their own capsule.
    """
    if x.dim() and x.shape[dim] == 0:
        return x.new_ones(())  # a max over nothing is undefined; there is nothing to scale
    # abs().amax(): linalg.vector_norm(ord=inf) is the same value but ~10x slower on CPU.
    return x.detach().abs().amax(dim=dim, keepdim=True).clamp_min(1.0)


def _representable(eps: float, x: Tensor) -> float:
    """``eps`` raised to the smallest normal number of ``x``'s dtype: 1e-8 is 0 in float16."""
    return max(eps, torch.finfo(x.dtype).tiny) if x.dtype.is_floating_point else eps


def safe_norm(x: Tensor, dim: int = -1, keepdim: bool = False, *, eps: float = NORM_EPS) -> Tensor:
    """Euclidean norm ``sqrt(sum(x**2) + eps)``, finite with a finite gradient at zero.

    Computed as ``m sqrt(sum((x / m)**2) + eps / m**2)`` with ``m = max(1, max |x|)``, so it
    stays finite wherever the norm itself is representable (``|x|^2`` overflows from
    ``|x| > 1.8e19`` in float32).

    Shape:
        x: ``(..., D, ...)``; returns ``x`` without ``dim`` (or with size 1 there if ``keepdim``).
    """
    m = _overflow_scale(x, dim)
    eps = _representable(eps, x)
    norm = m * torch.sqrt((x / m).pow(2).sum(dim=dim, keepdim=True) + eps * m.reciprocal().square())
    return norm if keepdim else norm.squeeze(dim)


#: ``squash(kind=...)``: ``"sabour"`` is Eq. 1 of Sabour et al. 2017, ``"efficient"`` the squash of
#: Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021, Methods: primary capsules).
SQUASH_KINDS = ("sabour", "efficient")


def squash(s: Tensor, dim: int = -1, *, eps: float = 0.0, kind: str = "sabour") -> Tensor:
    """Squash non-linearity, Eq. 1 of Sabour et al. 2017 (``kind="efficient"``: Mazzia et al. 2021).

    ``v = |s|^2 / (1 + |s|^2) * s / |s|``: short vectors shrink to almost zero,
    long ones to just below unit length; the direction is kept. Exact to rounding for
    every ``|s| > 0``; ``squash(0) = 0`` with a gradient there of exactly 0 (Eq. 1 is
    second order at 0), finite, not ``0/0``.

    ``eps > 0`` adds ``eps`` to ``|s|^2`` under the square root, the guard much capsule
    code uses: it bends Eq. 1 for ``|s|`` up to about ``sqrt(eps)`` (1e-8: 29% low at
    ``|s| = 1e-4``), so the default is 0, the paper's formula.

    ``kind="efficient"``: ``v = (1 - 1 / exp(|s|)) s / |s|`` of Efficient-CapsNet (Mazzia,
    Salvetti & Chiaberge 2021), see :func:`_squash_efficient`; ``eps`` means the same there.

    Shape:
        s: ``(..., D, ...)`` with the capsule dimension at ``dim``; returns the same shape.
    """
    if kind != "sabour":
        if kind not in SQUASH_KINDS:
            raise ValueError(f"squash kind must be one of {SQUASH_KINDS}, got {kind!r}")
        return _squash_efficient(s, dim, eps=eps)
    # Eq. 1 in t = s / m, m = max(1, max |s|): with |s|^2 = m^2 |t|^2 the m^2 cancels,
    # v = |t|^2 / ((m^-2 + |t|^2) sqrt(|t|^2 + eps m^-2)) t. Unscaled, |s|^3 overflows
    # from |s| > 7e12 in float32 and the capsule came out 0 (inf / inf = NaN from 1.8e19).
    m = _overflow_scale(s, dim)
    t = s / m
    sq = t.pow(2).sum(dim=dim, keepdim=True)
    inv_m2 = m.reciprocal().square()
    r2 = sq + eps * inv_m2
    # The guard sits where the 0/0 is, and only there: at r2 = 0 (s = 0, or |s|^2 below the
    # dtype's smallest subnormal, where Eq. 1 rounds to 0 too) the scale is 0, and the
    # square root sees 1 instead of 0, so its infinite slope never meets the zero upstream
    # gradient (0 * inf = NaN); for r2 > 0 nothing changes.
    nonzero = r2 > 0
    scale = sq / ((inv_m2 + sq) * torch.sqrt(torch.where(nonzero, r2, 1.0)))
    return torch.where(nonzero, scale, 0.0) * t


def _squash_efficient(s: Tensor, dim: int, *, eps: float) -> Tensor:
    """``v = (1 - 1 / e^{|s|}) s / |s|``, the squash of Mazzia et al. 2021, exact to rounding.

    The factor ``g(|s|) = (1 - e^{-|s|}) / |s|`` is written ``-expm1(-|s|) / |s|``: for
    small ``|s|`` ``1 - e^{-|s|}`` cancels to nothing in floating point, ``expm1`` does not.
    ``g -> 1`` as ``s -> 0``, so ``v ~ s`` there: ``squash(0) = 0`` with the identity as its
    Jacobian (not 0 as for Eq. 1 of Sabour et al., which is second order at 0). Large norms
    give ``e^{-|s|} = 0`` and ``v = s / |s|``, length 1, with no overflow (same scaling by
    ``m = max(1, max |s|)`` as Eq. 1).
    """
    m = _overflow_scale(s, dim)
    t = s / m
    r2 = t.pow(2).sum(dim=dim, keepdim=True) + eps * m.reciprocal().square()  # |t|^2 (+ eps / m^2)
    # The guard sits at the 0/0, r2 = 0 (s = 0, or |s|^2 below the smallest subnormal), and
    # only there: the square root sees 1 instead of 0 (its infinite slope would meet a zero
    # upstream gradient, 0 * inf = NaN) and the factor takes its limit, g(0) = 1, i.e. m per
    # unit of t (v = g(|s|) s = g m t).
    nonzero = r2 > 0
    r_t = torch.sqrt(torch.where(nonzero, r2, 1.0))  # |s| / m
    scale = -torch.expm1(-m * r_t) / r_t  # (1 - e^{-|s|}) / |s| * m
    return torch.where(nonzero, scale, m) * t


def _targets_as_float(targets: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Integer labels ``(B,)`` to one-hot; multi-hot ``(B, J)`` is passed through."""
    if targets.dim() == 1:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise ValueError(f"integer class labels expected for targets of shape (B,), got dtype {targets.dtype}")
        check_labels(targets, like.shape[0], num_classes)  # the batch size and the range
        # A comparison, not one_hot: one_hot re-checks the range with a host-device sync.
        return (targets.unsqueeze(1) == torch.arange(num_classes, device=targets.device)).to(like.dtype)
    if targets.shape != like.shape:
        raise ValueError(f"targets must be (B,) labels or (B, J) = {tuple(like.shape)} multi-hot, got {tuple(targets.shape)}")
    if targets.dtype == torch.bool or not targets.numel():
        return targets.to(like.dtype)
    binary = ((targets == 0) | (targets == 1)).all()
    if targets.device.type == "cuda":  # no host-device sync inside a training step
        assert_on_device(binary, "multi-hot targets must hold only 0 and 1")
        return targets.to(like.dtype)
    if not bool(binary):
        bad = targets[(targets != 0) & (targets != 1)]
        raise ValueError(
            f"multi-hot targets must hold only 0 and 1, got {bad.numel()} other value(s), e.g. {bad[0].item()}; "
            "mark each present class with 1 and every other class with 0"
        )
    return targets.to(like.dtype)


def margin_loss(
    lengths: Tensor,
    targets: Tensor,
    *,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> Tensor:
    """Margin loss, Eq. 4 of Sabour et al. 2017, summed over classes, mean over the batch.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2``.
    ``targets`` are integer labels ``(B,)`` or a multi-hot ``(B, J)`` (MultiMNIST: two ones).

    Shape:
        lengths: ``(B, J)`` capsule lengths; targets: ``(B,)`` or ``(B, J)``; returns a scalar.
    """
    if lengths.dim() != 2:
        raise ValueError(f"lengths must be (B, J), got shape {tuple(lengths.shape)}")
    t = _targets_as_float(targets, lengths.shape[1], lengths)
    # The targets select the terms rather than multiply them: a square that overflows in
    # the other term would give 0 * inf = NaN where Eq. 4 says +inf.
    present = torch.where(t > 0, t * torch.relu(m_pos - lengths).pow(2), 0.0)
    absent = torch.where(t < 1, lam * (1.0 - t) * torch.relu(lengths - m_neg).pow(2), 0.0)
    # Sum over classes, mean over the batch; an empty batch (a torchrun shard) gives 0, not 0/0.
    return (present + absent).sum() / max(lengths.shape[0], 1)


def reconstruction_loss(reconstruction: Tensor, images: Tensor, *, weight: float = 0.0005) -> Tensor:
    """Sum of squared pixel errors per image, mean over the batch, times ``weight`` (Sabour et al. 2017, Sec. 4.1).

    Shape:
        reconstruction: ``(B, ...)``; images: same number of elements per sample; returns a scalar.
    """
    if reconstruction.dim() < 1 or images.dim() < 1:
        raise ValueError(
            f"reconstruction and images must be (B, ...) batches, got shapes {tuple(reconstruction.shape)} and "
            f"{tuple(images.shape)}; add the batch axis with x[None]"
        )
    batch, pixels = reconstruction.shape[0], math.prod(reconstruction.shape[1:])
    if images.shape[0] != batch or math.prod(images.shape[1:]) != pixels:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and images {tuple(images.shape)} must hold the same pixels per sample"
        )
    if reconstruction.dtype in (torch.float16, torch.bfloat16):  # a decoder under autocast: sum in float32
        reconstruction = reconstruction.float()
    diff = reconstruction.reshape(batch, pixels) - images.reshape(batch, pixels)
    # Sum over pixels, mean over the batch; an empty batch (a torchrun shard) gives 0, not 0/0.
    return weight * diff.pow(2).sum() / max(batch, 1)


def spread_loss(activations: Tensor, targets: Tensor, *, margin: float) -> Tensor:
    """Spread loss, Eq. 3 of Hinton, Sabour & Frosst 2018, summed over classes, mean over the batch.

    ``L = sum_{i != t} max(0, m - (a_t - a_i))^2``; the margin ``m`` follows a schedule
    from 0.2 to 0.9 (see :func:`capsnet.train.schedules.spread_margin`).

    Shape:
        activations: ``(B, J)``; targets: ``(B,)`` integer labels; returns a scalar.
    """
    if activations.dim() != 2:
        raise ValueError(f"activations must be (B, J), got shape {tuple(activations.shape)}")
    t = _targets_as_float(targets, activations.shape[1], activations)
    a_t = (activations * t).sum(dim=1, keepdim=True)
    per_class = torch.relu(margin - (a_t - activations)).pow(2) * (1.0 - t)
    return per_class.sum() / max(activations.shape[0], 1)


def activation_cross_entropy(activations: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy on the logits ``z = ln(a / (1 - a))`` of logistic activations, mean over the batch.

    Not in Hinton, Sabour & Frosst 2018 (their loss is the spread loss, Eq. 3): an option for
    EM capsules, whose class activation is ``a_j = logistic(z_j)``. The spread loss reads
    ``a``, so a wrong class whose ``a`` saturates near 1 passes back only ``a (1 - a)`` of its
    gradient; here ``dL/dz_j = softmax(z)_j - [j = t]``, which does not vanish while the sample
    is wrong. ``z`` is recovered from ``a`` (``d z / d a = 1 / (a (1 - a))`` undoes the
    logistic's derivative exactly); ``a`` is clamped to ``[tiny, 1 - eps/2]`` of its dtype
    (``|z| <= 16.6`` in float32, ``87`` below), where the gradient then stops.

    Shape:
        activations: ``(B, J)`` in ``(0, 1)``; targets: ``(B,)`` integer labels; returns a scalar.
    """
    if activations.dim() != 2:
        raise ValueError(f"activations must be (B, J), got shape {tuple(activations.shape)}")
    check_labels(targets, activations.shape[0], activations.shape[1])  # (B,) integers in range
    info = torch.finfo(activations.dtype)
    a = activations.clamp(min=info.tiny, max=1.0 - info.eps / 2)
    logits = torch.log(a) - torch.log1p(-a)
    # Mean over the batch; an empty batch (a torchrun shard) gives 0, not 0/0.
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / max(activations.shape[0], 1)


# Multi-digit targets (Sabour et al. 2017, Sec. 6, MultiMNIST). Labels may be a
# capsnet.data.multimnist.MultiDigitTarget (``classes`` (B, K), ``digits`` (B, K, C, H, W))
# or a plain tensor of classes, (B,) or (B, K).


def multi_digit_classes(labels: Any) -> Tensor:
    """``(B, K)`` integer classes from a MultiDigitTarget or a ``(B,)`` / ``(B, K)`` tensor."""
    classes = labels.classes if hasattr(labels, "classes") else labels
    if not isinstance(classes, Tensor):
        raise ValueError(f"labels must be a tensor of classes or have a `classes` tensor, got {type(labels).__name__}")
    if classes.dim() == 1:
        classes = classes[:, None]
    if classes.dim() != 2 or classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise ValueError(f"classes must be (B,) or (B, K) integers, got shape {tuple(classes.shape)} dtype {classes.dtype}")
    return classes


def multi_hot(classes: Tensor, num_classes: int) -> Tensor:
    """Ones at each sample's classes: the targets ``T_k`` of Eq. 4 for several digits.

    Shape:
        classes: ``(B, K)`` integers in ``[0, num_classes)``; returns ``(B, num_classes)`` float.
    """
    classes = multi_digit_classes(classes)
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"classes must lie in [0, {num_classes - 1}], got min {int(classes.min())} max {int(classes.max())}")
    out = torch.zeros(classes.shape[0], num_classes, device=classes.device)
    return out.scatter_(1, classes.long(), 1.0)


def two_digit_correct(scores: Tensor, classes: Tensor) -> Tensor:
    """Per sample: are the ``K`` highest scores exactly the ``K`` labelled classes, as a set?

    Sabour et al. 2017, Sec. 6: a MultiMNIST image counts as correctly classified when its
    two most active digit capsules are exactly its two digits (order does not matter).
    With ``K = 1`` this is ordinary argmax accuracy.

    Shape:
        scores: ``(B, J)``; classes: ``(B, K)`` distinct integers per row (or ``(B,)``);
        returns ``(B,)`` bool.
    """
    classes = multi_digit_classes(classes)
    if scores.dim() != 2 or scores.shape[0] != classes.shape[0]:
        raise ValueError(f"scores must be (B, J) with B = {classes.shape[0]}, got shape {tuple(scores.shape)}")
    k = classes.shape[1]
    if k > scores.shape[1]:
        raise ValueError(f"{k} labelled classes per sample but only {scores.shape[1]} scores")
    wanted = classes.long().sort(dim=1).values
    if k > 1 and bool((wanted[:, 1:] == wanted[:, :-1]).any()):
        raise ValueError("the classes of a sample must all differ (MultiMNIST pairs digits of different classes)")
    top = scores.topk(k, dim=1).indices.sort(dim=1).values
    return (top == wanted.to(top.device)).all(dim=1)


def two_digit_accuracy(scores: Tensor, classes: Tensor) -> float:
    """Fraction of samples whose top-``K`` classes are exactly their ``K`` digits (see :func:`two_digit_correct`).

    Shape:
        scores: ``(B, J)``; classes: ``(B, K)``; returns a Python float.
    """
    return float(two_digit_correct(scores, classes).float().mean())


def matched_reconstruction_loss(
    reconstructions: Tensor, masks: Tensor, classes: Tensor, digits: Tensor, *, weight: float = 0.0005
) -> Tensor:
    """Reconstruction loss of each masked capsule against the digit of its class (Sec. 6).

    Reconstruction ``k`` was decoded from the capsule of class ``masks[:, k]``; its target
    is the digit image whose class is ``masks[:, k]``, or a black image when no digit of
    the sample has that class (a wrongly chosen capsule at test time should draw nothing).
    In training the masks are the true classes, so reconstruction ``k`` meets digit ``k``.
    Each term is the summed squared pixel error, mean over the batch, times ``weight``
    (Sec. 4.1), summed over the ``K`` reconstructions.

    Shape:
        reconstructions: ``(B, K, C, H, W)``; masks: ``(B, K)``; classes: ``(B, T)``;
        digits: ``(B, T, C, H, W)``; returns a scalar.
    """
    if reconstructions.dim() != 5 or masks.shape != reconstructions.shape[:2]:
        raise ValueError(
            f"reconstructions must be (B, K, C, H, W) with masks (B, K), got {tuple(reconstructions.shape)} and {tuple(masks.shape)}"
        )
    if digits.dim() != 5 or digits.shape[:2] != classes.shape or digits.shape[2:] != reconstructions.shape[2:]:
        raise ValueError(
            f"digits must be (B, T, C, H, W) = (B, T, {', '.join(map(str, reconstructions.shape[2:]))}) with classes (B, T); "
            f"got {tuple(digits.shape)} and {tuple(classes.shape)}"
        )
    match = (masks[:, :, None] == classes[:, None, :]).to(digits.dtype)  # (B, K, T): one 1 at most per row
    targets = torch.einsum("bkt,btchw->bkchw", match, digits)
    return weight * (reconstructions - targets).pow(2).flatten(2).sum(dim=2).mean(dim=0).sum()


def sigmoid_cross_entropy(logits: Tensor, classes: Tensor) -> Tensor:
    """Independent sigmoid cross-entropy per class against the multi-hot digits, summed over classes, mean over the batch.

    The loss of the paper's MultiMNIST baseline CNN (Sec. 6: sigmoid cross-entropy).

    Shape:
        logits: ``(B, J)``; classes: ``(B, K)`` or ``(B,)``; returns a scalar.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, J), got shape {tuple(logits.shape)}")
    target = multi_hot(classes, logits.shape[1]).to(logits)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1).mean()

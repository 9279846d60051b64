"""Slow reference of EM routing (Procedure 1 of Hinton, Sabour & Frosst 2018) for tests.

Explicit Python loops over an explicit child x parent graph in float64 numpy, straight from the
paper's equations: no unfold, no fold, no expansion of the Gaussian. The fast
:func:`capsnet.routing.em.em_routing` must agree with it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def conv_children(in_size, kernel, stride, types):
    """``child[l][i]``: the child ``(t, y, x)`` in slot ``i = (kh, kw, t)`` of patch ``l`` (row-major)."""
    (h, w), (kh, kw), (sh, sw) = in_size, kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    child = []
    for py in range(oh):
        for px in range(ow):
            slots = []
            for dy in range(kh):
                for dx in range(kw):
                    for t in range(types):
                        slots.append((t, py * sh + dy, px * sw + dx))
            child.append(slots)
    return child


def dense_children(num_patches, slots):
    """Every ``(patch, slot)`` is a child of its own."""
    return [[(l, i) for i in range(slots)] for l in range(num_patches)]


def reference_em_routing(votes, activations, beta_a, beta_v, *, lambdas, children, cost_scale=1.0,
                         var_floor=5e-4, eps=1e-6, activation="paper", cost_eps=1e-6, temperature=1.0):
    """EM routing over the graph ``children`` (see :func:`conv_children`).

    votes ``(B, L, I, J, D)``, activations ``(B, L, I)``, beta ``(J,)`` or ``(L, J)``; returns
    poses ``(B, L, J, D)``, activations ``(B, L, J)``, assignments ``(B, L, I, J)`` as numpy float64.
    ``activation="standardised"``: the logit is ``lam (beta_a + (mean_k cost_k - cost_j) /
    sqrt(var_k cost_k + cost_eps))`` over the ``J`` parents of one patch; ``activation="offset"``:
    ``lam (mean_k cost_k - cost_j) + beta_a``. ``temperature`` ``T``: each E-step weighs ``a_j p_ij^(1/T)``.
    """
    votes = np.asarray(votes, dtype=np.float64)
    act_in = np.asarray(activations, dtype=np.float64)
    beta_a = np.asarray(beta_a, dtype=np.float64)
    beta_v = np.asarray(beta_v, dtype=np.float64)
    batch, num_patches, slots, types, dim = votes.shape

    def beta(b, l, j):
        return b[j] if b.ndim == 1 else b[l, j]

    # parents_of[child] = list of (l, i, j): every parent the child votes for.
    parents_of = defaultdict(list)
    for l in range(num_patches):
        for i in range(slots):
            for j in range(types):
                parents_of[children[l][i]].append((l, i, j))

    poses = np.zeros((batch, num_patches, types, dim))
    acts = np.zeros((batch, num_patches, types))
    assign = np.zeros((batch, num_patches, slots, types))
    for b in range(batch):
        # Init: R_ij = 1 / |parents of child i|.
        R = np.zeros((num_patches, slots, types))
        for edges in parents_of.values():
            for (l, i, j) in edges:
                R[l, i, j] = 1.0 / len(edges)
        for it, lam in enumerate(lambdas):
            mu = np.zeros((num_patches, types, dim))
            var = np.zeros((num_patches, types, dim))
            a_out = np.zeros((num_patches, types))
            costs = np.zeros((num_patches, types))
            # M-step, one parent at a time.
            for l in range(num_patches):
                for j in range(types):
                    mass = 0.0
                    num = np.zeros(dim)
                    for i in range(slots):
                        r = R[l, i, j] * act_in[b, l, i]
                        mass += r
                        num += r * votes[b, l, i, j]
                    mu[l, j] = num / (mass + eps)
                    sq = np.zeros(dim)
                    for i in range(slots):
                        r = R[l, i, j] * act_in[b, l, i]
                        sq += r * (votes[b, l, i, j] - mu[l, j]) ** 2
                    var[l, j] = sq / (mass + eps) + var_floor
                    cost = 0.0
                    for h in range(dim):
                        cost += (beta(beta_v, l, j) + math.log(math.sqrt(var[l, j, h]))) * mass * cost_scale
                    costs[l, j] = cost
            for l in range(num_patches):
                mean = sum(costs[l]) / types
                std = math.sqrt(sum((c - mean) ** 2 for c in costs[l]) / types + cost_eps)
                for j in range(types):
                    if activation == "paper":
                        x = beta(beta_a, l, j) - costs[l, j]
                    elif activation == "centred":
                        x = beta(beta_a, l, j) + mean - costs[l, j]
                    elif activation == "offset":  # beta_a after lambda: x is the logit divided by lambda
                        x = mean - costs[l, j] + beta(beta_a, l, j) / lam
                    else:
                        x = beta(beta_a, l, j) + (mean - costs[l, j]) / std
                    a_out[l, j] = 1.0 / (1.0 + math.exp(-lam * x))
            assign[b] = R
            if it == len(lambdas) - 1:
                break
            # E-step, one child at a time, normalised over all of its parents.
            R = np.zeros((num_patches, slots, types))
            for edges in parents_of.values():
                logs = []
                for (l, i, j) in edges:
                    log_p = 0.0
                    for h in range(dim):
                        log_p += -((votes[b, l, i, j, h] - mu[l, j, h]) ** 2) / (2.0 * var[l, j, h])
                        log_p += -0.5 * math.log(2.0 * math.pi * var[l, j, h])
                    logs.append(math.log(a_out[l, j]) + log_p / temperature)
                top = max(logs)
                log_total = top + math.log(sum(math.exp(x - top) for x in logs))
                for (l, i, j), x in zip(edges, logs):
                    R[l, i, j] = math.exp(x - log_total)
        poses[b], acts[b] = mu, a_out
    return poses, acts, assign


def autograd_em_routing_dense(votes, activations, beta_a, beta_v, *, lambdas, var_floor=5e-4, eps=1e-6,
                              activation="paper", truncate=False, cost_eps=1e-6, grad_scale=1.0):
    """Procedure 1 for a fully connected layer in plain differentiable torch, for gradient tests.

    Every ``(patch, slot)`` is its own child (no geometry), ``beta`` is ``(J,)``. ``truncate``
    detaches the Gaussians and activations each E-step reads (``truncate_gradient`` of
    :func:`capsnet.routing.em.em_routing`); ``grad_scale`` multiplies their gradient instead, by a
    hook (``iteration_grad_scale``). votes ``(B, L, I, J, D)``, activations ``(B, L, I)``;
    returns poses ``(B, L, J, D)`` and activations ``(B, L, J)``.
    """
    import torch

    types = votes.shape[3]
    r = torch.full(votes.shape[:4], 1.0 / types, dtype=votes.dtype)
    for it, lam in enumerate(lambdas):
        ra = r * activations.unsqueeze(-1)  # (B, L, I, J)
        mass = ra.sum(2)  # (B, L, J)
        mu = (ra.unsqueeze(-1) * votes).sum(2) / (mass + eps).unsqueeze(-1)
        var = (ra.unsqueeze(-1) * (votes - mu.unsqueeze(2)) ** 2).sum(2) / (mass + eps).unsqueeze(-1) + var_floor
        cost = ((beta_v.unsqueeze(-1) + 0.5 * torch.log(var)) * mass.unsqueeze(-1)).sum(-1)  # (B, L, J)
        if activation == "paper":
            x = beta_a - cost
        else:
            mean = cost.mean(-1, keepdim=True)
            x = beta_a + mean - cost
            if activation == "standardised":
                x = beta_a + (mean - cost) / torch.sqrt(((cost - mean) ** 2).mean(-1, keepdim=True) + cost_eps)
        a = torch.sigmoid(lam * (mean - cost) + beta_a if activation == "offset" else lam * x)
        if it == len(lambdas) - 1:
            return mu, a
        m, v, act = (mu.detach(), var.detach(), a.detach()) if truncate else (mu, var, a)
        if grad_scale != 1.0 and not truncate:
            m, v, act = (t * 1.0 for t in (m, v, act))  # new nodes, so the hooks see only the E-step's share
            for t in (m, v, act):
                t.register_hook(lambda g: g * grad_scale)
        log_p = (-((votes - m.unsqueeze(2)) ** 2) / (2 * v.unsqueeze(2)) - 0.5 * torch.log(2 * math.pi * v.unsqueeze(2))).sum(-1)
        r = torch.softmax(log_p + torch.log(act).unsqueeze(2), dim=-1)  # over the J parents of each child


def autograd_em_routing(votes, activations, beta_a, beta_v, *, lambdas, geometry=None, var_floor=5e-4, eps=1e-6,
                        activation="paper", cost_scale=1.0, detach=False, truncate=False, grad_scale=1.0, cost_eps=1e-6,
                        temperature=1.0):
    """Procedure 1 in plain differentiable torch for any layer, for end-to-end gradient tests.

    Like :func:`autograd_em_routing_dense`, plus: a convolutional ``geometry`` (the E-step's
    normaliser sums over every patch that holds a child, by the library's
    ``log_child_normaliser``, whose values the loop reference above checks), betas ``(J,)`` or
    ``(L, J)``, ``cost_scale``, ``detach`` (``detach_intermediate``: each E-step's ``R`` a
    constant), ``temperature`` (``e_step_temperature``: ``ln a_j + ln p_ij / T``). votes ``(B, L, I, J, D)``,
    activations ``(B, L, I)``; returns poses ``(B, L, J, D)``,
    activations ``(B, L, J)`` and the ``R`` of the last M-step ``(B, L, I, J)``.
    """
    import torch

    from capsnet.routing.em_geometry import log_child_normaliser, parent_counts, to_patches

    batch, num_patches, slots, types, dim = votes.shape
    if geometry is None:
        r = torch.full(votes.shape[:4], 1.0 / types, dtype=votes.dtype)
    else:  # 1 / (J x number of patches that hold the child)
        counts = to_patches(parent_counts(geometry, like=activations), geometry)  # (1, L, I)
        r = (1.0 / (types * counts)).unsqueeze(-1).expand(batch, num_patches, slots, types)
    b_a = beta_a if beta_a.dim() == 1 else beta_a.unsqueeze(0)  # (J,) or (1, L, J)
    b_v = (beta_v if beta_v.dim() == 1 else beta_v.unsqueeze(0)).unsqueeze(-1)
    for it, lam in enumerate(lambdas):
        ra = r * activations.unsqueeze(-1)  # (B, L, I, J)
        mass = ra.sum(2)  # (B, L, J)
        mu = (ra.unsqueeze(-1) * votes).sum(2) / (mass + eps).unsqueeze(-1)
        var = ((ra.unsqueeze(-1) * (votes - mu.unsqueeze(2)) ** 2).sum(2) / (mass + eps).unsqueeze(-1)).clamp_min(0) + var_floor
        cost = ((b_v + 0.5 * torch.log(var)) * (mass * cost_scale).unsqueeze(-1)).sum(-1)  # (B, L, J)
        mean = cost.mean(-1, keepdim=True)
        if activation == "paper":
            logit = lam * (b_a - cost)
        elif activation == "centred":
            logit = lam * (b_a + mean - cost)
        elif activation == "standardised":
            logit = lam * (b_a + (mean - cost) / torch.sqrt(((cost - mean) ** 2).mean(-1, keepdim=True) + cost_eps))
        else:  # offset
            logit = lam * (mean - cost) + b_a
        if it == len(lambdas) - 1:
            return mu, torch.sigmoid(logit), r
        m, v, lg = (mu.detach(), var.detach(), logit.detach()) if truncate else (mu, var, logit)
        if grad_scale != 1.0 and not truncate:
            m, v, lg = (t * 1.0 for t in (m, v, lg))  # new nodes, so the hooks see only the E-step's share
            for t in (m, v, lg):
                if t.requires_grad:
                    t.register_hook(lambda g: g * grad_scale)
        log_p = (-((votes - m.unsqueeze(2)) ** 2) / (2 * v.unsqueeze(2)) - 0.5 * torch.log(2 * math.pi * v.unsqueeze(2))).sum(-1)
        log_ap = log_p / temperature + torch.nn.functional.logsigmoid(lg).unsqueeze(2)  # (B, L, I, J): ln(a_j p_ij^(1/T))
        per_slot = torch.logsumexp(log_ap, -1)  # (B, L, I)
        if geometry is None:
            r = torch.exp(log_ap - per_slot.unsqueeze(-1))
        else:
            r = torch.exp(log_ap - log_child_normaliser(per_slot, geometry).unsqueeze(-1))
        if detach:
            r = r.detach()

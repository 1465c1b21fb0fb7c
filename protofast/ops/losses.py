"""ProtoPNet-family losses on [B, M] minimum distances, and the mean-distance loss in closed form.

Nothing here is larger than B×M (or B×K×M-chunks of bounded size for multi-label targets). The semantics are
SEMANTICS.md §1.3 (cluster / separation as cfchen-duke/ProtoPNet computes them: multiply-then-max, the masked
zeros compete, first occurrence over the whole row), §3.2 (quanproto's multi-label averaging) and §1.7 (the
mean-distance loss of "Acceleration of Interpretable Deep Neural Networks", Algorithm 2).

Operators (namespace ``protofast``):

    cluster_separation(d, labels, I, max_dist, exact)
        -> (cluster, separation, avg_separation, cl_idx, sep_idx, n_wrong)      (C++ on CPU, else torch)
    cluster_separation_backward(g_cluster, g_separation, g_avg, labels, I, cl_idx, sep_idx, n_wrong, M) -> grad_d
    multilabel_cluster_separation(d, targets, I, max_dist, exact) -> (cluster, separation, avg_separation, idx)
    masked_l1(Wc, I) -> Σ |Wc| · (1 − Iᵀ);  masked_l1_backward(g, Wc, I) -> g · sign(Wc) · (1 − Iᵀ)
    mean_distance(X, P, labels?, I?, metric, other) -> closed-form mean of all distance maps
    mean_distance_exact(X, P, labels?, I?, metric, other) -> the same mean, streamed in tiles with the clamp

The winner indices are returned so that the backward routes each sample's gradient to its single winning
prototype; the gradient of ``max_dist − (max_dist − d)·T`` at the winner is T there, so a masked winner (a zero
that won the max) passes no gradient, exactly as in the original.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._validation import (
    check_features_prototypes,
    check_identity,
    check_label_values,
    check_labels,
    check_min_distances,
    check_tensor,
)
from .._backend import backend_for
from .distances import _accumulate_tile_grads, _chunks, _distance_tile, _prepare

_INF = float("inf")


def _check_classes_have_prototypes(class_sizes: Tensor, needed: Tensor, what: str) -> None:
    """class_sizes [K] prototypes per class; needed [K] bool: classes that must own at least one prototype."""
    empty = needed & (class_sizes <= 0)
    if bool(empty.any()):
        k = int(empty.nonzero()[0, 0])
        raise ValueError(f"class {k} has no prototypes in prototype_class_identity but {what}")


# ------------------------------------------------------------------------------------ single-label costs
def _target_mask(labels: Tensor, identity: Tensor) -> Tensor:
    return identity[:, labels].t()  # T[b, m] = I[m, y_b]


def _check_counts(n_own: Tensor, n_wrong: Tensor, labels: Tensor) -> None:
    """n_own[b], n_wrong[b]: prototypes of sample b's class and of the other classes."""
    if bool((n_own <= 0).any()):
        b = int((n_own <= 0).nonzero()[0, 0])
        raise ValueError(f"class {int(labels[b])} has no prototypes in prototype_class_identity but it is the label "
                         f"of sample {b}")
    if bool((n_wrong <= 0).any()):
        raise ValueError("every sample needs at least one prototype of another class (separation is undefined)")


@torch.library.custom_op("protofast::cluster_separation", mutates_args=())
def cluster_separation(min_distances: Tensor, labels: Tensor, identity: Tensor, max_dist: float,
                       exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (cluster, separation, avg_separation, cluster_index, separation_index, n_wrong)."""
    d = min_distances
    check_label_values(labels, identity.shape[1])
    if backend_for(d.device) == "cpp":
        cluster, separation, avg, cl_idx, sep_idx, n_own, n_wrong = \
            torch.ops.protofast_cpu.cluster_separation_forward(d.contiguous(), labels.contiguous(),
                                                                identity.contiguous(), max_dist, exact)
        _check_counts(n_own, n_wrong, labels)
        return cluster, separation, avg, cl_idx, sep_idx, n_wrong
    T = _target_mask(labels, identity)
    wrong = 1 - T
    n_wrong = wrong.sum(1)
    _check_counts(T.sum(1), n_wrong, labels)
    if exact:
        cl_val, cl_idx = torch.where(T > 0, d, _INF).min(1)
        sep_val, sep_idx = torch.where(T > 0, _INF, d).min(1)
        cluster, separation = cl_val.mean(), sep_val.mean()
    else:
        inverted = max_dist - d
        cl_val, cl_idx = torch.max(inverted * T, dim=1)
        sep_val, sep_idx = torch.max(inverted * wrong, dim=1)
        cluster, separation = (max_dist - cl_val).mean(), (max_dist - sep_val).mean()
    avg_separation = ((d * wrong).sum(1) / n_wrong).mean()
    return cluster, separation, avg_separation, cl_idx, sep_idx, n_wrong


@cluster_separation.register_fake
def _(min_distances, labels, identity, max_dist, exact):
    B = min_distances.shape[0]
    s = min_distances.new_empty(())
    idx = labels.new_empty(B, dtype=torch.long)
    return s, s.clone(), s.clone(), idx, idx.clone(), min_distances.new_empty(B)


def _cs_setup(ctx, inputs, output):
    d, labels, identity, _, _ = inputs
    ctx.save_for_backward(labels, identity, output[3], output[4], output[5])
    ctx.num_prototypes = d.shape[1]
    ctx.mark_non_differentiable(output[3], output[4], output[5])


def _cs_backward(ctx, g_cluster, g_separation, g_avg, _gi, _gj, _gn):
    labels, identity, cl_idx, sep_idx, n_wrong = ctx.saved_tensors
    grad = cluster_separation_backward(g_cluster, g_separation, g_avg, labels, identity, cl_idx, sep_idx, n_wrong,
                                       ctx.num_prototypes)
    return grad, None, None, None, None


@torch.library.custom_op("protofast::cluster_separation_backward", mutates_args=())
def cluster_separation_backward(g_cluster: Tensor, g_separation: Tensor, g_avg: Tensor, labels: Tensor,
                                identity: Tensor, cluster_index: Tensor, separation_index: Tensor, n_wrong: Tensor,
                                num_prototypes: int) -> Tensor:
    if backend_for(identity.device) == "cpp":
        return torch.ops.protofast_cpu.cluster_separation_backward(
            g_cluster, g_separation, g_avg, labels.contiguous(), identity.contiguous(), cluster_index.contiguous(),
            separation_index.contiguous(), n_wrong.contiguous(), num_prototypes)
    B = labels.shape[0]
    T = _target_mask(labels, identity)
    wrong = 1 - T
    grad = (g_avg / B) * wrong / n_wrong[:, None]
    # ∂/∂d of max_dist − (max_dist − d)·mask is the mask at the winner (0 when a masked zero won the max)
    grad = grad.scatter_add(1, cluster_index[:, None], (g_cluster / B) * T.gather(1, cluster_index[:, None]))
    return grad.scatter_add(1, separation_index[:, None],
                            (g_separation / B) * wrong.gather(1, separation_index[:, None]))


@cluster_separation_backward.register_fake
def _(g_cluster, g_separation, g_avg, labels, identity, cluster_index, separation_index, n_wrong, num_prototypes):
    return identity.new_empty(labels.shape[0], num_prototypes)


cluster_separation.register_autograd(_cs_backward, setup_context=_cs_setup)


# ------------------------------------------------------------------------------------ multi-label costs
_MULTILABEL_CHUNK = 1 << 22  # entries of the [B, K-chunk, M] temporary


def _per_class_winners(d: Tensor, identity: Tensor, max_dist: float, exact: bool):
    """A[b, k], idx[b, k]: max_m (max_dist − d[b, m])·I[m, k] (first occurrence, masked zeros included), or with
    ``exact`` the true min over the class's prototypes. Chunked over classes, never B×K×M at once."""
    B, M = d.shape
    K = identity.shape[1]
    A = d.new_empty(B, K)
    idx = torch.empty(B, K, dtype=torch.long, device=d.device)
    It = identity.t()
    kc = max(1, _MULTILABEL_CHUNK // (B * M))
    for k0 in range(0, K, kc):
        mask = It[k0:k0 + kc][None]                                   # [1, kc, M]
        if exact:
            v, i = torch.where(mask > 0, d[:, None, :], _INF).min(2)
        else:
            v, i = torch.max((max_dist - d)[:, None, :] * mask, dim=2)
        A[:, k0:k0 + kc], idx[:, k0:k0 + kc] = v, i
    return A, idx


@torch.library.custom_op("protofast::multilabel_cluster_separation", mutates_args=())
def multilabel_cluster_separation(min_distances: Tensor, targets: Tensor, identity: Tensor, max_dist: float,
                                  exact: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    d, t = min_distances, targets
    if bool(((t != 0) & (t != 1)).any()):
        raise ValueError("multi-label labels must be 0/1 targets")
    n_pos = t.sum(1)
    n_neg = (1 - t).sum(1)
    if bool((n_pos <= 0).any()):
        raise ValueError("every sample needs at least one positive label in multi-label labels")
    if bool((n_neg <= 0).any()):
        raise ValueError("every sample needs at least one negative class (separation is undefined)")
    class_sizes = identity.sum(0)
    needed = torch.ones_like(class_sizes, dtype=torch.bool) if exact else (t > 0).any(0)
    _check_classes_have_prototypes(class_sizes, needed, "it is a positive label" if not exact else "exact=True")
    A, idx = _per_class_winners(d, identity, max_dist, exact)
    per_class = A if exact else max_dist - A
    cluster = ((per_class * t).sum(1) / n_pos).mean()
    separation = ((per_class * (1 - t)).sum(1) / n_neg).mean()
    T = (t @ identity.t()).clamp(max=1)                              # prototypes of any positive class
    wrong = 1 - T
    avg_separation = ((d * wrong).sum(1) / wrong.sum(1)).mean()
    return cluster, separation, avg_separation, idx


@multilabel_cluster_separation.register_fake
def _(min_distances, targets, identity, max_dist, exact):
    s = min_distances.new_empty(())
    return s, s.clone(), s.clone(), targets.new_empty(targets.shape, dtype=torch.long)


def _ml_setup(ctx, inputs, output):
    d, t, identity, _, _ = inputs
    ctx.save_for_backward(d, t, identity, output[3])
    ctx.mark_non_differentiable(output[3])


def _ml_backward(ctx, g_cluster, g_separation, g_avg, _gi):
    d, t, identity, idx = ctx.saved_tensors
    B = d.shape[0]
    T = (t @ identity.t()).clamp(max=1)
    wrong = 1 - T
    grad = (g_avg / B) * wrong / wrong.sum(1, keepdim=True)
    at_winner = identity.t().gather(1, idx.t()).t()                  # I[idx[b, k], k]: 0 if a masked zero won
    w = (g_cluster / B) * t / t.sum(1, keepdim=True) + (g_separation / B) * (1 - t) / (1 - t).sum(1, keepdim=True)
    grad = grad.scatter_add(1, idx, w * at_winner)
    return grad, None, None, None, None


multilabel_cluster_separation.register_autograd(_ml_backward, setup_context=_ml_setup)


def cluster_separation_costs(min_distances: Tensor, labels: Tensor, prototype_class_identity: Tensor,
                             max_dist: float, exact: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """ProtoPNet's cluster, separation and average-separation costs (unsigned; the loss applies the signs).

    Args:
        min_distances: ``[B, M]`` minimum distances (``prototype_min_distances(...)[0]``).
        labels: ``[B]`` class indices, or ``[B, K]`` 0/1 multi-label targets (quanproto: per-class terms averaged
            over each sample's positive, resp. negative, classes).
        prototype_class_identity: ``[M, K]`` 0/1 matrix; any device (moved, never synchronised on).
        max_dist: the offset ``C·h·w`` of the multiply-then-max form (128 for ProtoPNet's defaults).
        exact: ``False`` (default) reproduces the original ``max_m((max_dist − d)·T)``, where masked zeros compete
            and the cost saturates at ``max_dist`` with zero gradient; ``True`` takes the true masked minimum.

    Returns:
        ``(cluster, separation, avg_separation)`` scalars. ``avg_separation`` is logged by ProtoPNet, never in
        its loss. Gradients reach the single winning prototype per sample (per class with multi-label).
    """
    check_min_distances("min_distances", min_distances)
    B, M = min_distances.shape
    check_identity(prototype_class_identity, M)
    K = prototype_class_identity.shape[1]
    multilabel = check_labels(labels, B, K)
    if not isinstance(max_dist, (int, float)):
        raise TypeError(f"max_dist must be a number, got {type(max_dist).__name__}")
    identity = prototype_class_identity.to(device=min_distances.device, dtype=min_distances.dtype)
    if multilabel:
        targets = labels.to(device=min_distances.device, dtype=min_distances.dtype)
        cluster, separation, avg, _ = multilabel_cluster_separation(min_distances, targets, identity,
                                                                    float(max_dist), bool(exact))
    else:
        labels = labels.to(device=min_distances.device, dtype=torch.long)
        cluster, separation, avg, *_ = cluster_separation(min_distances, labels, identity, float(max_dist),
                                                          bool(exact))
    return cluster, separation, avg


# ------------------------------------------------------------------------------------ masked l1
@torch.library.custom_op("protofast::masked_l1", mutates_args=())
def _masked_l1(weight: Tensor, identity: Tensor) -> Tensor:
    if backend_for(weight.device) == "cpp":
        return torch.ops.protofast_cpu.masked_l1_forward(weight.contiguous(), identity.contiguous())
    return (weight.abs() * (1 - identity.t())).sum()


@_masked_l1.register_fake
def _(weight, identity):
    return weight.new_empty(())


def _l1_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@torch.library.custom_op("protofast::masked_l1_backward", mutates_args=())
def _masked_l1_backward(grad: Tensor, weight: Tensor, identity: Tensor) -> Tensor:
    if backend_for(weight.device) == "cpp":
        return torch.ops.protofast_cpu.masked_l1_backward(grad, weight.contiguous(), identity.contiguous())
    return grad * torch.sign(weight) * (1 - identity.t())


@_masked_l1_backward.register_fake
def _(grad, weight, identity):
    return torch.empty_like(weight)


def _l1_backward(ctx, grad):
    weight, identity = ctx.saved_tensors
    return _masked_l1_backward(grad, weight, identity), None


_masked_l1.register_autograd(_l1_backward, setup_context=_l1_setup)


def masked_l1(last_layer_weight: Tensor, prototype_class_identity: Tensor) -> Tensor:
    """ProtoPNet's l1 term Σ_{k,m} |Wc[k, m]| · (1 − I[m, k]) for the last layer ``Wc [K, M]``; gradient
    sign(Wc)·(1 − Iᵀ), 0 at Wc = 0."""
    check_tensor("last_layer_weight", last_layer_weight)
    if last_layer_weight.dim() != 2:
        raise ValueError(f"last_layer_weight must be [K, M], got shape {tuple(last_layer_weight.shape)}")
    K, M = last_layer_weight.shape
    check_identity(prototype_class_identity, M)
    if prototype_class_identity.shape[1] != K:
        raise ValueError(
            f"prototype_class_identity must be [M, K] = [{M}, {K}] for last_layer_weight [K, M] = [{K}, {M}], got "
            f"shape {tuple(prototype_class_identity.shape)}")
    identity = prototype_class_identity.to(device=last_layer_weight.device, dtype=last_layer_weight.dtype)
    return _masked_l1(last_layer_weight, identity)


# ------------------------------------------------------------------------------------ mean-distance loss
def _selection(X: Tensor, P: Tensor, labels: Optional[Tensor], identity: Optional[Tensor], other: bool):
    """Per-sample sums over the selected prototypes and per-prototype sums over the samples selecting them.

    With T'[b, m] = 1 (no labels), I[m, y_b] (own) or 1 − I[m, y_b] (other), returns
        cnt[b] = Σ_m T',  Psel[b] = Σ_m T' p_m,  Rsel[b] = Σ_m T' ‖p_m‖²     (per sample)
        col[m] = Σ_b T',  Xsel[m] = Σ_b T' x̄_b                              (per prototype)
    using class sums only (O(B·K + M·K + K·D)); x̄_b is the mean patch of sample b.
    """
    B, M = X.shape[0], P.shape[0]
    xbar = X.mean(1)
    q = (P * P).sum(-1)
    P_tot, R_tot, X_tot = P.sum(0), q.sum(), xbar.sum(0)
    if labels is None:
        cnt = X.new_full((B,), float(M))
        return cnt, P_tot.expand(B, -1), R_tot.expand(B), X.new_full((M,), float(B)), X_tot.expand(M, -1), xbar
    Y = torch.nn.functional.one_hot(labels, identity.shape[1]).to(X.dtype)  # [B, K]
    cnt, Psel, Rsel = Y @ identity.sum(0), Y @ (identity.t() @ P), Y @ (identity.t() @ q)
    col, Xsel = identity @ Y.sum(0), identity @ (Y.t() @ xbar)
    if other:
        cnt, Psel, Rsel = M - cnt, P_tot - Psel, R_tot - Rsel
        col, Xsel = B - col, X_tot - Xsel
    return cnt, Psel, Rsel, col, Xsel, xbar


@torch.library.custom_op("protofast::mean_distance", mutates_args=())
def mean_distance(X: Tensor, P: Tensor, labels: Optional[Tensor], identity: Optional[Tensor], metric: str,
                  other: bool) -> Tensor:
    if labels is not None:
        check_label_values(labels, identity.shape[1])
    cnt, Psel, Rsel, _, _, xbar = _selection(X, P, labels, identity, other)
    den = cnt.sum()
    if float(den) <= 0:
        raise ValueError("the labels select no prototypes (no sample's class owns one): the mean is undefined")
    if metric == "cosine":                    # mean of 1 − x̂·p̂ over the selection
        num = den - (xbar * Psel).sum()
    else:                                     # mean of ‖x‖² − 2 x·p + ‖p‖²
        s = (X * X).sum(-1).mean(1)
        num = (cnt * s).sum() + Rsel.sum() - 2 * (xbar * Psel).sum()
    return num / den


@mean_distance.register_fake
def _mean_fake(X, P, labels, identity, metric, other):
    return X.new_empty(())


def _mean_setup(ctx, inputs, output):
    """Shared by mean_distance and mean_distance_exact (same signature)."""
    X, P, labels, identity, metric, other = inputs
    ctx.save_for_backward(X, P, labels, identity)
    ctx.metric, ctx.other = metric, other


def _md_backward(ctx, grad):
    X, P, labels, identity = ctx.saved_tensors
    N = X.shape[1]
    cnt, Psel, _, col, Xsel, _ = _selection(X, P, labels, identity, ctx.other)
    g = grad / cnt.sum()
    if ctx.metric == "cosine":
        grad_X = (-g / N) * Psel[:, None, :].expand_as(X)
        grad_P = -g * Xsel
    else:
        grad_X = (2 * g / N) * (cnt[:, None, None] * X - Psel[:, None, :])
        grad_P = 2 * g * (col[:, None] * P - Xsel)
    return grad_X, grad_P, None, None, None, None


mean_distance.register_autograd(_md_backward, setup_context=_mean_setup)


def _exact_weights(labels: Optional[Tensor], identity: Optional[Tensor], other: bool, B: int, M: int,
                   like: Tensor, validate: bool = False) -> Tensor:
    """w[b, m] = T'[b, m] / Σ T' (T' = 1, the own-class mask, or its complement) — B×M, like the minima.
    ``validate`` reads values (forward only: the backward is traced by torch.compile)."""
    if labels is None:
        return like.new_full((B, M), 1.0 / (B * M))
    if validate:
        check_label_values(labels, identity.shape[1])
    T = identity[:, labels].t()
    if other:
        T = 1 - T
    total = T.sum()
    if validate and float(total) <= 0:
        raise ValueError("the labels select no prototypes (no sample's class owns one): the mean is undefined")
    return T / total


@torch.library.custom_op("protofast::mean_distance_exact", mutates_args=())
def mean_distance_exact(X: Tensor, P: Tensor, labels: Optional[Tensor], identity: Optional[Tensor], metric: str,
                        other: bool) -> Tensor:
    B, N, _ = X.shape
    M = P.shape[0]
    weights = _exact_weights(labels, identity, other, B, M, X, validate=True)
    Q = (P * P).sum(-1)
    total = X.new_zeros(())
    for b0, b1, m0, m1 in _chunks(B, N, M):
        d = _distance_tile(X[b0:b1], P[m0:m1], Q[m0:m1], metric)          # [b, N, m]
        total = total + (d.sum(1) * weights[b0:b1, m0:m1]).sum() / N
    return total


mean_distance_exact.register_fake(_mean_fake)


def _mde_backward(ctx, grad):
    X, P, labels, identity = ctx.saved_tensors
    B, N, _ = X.shape
    M = P.shape[0]
    weights = _exact_weights(labels, identity, ctx.other, B, M, X)
    Q = (P * P).sum(-1)
    grad_X, grad_P = torch.zeros_like(X), torch.zeros_like(P)
    for b0, b1, m0, m1 in _chunks(B, N, M):
        g = (grad / N) * weights[b0:b1, m0:m1, None].expand(-1, -1, N)
        if ctx.metric == "l2":      # recompute the tile for the relu mask (no gradient where clamped)
            d = _distance_tile(X[b0:b1], P[m0:m1], Q[m0:m1], ctx.metric).transpose(1, 2)
            g = torch.where(d > 0, g, torch.zeros_like(g))
        _accumulate_tile_grads(grad_X, grad_P, g, X, P, b0, b1, m0, m1, ctx.metric)
    return grad_X, grad_P, None, None, None, None


mean_distance_exact.register_autograd(_mde_backward, setup_context=_mean_setup)


def mean_distance_loss(features: Tensor, prototypes: Tensor, labels: Optional[Tensor] = None,
                       prototype_class_identity: Optional[Tensor] = None, metric: str = "l2",
                       mode: str = "closed_form", classes: str = "own") -> Tensor:
    """The seed's mean-distance loss (reading (A) of "Acceleration of Interpretable Deep Neural Networks",
    Algorithm 2): the mean of the distance maps over all patches, computed without forming them.

    Without labels, the mean over b, m and every patch n of d[b, m, n]. For squared L2 (1×1 prototypes)

        L = mean_{b,n} ‖x[b, n]‖² + mean_m ‖p_m‖² − 2 x̄·p̄

    with x̄, p̄ the mean patch and the mean prototype; h×w prototypes use the flattened valid windows (the
    per-(u, v) means of SEMANTICS.md §1.7). With ``labels [B]`` and ``prototype_class_identity [M, K]``, the mean
    over each sample's own-class prototypes (``classes="own"``) or the other classes' (``classes="other"``):
    Σ_{b,m} T·D̄[b, m] / Σ_{b,m} T with D̄ the per-map mean, from class sums (O(B·N·D + M·D + K·D)), exact for any
    identity (pruned, shared). ``metric="cosine"``: the mean of 1 − x̂·p̂ (normalised patches and prototypes).

    ``mode="closed_form"`` (default) skips ProtoPNet's relu (the expanded distance can round below 0 where the
    original clamps); ``mode="exact"`` streams the maps in bounded tiles with the clamp.

    Reading (B), the mean of the per-prototype minima, is ``prototype_min_distances(f, p)[0].mean()`` — there is
    no closed form; its gradient 1/(B·M) is routed to each argmin patch by the fused op.

    The return value is the unsigned mean; the caller supplies the coefficient (e.g. 0.8, replacing both the
    cluster and the separation terms).
    """
    check_features_prototypes(features, prototypes)
    if mode not in ("closed_form", "exact"):
        raise ValueError(f"mode must be 'closed_form' or 'exact', got {mode!r}")
    if classes not in ("own", "other"):
        raise ValueError(f"classes must be 'own' or 'other', got {classes!r}")
    B, M = features.shape[0], prototypes.shape[0]
    identity = None
    if labels is not None or prototype_class_identity is not None:
        if labels is None or prototype_class_identity is None:
            raise ValueError("labels and prototype_class_identity must be given together")
        check_identity(prototype_class_identity, M)
        if check_labels(labels, B, prototype_class_identity.shape[1]):
            raise ValueError("mean_distance_loss takes class indices labels [B], not multi-label targets")
        labels = labels.to(device=features.device, dtype=torch.long)
    X, P, _, _ = _prepare(features, prototypes, metric)
    if labels is not None:
        identity = prototype_class_identity.to(device=X.device, dtype=X.dtype)
    op = mean_distance if mode == "closed_form" else mean_distance_exact
    loss = op(X, P, labels, identity, metric, classes == "other")
    return loss.to(features.dtype)

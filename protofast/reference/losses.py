"""Reference losses (SEMANTICS.md §1.3, §1.7, §3.2), written the way the original code computes them.

Single label (cfchen-duke/ProtoPNet), with T[b, m] = I[m, y_b] and max_dist = C·h·w:

    cluster        = mean_b [ max_dist − max_m ((max_dist − d[b, m]) · T[b, m]) ]
    separation     = mean_b [ max_dist − max_m ((max_dist − d[b, m]) · (1 − T[b, m])) ]
    avg_separation = mean_b [ Σ_m d·(1 − T) / Σ_m (1 − T) ]

Masked-out entries are zeros that take part in the max (first occurrence over the whole row). ``exact=True``
replaces the multiply-then-max by the true minimum over the class's (or the other classes') prototypes.

Multi-label (uos-sis/quanproto), t[b, k] ∈ {0, 1}:

    inv[b, k] = max_m ((max_dist − d[b, m]) · t[b, k] · I[m, k])
    cluster   = mean_b [ Σ_k (max_dist − inv[b, k]) · t[b, k] / Σ_k t[b, k] ]
    separation: the same with (1 − t) in both places.
"""
from __future__ import annotations

import torch

from .distances import prototype_distance_maps


def _target_mask(labels, identity, dtype, device):
    identity = identity.to(device=device, dtype=dtype)
    if labels.dim() == 1:
        return identity[:, labels].t()                              # T[b, m] = I[m, y_b]
    return (labels.to(device=device, dtype=dtype) @ identity.t()).clamp(max=1)  # any positive class


def cluster_separation_costs(min_distances, labels, prototype_class_identity, max_dist, exact=False):
    """``(cluster, separation, avg_separation)``, unsigned (the sign lives in the loss coefficient)."""
    d = min_distances
    identity = prototype_class_identity.to(device=d.device, dtype=d.dtype)
    T = _target_mask(labels, identity, d.dtype, d.device)
    avg_separation = ((d * (1 - T)).sum(1) / (1 - T).sum(1)).mean()
    if labels.dim() == 1:
        if exact:
            inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
            cluster = torch.where(T > 0, d, inf).min(1).values.mean()
            separation = torch.where(T > 0, inf, d).min(1).values.mean()
        else:
            cluster = (max_dist - torch.max((max_dist - d) * T, dim=1).values).mean()
            separation = (max_dist - torch.max((max_dist - d) * (1 - T), dim=1).values).mean()
        return cluster, separation, avg_separation
    t = labels.to(device=d.device, dtype=d.dtype)                   # [B, K]
    B, K = t.shape
    if exact:
        inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
        per_class = torch.where(identity.t()[None] > 0, d[:, None, :], inf).min(2).values  # [B, K]
        cluster = ((per_class * t).sum(1) / t.sum(1)).mean()
        separation = ((per_class * (1 - t)).sum(1) / (1 - t).sum(1)).mean()
        return cluster, separation, avg_separation
    inv_c = torch.max((max_dist - d)[:, None, :] * t[:, :, None] * identity.t()[None], dim=2).values
    inv_s = torch.max((max_dist - d)[:, None, :] * (1 - t)[:, :, None] * identity.t()[None], dim=2).values
    cluster = (((max_dist - inv_c) * t).sum(1) / t.sum(1)).mean()
    separation = (((max_dist - inv_s) * (1 - t)).sum(1) / (1 - t).sum(1)).mean()
    return cluster, separation, avg_separation


def masked_l1(last_layer_weight, prototype_class_identity):
    """l1 = Σ_{k, m} |Wc[k, m]| · (1 − I[m, k])   (use_l1_mask = True)."""
    mask = 1 - prototype_class_identity.to(last_layer_weight).t()
    return (last_layer_weight * mask).abs().sum()


def mean_distance_loss(features, prototypes, labels=None, prototype_class_identity=None, metric="l2",
                       classes="own"):
    """Mean of the full distance maps (reading (A) of the seed's Algorithm 2), materialised.

    Without labels: mean over b, m and every patch. With labels: Σ_{b,m} T·D̄[b, m] / Σ_{b,m} T, where D̄ is the
    per-map mean and T the own-class mask (``classes="own"``) or 1 − T (``classes="other"``).
    """
    d = prototype_distance_maps(features, prototypes, metric)
    dbar = d.flatten(2).mean(2)                                     # [B, M]
    if labels is None:
        return dbar.mean()
    T = _target_mask(labels, prototype_class_identity, dbar.dtype, dbar.device)
    if classes == "other":
        T = 1 - T
    return (T * dbar).sum() / T.sum()


def mean_min_distance_loss(min_distances):
    """Reading (B): the mean of the per-prototype minimum distances, mean_{b,m} mind[b, m]."""
    return min_distances.mean()

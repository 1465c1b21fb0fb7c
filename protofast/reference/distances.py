"""Reference prototype distances (SEMANTICS.md §1.2, §6 TesNet for cosine).

Squared L2, as ProtoPNet computes it (expanded form, clamped at 0 by a relu):

    S[b, n]    = ‖x[b, n]‖²                 patch energy
    G[b, m, n] = x[b, n] · p[m]             cross term
    Q[m]       = ‖p[m]‖²                    prototype energy
    d[b, m, n] = relu(S[b, n] − 2·G[b, m, n] + Q[m])

Cosine: d[b, m, n] = 1 − x̂[b, n] · p̂[m] with x̂ = x / max(‖x‖, 1e-12).

Patches n run over the valid h×w windows of an NCHW map in row-major (i, j) order, or over the elements of a
[B, N, D] set. The minimum over n takes the first occurrence on exact ties (``torch.min``); NaN wins.
"""
from __future__ import annotations

import torch

from .._layout import as_patch_sets, normalize_patches
from .._validation import check_features_prototypes, check_metric, check_tensor


def prototype_distance_maps(features: torch.Tensor, prototypes: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Full distance maps: [B, M, H', W'] for NCHW features, [B, M, N] for a set [B, N, D]."""
    check_features_prototypes(features, prototypes)
    check_metric(metric)
    X, P, map_shape = as_patch_sets(features, prototypes)
    if metric == "l2":
        S = (X * X).sum(-1)                      # [B, N]
        G = torch.einsum("bnk,mk->bmn", X, P)    # [B, M, N]
        Q = (P * P).sum(-1)                      # [M]
        d = torch.relu(S[:, None, :] - 2 * G + Q[None, :, None])
    else:
        d = 1 - torch.einsum("bnk,mk->bmn", normalize_patches(X), normalize_patches(P))
    return d.reshape(d.shape[0], d.shape[1], *map_shape)


def prototype_min_distances(features: torch.Tensor, prototypes: torch.Tensor, metric: str = "l2"):
    """``(values [B, M], argmin [B, M])``: the minimum of each distance map and its flat position."""
    d = prototype_distance_maps(features, prototypes, metric)
    values, argmin = torch.min(d.flatten(2), dim=2)
    return values, argmin


def log_similarity(distances: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """ProtoPNet's similarity log((d + 1) / (d + eps))."""
    check_tensor("distances", distances)
    return torch.log((distances + 1) / (distances + eps))

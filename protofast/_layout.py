"""One view of every input layout: a set of patch vectors per sample.

ProtoPNet's NCHW maps, ProtoMask's views, DProtoNet's masked vectors and ProtoSolo's channels are all the same
reduction over a set (DESIGN.md §2). ``as_patch_sets`` turns the accepted layouts into

    X [B, N', K]   the patch vectors of each sample (N' = H'·W' valid windows, or N set elements)
    P [M, K]       the prototypes flattened the same way (K = D·h·w, channel-major as in ``Tensor.reshape``)

and the shape of one distance map (``(H', W')`` or ``(N,)``) so results can be viewed back. It is plain torch,
differentiable, and used by the reference and by the fused ops alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def as_patch_sets(features: torch.Tensor, prototypes: torch.Tensor, channels_first: bool = False):
    """Returns ``(X [B, N', K], P [M, K], map_shape)``; inputs must already be validated.

    ``channels_first=True`` (NCHW features only) returns X as [B, K, N'] instead, the transpose of the above:
    a view of the map (or unfold's output) with no copy, for kernels that read that layout.
    """
    M = prototypes.shape[0]
    if features.dim() == 3:  # [B, N, D] set of vectors
        return features, prototypes.reshape(M, -1), (features.shape[1],)
    B, D, H, W = features.shape
    h, w = (prototypes.shape[2], prototypes.shape[3]) if prototypes.dim() == 4 else (1, 1)
    if h == 1 and w == 1:
        X = features.flatten(2)  # [B, D, H·W], patches n = row-major (i, j)
    else:
        # valid sliding window, stride 1: column (i, j) holds x[b, :, i:i+h, j:j+w] flattened as (c, u, v)
        X = F.unfold(features, (h, w))  # [B, D·h·w, H'·W']
    if not channels_first:
        X = X.transpose(1, 2)
    return X, prototypes.reshape(M, -1), (H - h + 1, W - w + 1)


def normalize_patches(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / max(‖x‖₂, 1e-12) along ``dim`` (TesNet's and F.normalize's convention)."""
    return F.normalize(t, dim=dim, eps=1e-12)

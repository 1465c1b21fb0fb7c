"""Reference DProtoNet ops (SEMANTICS.md §4), written literally as the paper states them (run in float64).

Masked global average pooling (eq. 8): for feature masks M_i ∈ [0, 1]^{D×H×W} and the feature map F(x),

    z_i(x) = GAP(M_i ⊙ F(x)),   z[b, i, c] = (1 / (H·W)) Σ_{h,w} M_i[c, h, w] · F[b, c, h, w]

This module forms the full product M_i ⊙ F of shape [B, I, D, H, W] on purpose: it is the oracle the fused
:func:`protofast.masked_gap` is tested against (and the "straightforward formulation" of the head benchmark).

The DProtoNet head (eqs. 1–3) on top of it: s[b, i, m] = clamp_min(‖z[b, i]‖² − 2 z[b, i]·p_m + ‖p_m‖², 0),
mind[b, m] = min_i s[b, i, m] (first occurrence), g = log((mind + 1)/(mind + ε)) with ε = 1e-12, logits = g·Wcᵀ.
"""
from __future__ import annotations

import torch
from torch import Tensor


def masked_gap(features: Tensor, masks: Tensor) -> Tensor:
    """``z [B, I, D]`` = GAP(M_i ⊙ F) for features ``[B, D, H, W]`` and masks ``[I, D, H, W]``, materialising the
    ``[B, I, D, H, W]`` product."""
    product = masks[None, :, :, :, :] * features[:, None, :, :, :]          # [B, I, D, H, W]
    return product.mean(dim=(3, 4))


def masked_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """s[b, i, m] = clamp_min(‖z_bi‖² − 2 z_bi·p_m + ‖p_m‖², 0) for z ``[B, I, D]``, prototypes ``[M, D]``
    (eq. 1, expanded as ProtoPNet computes it) → ``[B, I, M]``."""
    p = prototypes.reshape(prototypes.shape[0], -1)
    s = (z * z).sum(-1)[:, :, None] - 2 * torch.einsum("bid,md->bim", z, p) + (p * p).sum(-1)[None, None, :]
    return torch.clamp_min(s, 0)


def head(features: Tensor, masks: Tensor, prototypes: Tensor, last_layer_weight: Tensor, eps: float = 1e-12):
    """The whole DProtoNet head, materialised: ``(logits [B, K], min_distances [B, M], argmin [B, M], z)``."""
    z = masked_gap(features, masks)
    s = masked_distances(z, prototypes)                                      # [B, I, M]
    mind, argmin = torch.min(s, dim=1)
    g = torch.log((mind + 1) / (mind + eps))
    return g @ last_layer_weight.t(), mind, argmin, z


def losses(logits: Tensor, min_distances: Tensor, labels: Tensor, identity: Tensor, last_layer_weight: Tensor,
           cluster_mode: str = "masked_min", sep_sign: str = "protopnet", max_dist: float = None,
           coefs=(1.0, 0.8, -0.08, 1e-4)):
    """L = CE + λ1·Clst + λ2·Sep + λ3·l1 (eqs. 4–7), literally.

    ``cluster_mode="masked_min"``: Clst = mean_b min_{m: class(m)=y_b} mind, and the separation distance
    sd = mean_b min_{m: class(m)≠y_b} mind; ``"masked_max"``: ProtoPNet's multiply-then-max with ``max_dist``.
    ``sep_sign="protopnet"``: Sep = sd (the loss term is λ2·sd = −0.08·sd, repelling); ``"literal"``: the paper's
    Sep = −sd (so λ2·Sep = +0.08·sd). l1 = Σ_{k,m: class(m)≠k} |Wc[k, m]|.
    Returns ``(total, cross_entropy, cluster, separation_distance, l1)``."""
    T = identity[:, labels].t().to(min_distances.dtype)                     # [B, M]
    if cluster_mode == "masked_min":
        inf = torch.full_like(min_distances, float("inf"))
        clst = torch.where(T > 0, min_distances, inf).min(1).values.mean()
        sd = torch.where(T > 0, inf, min_distances).min(1).values.mean()
    else:
        clst = (max_dist - ((max_dist - min_distances) * T).max(1).values).mean()
        sd = (max_dist - ((max_dist - min_distances) * (1 - T)).max(1).values).mean()
    sep = sd if sep_sign == "protopnet" else -sd
    ce = torch.nn.functional.cross_entropy(logits, labels)
    l1 = (last_layer_weight.abs() * (1 - identity.t().to(last_layer_weight.dtype))).sum()
    c_ce, c_clst, c_sep, c_l1 = coefs
    total = c_ce * ce + c_clst * clst + c_sep * sep + c_l1 * l1
    return total, ce, clst, sd, l1

"""The ProtoPNet prototype head computed the way the original code does it (cfchen-duke/ProtoPNet).

This module re-implements, from SEMANTICS.md §1, the operations of the original ``PPNet`` head
(``model.py``) and of its training losses (``train_and_test.py``), with the original's memory behaviour:

* the patch energy ``S`` is obtained by convolving ``x²`` with an all-ones ``(P, C, h, w)`` tensor, i.e. it is
  computed once per prototype (§1.8);
* the distance map ``d`` of shape ``(B, P, H', W')`` and several temporaries of the same size are materialised
  (SEMANTICS.md §7: 31.4 MB each at B = 80, P = 2000, 7×7);
* the min over positions is ``-max_pool2d(-d)`` over the whole map;
* the cluster and separation costs use dense ``(B, P)`` masks and masked *max* (masked zeros compete, §1.4).

It is the "original way" baseline for benchmarks and the oracle of the compat tests. It is deliberately
unoptimised and depends only on the standard library and torch.

Notation (SEMANTICS.md §8): x is the prototype-layer input ``(B, C, H, W)``, p the prototypes ``(P, C, h, w)``,
I the prototype-class identity ``(P, K)``, Wc the last-layer weight ``(K, P)``, y the labels ``(B,)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "LossTerms",
    "cluster_separation_costs",
    "distance_2_similarity",
    "l1_masked",
    "last_layer_incorrect_connection",
    "l2_convolution",
    "_l2_convolution",
    "min_distances",
    "protopnet_forward",
    "protopnet_loss",
    "prototype_class_identity",
    "total_loss",
]


def prototype_class_identity(num_prototypes: int, num_classes: int, *, dtype=torch.float32,
                             device=None) -> torch.Tensor:
    """The initial one-hot class identity ``I`` of shape ``(P, K)``: ``I[m, m // (P / K)] = 1``.

    Prototypes are allocated to classes in contiguous blocks of ``P / K``; the original asserts ``P % K == 0``.
    """
    if num_prototypes % num_classes != 0:
        raise ValueError(f"num_prototypes ({num_prototypes}) must be a multiple of num_classes ({num_classes})")
    per_class = num_prototypes // num_classes
    identity = torch.zeros(num_prototypes, num_classes, dtype=dtype, device=device)
    identity[torch.arange(num_prototypes, device=device),
             torch.arange(num_prototypes, device=device) // per_class] = 1
    return identity


def last_layer_incorrect_connection(identity: torch.Tensor, incorrect_strength: float = -0.5) -> torch.Tensor:
    """The initial last-layer weight ``Wc`` of shape ``(K, P)``: 1 where ``I[m, k] = 1``, else
    ``incorrect_strength`` (−0.5), as ``PPNet.set_last_layer_incorrect_connection``."""
    positive = identity.t()
    return 1.0 * positive + incorrect_strength * (1 - positive)


def _l2_convolution(x: torch.Tensor, prototype_vectors: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every patch of ``x`` to every prototype, the original way.

    ``d[b, m, i, j] = relu(S[b, i, j] − 2·G[b, m, i, j] + Q[m])`` with

    * ``S = conv2d(x², ones)``: the patch energy Σ_{c,u,v} x[b,c,i+u,j+v]², computed once per prototype because
      ``ones`` has shape ``(P, C, h, w)`` (the original's ``self.ones`` Parameter; no gradient flows into it);
    * ``G = conv2d(x, p)``: the cross term Σ_{c,u,v} x[b,c,i+u,j+v]·p[m,c,u,v];
    * ``Q = Σ_{c,u,v} p[m]²`` viewed as ``(P, 1, 1)`` and broadcast.

    Args:
        x: ``(B, C, H, W)`` prototype-layer input.
        prototype_vectors: ``(P, C, h, w)`` prototypes.
        ones: ``(P, C, h, w)`` all-ones tensor.

    Returns:
        ``(B, P, H', W')`` distances with ``H' = H − h + 1``, ``W' = W − w + 1`` (stride 1, no padding).
    """
    x2 = x ** 2
    x2_patch_sum = F.conv2d(input=x2, weight=ones)

    p2 = prototype_vectors ** 2
    p2 = torch.sum(p2, dim=(1, 2, 3))
    p2_reshape = p2.view(-1, 1, 1)

    xp = F.conv2d(input=x, weight=prototype_vectors)
    intermediate_result = -2 * xp + p2_reshape
    distances = F.relu(x2_patch_sum + intermediate_result)
    return distances


#: Public alias of :func:`_l2_convolution` (the original is a private method of ``PPNet``).
l2_convolution = _l2_convolution


def min_distances(distances: torch.Tensor) -> torch.Tensor:
    """Global min pooling of the distance map, the original way: ``-max_pool2d(-d, kernel=(H', W'))``.

    Args:
        distances: ``(B, P, H', W')``.

    Returns:
        ``mind`` of shape ``(B, P)``; its gradient goes to the first occurrence (row-major) of the minimum.
    """
    mind = -F.max_pool2d(-distances, kernel_size=(distances.size()[2], distances.size()[3]))
    return mind.view(-1, distances.size()[1])


def distance_2_similarity(distances: torch.Tensor, activation="log", epsilon: float = 1e-4) -> torch.Tensor:
    """Prototype activation from a distance: ``log((d + 1) / (d + ε))`` for ``'log'`` (ε = 1e-4),
    ``−d`` for ``'linear'``, or ``activation(d)`` for a callable."""
    if activation == "log":
        return torch.log((distances + 1) / (distances + epsilon))
    if activation == "linear":
        return -distances
    if callable(activation):
        return activation(distances)
    raise ValueError(f"activation must be 'log', 'linear' or a callable, got {activation!r}")


def protopnet_forward(x: torch.Tensor, prototype_vectors: torch.Tensor, ones: torch.Tensor,
                      last_layer_weight: torch.Tensor, activation="log", epsilon: float = 1e-4):
    """The head of ``PPNet.forward`` from the prototype-layer input on.

    ``d = _l2_convolution(x, p, ones)``; ``mind = min_{i,j} d``; ``sim = log((mind + 1) / (mind + ε))``;
    ``logits = sim · Wcᵀ`` (``nn.Linear`` without bias).

    Args:
        x: ``(B, C, H, W)``; prototype_vectors, ones: ``(P, C, h, w)``; last_layer_weight: ``(K, P)``.

    Returns:
        ``(logits (B, K), min_distances (B, P))`` as the original.
    """
    distances = _l2_convolution(x, prototype_vectors, ones)
    mind = min_distances(distances)
    activations = distance_2_similarity(mind, activation, epsilon)
    logits = F.linear(activations, last_layer_weight)
    return logits, mind


def cluster_separation_costs(min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor,
                             max_dist: float):
    """Class-specific cluster, separation and average-separation costs with dense masks (SEMANTICS §1.3).

    ``T = I[:, y]ᵀ`` (``(B, P)`` target-class mask);

    * ``clst = mean_b [max_dist − max_m ((max_dist − mind) · T)]``
    * ``sep = mean_b [max_dist − max_m ((max_dist − mind) · (1 − T))]``
    * ``avg_sep = mean_b [Σ_m mind · (1 − T) / Σ_m (1 − T)]`` (logged only, never in the loss)

    The max runs over the whole row, masked-out zeros included (multiply-then-max quirk, §1.8).

    Args:
        min_distances: ``(B, P)``; labels: ``(B,)`` int64; identity: ``(P, K)`` 0/1; max_dist: ``C·h·w``.

    Returns:
        ``(cluster_cost, separation_cost, avg_separation_cost)``, unsigned scalars.
    """
    prototypes_of_correct_class = torch.t(identity[:, labels]).to(min_distances.device)
    inverted_distances, _ = torch.max((max_dist - min_distances) * prototypes_of_correct_class, dim=1)
    cluster_cost = torch.mean(max_dist - inverted_distances)

    prototypes_of_wrong_class = 1 - prototypes_of_correct_class
    inverted_distances_to_nontarget_prototypes, _ = \
        torch.max((max_dist - min_distances) * prototypes_of_wrong_class, dim=1)
    separation_cost = torch.mean(max_dist - inverted_distances_to_nontarget_prototypes)

    avg_separation_cost = \
        torch.sum(min_distances * prototypes_of_wrong_class, dim=1) / torch.sum(prototypes_of_wrong_class, dim=1)
    avg_separation_cost = torch.mean(avg_separation_cost)
    return cluster_cost, separation_cost, avg_separation_cost


def l1_masked(last_layer_weight: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """``l1 = ‖Wc · (1 − Iᵀ)‖₁`` (``use_l1_mask = True``): L1 norm of the weights to wrong-class prototypes."""
    l1_mask = 1 - torch.t(identity).to(last_layer_weight.device)
    return (last_layer_weight * l1_mask).norm(p=1)


class LossTerms(NamedTuple):
    """The terms of one training step of the original (class_specific = True)."""

    total: torch.Tensor
    cross_entropy: torch.Tensor
    cluster: torch.Tensor
    separation: torch.Tensor
    avg_separation: torch.Tensor
    l1: torch.Tensor


def total_loss(logits: torch.Tensor, min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor,
               last_layer_weight: torch.Tensor, max_dist: float, coefs=None) -> LossTerms:
    """The original training loss ``CE + 0.8·clst − 0.08·sep + 1e-4·l1`` and its terms.

    Args:
        logits: ``(B, K)``; min_distances: ``(B, P)``; labels: ``(B,)``; identity: ``(P, K)``;
        last_layer_weight: ``(K, P)``; max_dist: ``C·h·w``;
        coefs: optional dict with keys ``crs_ent``, ``clst``, ``sep``, ``l1`` (defaults 1, 0.8, −0.08, 1e-4; the
            sign of the separation term lives in its coefficient, as in the original ``settings.py``).
    """
    c = {"crs_ent": 1.0, "clst": 0.8, "sep": -0.08, "l1": 1e-4}
    if coefs is not None:
        c.update(coefs)
    cross_entropy = F.cross_entropy(logits, labels)
    cluster, separation, avg_separation = cluster_separation_costs(min_distances, labels, identity, max_dist)
    l1 = l1_masked(last_layer_weight, identity)
    total = (c["crs_ent"] * cross_entropy + c["clst"] * cluster + c["sep"] * separation + c["l1"] * l1)
    return LossTerms(total, cross_entropy, cluster, separation, avg_separation, l1)


def protopnet_loss(x: torch.Tensor, prototype_vectors: torch.Tensor, ones: torch.Tensor,
                   last_layer_weight: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor,
                   epsilon: float = 1e-4) -> torch.Tensor:
    """One training-step loss of the original head, end to end (distances → min → log-similarity → logits →
    ``CE + 0.8·clst − 0.08·sep + 1e-4·l1``), with ``max_dist = C·h·w``. Returns the scalar total."""
    logits, mind = protopnet_forward(x, prototype_vectors, ones, last_layer_weight, "log", epsilon)
    max_dist = prototype_vectors.shape[1] * prototype_vectors.shape[2] * prototype_vectors.shape[3]
    return total_loss(logits, mind, labels, identity, last_layer_weight, max_dist).total

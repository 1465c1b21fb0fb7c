"""Reference PIP-Net presence scores and losses (SEMANTICS.md §2.2–§2.4), plain PyTorch, autograd for gradients.

Two formulations, both materialising the softmax map z [2B, D, H, W] that the fused ops avoid:

- ``pipnet_presence`` / ``pipnet_losses``: the math of SEMANTICS.md written out term by term (the float64 test
  oracle). With a = features [2B, D, H, W], N = H·W, view 1 = the first B samples:

      z[b, :, i, j] = softmax_d a[b, :, i, j]
      pooled[b, d]  = max_{i,j} z[b, d, i, j]                   (first occurrence; NaN propagates)
      out           = pooled · relu(Wc)ᵀ + bias                 [2B, K]
      L_A = ½ ( −mean_n log(⟨r1_n, sg(r2_n)⟩ + 1e-12) − mean_n log(⟨r2_n, sg(r1_n)⟩ + 1e-12) )
      L_T = −½ ( mean_d log(tanh(Σ_b pooled1[b, d]) + 1e-8) + mean_d log(tanh(Σ_b pooled2[b, d]) + 1e-8) )
      L_C = NLL(log_softmax(log1p(out^κ)), [y; y])             (mean, or weighted mean with class_weight)
      loss = λ_A·L_A + λ_T·L_T + λ_C·L_C                         (terms with weight 0 are left out)

  rows r1_n = z1[b, :, i, j], n = (b·H + i)·W + j; sg = detach.

- ``original_forward`` + ``original_calculate_loss``: M-Nauta/PIPNet's eager code path as the original computes
  it (Softmax module, AdaptiveMaxPool2d + Flatten, NonNegLinear, chunk/flatten/permute/einsum in
  ``calculate_loss``). The benchmark times it against protofast; the tests check it equals the oracle.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

EPS_A = 1e-12
EPS_T = 1e-8

# phase -> default (align, tanh, classification) weights; pretrain's align weight is epoch / epochs_pretrain
PHASE_WEIGHTS = {"pretrain": (1.0, 5.0, 0.0), "train": (5.0, 2.0, 2.0), "finetune": (0.0, 0.0, 2.0)}


class PIPNetLosses(NamedTuple):
    """Outputs of :func:`protofast.pipnet_losses`: the weighted loss, its three terms, the presence scores
    ``pooled [2B, D]`` and the class scores ``out [2B, K]`` (None without a classifier)."""
    loss: torch.Tensor
    align: torch.Tensor
    tanh: torch.Tensor
    classification: torch.Tensor
    pooled: torch.Tensor
    out: Optional[torch.Tensor]


def _compute_dtype(features):
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


def pipnet_presence(features):
    """``(pooled [B, D], argmax [B, D])``: channel softmax at every location, then the max over locations."""
    z = torch.softmax(_compute_dtype(features), dim=1)
    pooled, idx = F.adaptive_max_pool2d(z, 1, return_indices=True)
    return pooled.flatten(1), idx.flatten(1)


def align_loss(z):
    """L_A of the two-view map z [2B, D, H, W] (view 1 first), with the detach of SEMANTICS.md §2.3."""
    z1, z2 = z.chunk(2)
    r1 = z1.permute(0, 2, 3, 1).reshape(-1, z.shape[1])          # row n = (b·H + i)·W + j
    r2 = z2.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    first = -torch.log((r1 * r2.detach()).sum(1) + EPS_A).mean()
    second = -torch.log((r2 * r1.detach()).sum(1) + EPS_A).mean()
    return 0.5 * (first + second)


def tanh_loss(pooled):
    """L_T of pooled [2B, D]: sum over the batch of each view, mean over prototypes, averaged over the views."""
    p1, p2 = pooled.chunk(2)
    t1 = torch.log(torch.tanh(p1.sum(0)) + EPS_T).mean()
    t2 = torch.log(torch.tanh(p2.sum(0)) + EPS_T).mean()
    return -0.5 * (t1 + t2)


def classification_scores(pooled, classifier_weight, classifier_bias=None):
    """out = pooled · relu(Wc)ᵀ + bias (NonNegLinear)."""
    return F.linear(pooled, torch.relu(classifier_weight), classifier_bias)


def classification_loss(out, labels2, normalization_multiplier=2.0, class_weight=None):
    """L_C = NLL(log_softmax(log1p(out^κ)), labels2) with labels2 = [y; y]."""
    return F.nll_loss(F.log_softmax(torch.log1p(out ** normalization_multiplier), dim=1), labels2,
                      weight=class_weight)


def phase_weights(phase, align_weight=None, tanh_weight=None):
    a, t, c = PHASE_WEIGHTS[phase]
    return (a if align_weight is None else float(align_weight), t if tanh_weight is None else float(tanh_weight),
            c)


def pipnet_losses(features, labels=None, classifier_weight=None, classifier_bias=None,
                  normalization_multiplier=2.0, phase="train", align_weight=None, tanh_weight=None,
                  class_weight=None, odd_batch="error"):
    """The oracle of :func:`protofast.pipnet_losses` (same arguments and outputs)."""
    if features.shape[0] % 2:
        if odd_batch != "drop_last":
            raise ValueError("features must hold an even number of samples [2B] (two views)")
        features = features[:-1]
        if labels is not None and labels.shape[0] == features.shape[0] + 1:
            labels = labels[:-1]
    a = _compute_dtype(features)
    z = torch.softmax(a, dim=1)
    pooled, _ = F.adaptive_max_pool2d(z, 1, return_indices=True)
    pooled = pooled.flatten(1)
    L_A = align_loss(z)
    L_T = tanh_loss(pooled)
    zero = pooled.new_zeros(())
    out = None
    L_C = zero
    if classifier_weight is not None:
        out = classification_scores(pooled, classifier_weight, classifier_bias)
        if labels is not None:
            B2 = features.shape[0]
            labels2 = labels if labels.shape[0] == B2 else torch.cat([labels, labels])
            L_C = classification_loss(out, labels2.long(), normalization_multiplier, class_weight)
    wa, wt, wc = phase_weights(phase, align_weight, tanh_weight)
    loss = zero
    for w, term in ((wa, L_A), (wt, L_T), (wc, L_C)):
        if w != 0:
            loss = loss + w * term
    return PIPNetLosses(loss, L_A, L_T, L_C, pooled, out)


# ------------------------------------------------------------------------------------------------ the original
def original_forward(features, classifier_weight, classifier_bias=None, inference=False):
    """M-Nauta/PIPNet ``PIPNet.forward`` after the backbone (num_features = 0): add-on = Softmax(dim=1),
    pool = AdaptiveMaxPool2d((1, 1)) + Flatten, classification = NonNegLinear. Returns (proto_features, pooled,
    out) like the original."""
    proto_features = torch.nn.functional.softmax(features, dim=1)
    pooled = torch.flatten(F.adaptive_max_pool2d(proto_features, (1, 1)), 1)
    if inference:
        clamped_pooled = torch.where(pooled < 0.1, 0., pooled)
        return proto_features, clamped_pooled, F.linear(clamped_pooled, torch.relu(classifier_weight),
                                                        classifier_bias)
    return proto_features, pooled, F.linear(pooled, torch.relu(classifier_weight), classifier_bias)


def _original_align_loss(inputs, targets, EPS=1e-12):
    assert inputs.shape == targets.shape
    assert targets.requires_grad is False
    loss = torch.einsum("nc,nc->n", [inputs, targets])
    loss = -torch.log(loss + EPS).mean()
    return loss


def original_calculate_loss(proto_features, pooled, out, ys1, align_pf_weight, t_weight, cl_weight,
                            net_normalization_multiplier, pretrain, finetune, criterion, EPS=1e-8):
    """M-Nauta/PIPNet ``train.calculate_loss`` (the uniformity term, off by default, and the logging left out)."""
    ys = torch.cat([ys1, ys1])
    pooled1, pooled2 = pooled.chunk(2)
    pf1, pf2 = proto_features.chunk(2)

    embv2 = pf2.flatten(start_dim=2).permute(0, 2, 1).flatten(end_dim=1)
    embv1 = pf1.flatten(start_dim=2).permute(0, 2, 1).flatten(end_dim=1)

    a_loss_pf = (_original_align_loss(embv1, embv2.detach()) + _original_align_loss(embv2, embv1.detach())) / 2.
    tanh_loss = -(torch.log(torch.tanh(torch.sum(pooled1, dim=0)) + EPS).mean()
                  + torch.log(torch.tanh(torch.sum(pooled2, dim=0)) + EPS).mean()) / 2.

    if not finetune:
        loss = align_pf_weight * a_loss_pf
        loss += t_weight * tanh_loss

    if not pretrain:
        softmax_inputs = torch.log1p(out ** net_normalization_multiplier)
        class_loss = criterion(F.log_softmax((softmax_inputs), dim=1), ys)

        if finetune:
            loss = cl_weight * class_loss
        else:
            loss += cl_weight * class_loss
    return loss

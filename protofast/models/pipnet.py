"""PIP-Net ("Patch-based Intuitive Prototypes", Nauta et al. 2023) built on protofast's fused PIP-Net ops.

Architecture and training semantics follow M-Nauta/PIPNet (SEMANTICS.md §2):

- ``a = add_on(backbone(x))`` ``[B, D, H, W]``: the pre-softmax prototype features (``add_on`` is the identity when
  ``num_prototypes`` is None, so D = the backbone's channels, else a 1×1 conv with bias, Xavier-uniform with the
  sigmoid gain);
- ``z[b, :, i, j] = softmax_d a[b, :, i, j]``, ``pooled[b, d] = max_ij z[b, d, i, j]`` (the presence scores, in
  [0, 1]) — computed by :func:`protofast.pipnet_presence`, which never materialises ``z``;
- ``out = pooled · relu(Wc)ᵀ + bias`` (the non-negative scoring sheet, :class:`NonNegativeLinear`); with
  ``inference=True`` the presence scores below 0.1 are set to 0 first (and returned so);
- the training loss (align, tanh, classification on ``log1p(out^κ)``) is :func:`protofast.pipnet_losses` on the
  two-view batch (:meth:`PIPNet.losses`), which recomputes the softmax in its backward instead of storing it;
- after every optimizer step outside pretraining :meth:`PIPNet.shrink_weights_`: ``Wc ← max(Wc − 1e-3, 0)``,
  ``κ ← max(κ, 1)``, ``bias ← max(bias, 0)`` (weights driven to 0 stay 0: relu gives them no gradient).

Explanation size (the paper's Table 1, counted as the original's evaluation does, with ``eps = 1e-3``):
global size = prototypes with a weight > eps to some class; sparsity ratio = fraction of weights ≤ eps; local
size per image = prototypes present (inference score ≥ 0.1, i.e. non-zero after the clamp) with
``pooled · w > eps`` for some class (``all_classes``) or for the predicted class (``predicted``).

Dataset-wide top-k (:func:`dataset_topk`): per prototype the k images of a dataset with the highest presence
score (inference scores, as the original's visualisation), with the location of the maximum, streamed batch by
batch on the model's device; :func:`zero_unused_prototypes` then zeroes the classifier column of every relevant
prototype whose top-k never exceeds 0.1 (the original's step after training).

Shapes: B images, D prototypes (channels), (H, W) feature map, K classes, N dataset size.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import protofast

from .protopnet import _infer_channels, build_backbone

__all__ = ["PIPNet", "NonNegativeLinear", "PrototypeTopK", "dataset_topk", "zero_unused_prototypes",
           "ExplanationSize"]

#: the original's lrs: classifier 0.05, backbone 5e-4, add-on 10 × lr_block (5e-4)
DEFAULT_LRS = {"backbone": 5e-4, "add_on": 5e-3, "classification": 0.05}


class NonNegativeLinear(nn.Module):
    """The scoring sheet: ``out = pooled · relu(weight)ᵀ + bias``.

    ``weight`` [K, D] initialised N(1.0, 0.1); ``bias`` [K] (0) or None; ``normalization_multiplier`` κ, a
    ``[1]`` Parameter = 2.0 with ``requires_grad=False`` (the exponent in ``log1p(out^κ)`` of the training loss).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, normalization_multiplier: float = 2.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.normalization_multiplier = nn.Parameter(torch.full((1,), float(normalization_multiplier)),
                                                     requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=1.0, std=0.1)

    def forward(self, pooled: Tensor) -> Tensor:
        return F.linear(pooled, torch.relu(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ExplanationSize(NamedTuple):
    """Per image: ``all_classes`` [B] and ``predicted`` [B] int64 local sizes (see the module docstring)."""

    all_classes: Tensor
    predicted: Tensor


class PIPNet(nn.Module):
    """PIP-Net: backbone → (optional 1×1 conv add-on) → channel softmax → max-pool → non-negative scoring sheet.

    Args:
        backbone: ``nn.Module`` mapping images to ``[B, C, H, W]``.
        num_classes: K.
        num_prototypes: None → D = C (the original's default ``num_features=0``); an int → a 1×1 conv C → D with
            bias (Xavier-uniform, sigmoid gain; the original's ``num_features > 0``).
        bias: classifier bias (off in the original's default).
        backbone_channels: C; default ``backbone.out_channels`` or a dummy forward of ``input_shape``.
        input_shape: image shape for that dummy forward.
        inference_clamp: presence scores below it are set to 0 when ``inference=True`` (0.1).
        weight_shrink: subtracted from every classifier weight by :meth:`shrink_weights_` (1e-3; the original's
            comment says it only zeroes small weights, but it shrinks all of them — SEMANTICS §2.5).
        normalization_multiplier: initial κ (2.0).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_prototypes: Optional[int] = None,
                 bias: bool = False, backbone_channels: Optional[int] = None,
                 input_shape: Sequence[int] = (3, 64, 64), inference_clamp: float = 0.1,
                 weight_shrink: float = 1e-3, normalization_multiplier: float = 2.0):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if num_prototypes is not None and (isinstance(num_prototypes, bool) or not isinstance(num_prototypes, int)
                                           or num_prototypes < 1):
            raise ValueError(f"num_prototypes must be None or a positive int, got {num_prototypes!r}")
        if not inference_clamp >= 0:
            raise ValueError(f"inference_clamp must be >= 0, got {inference_clamp}")
        if not weight_shrink >= 0:
            raise ValueError(f"weight_shrink must be >= 0, got {weight_shrink}")
        self.backbone = backbone
        C = int(backbone_channels) if backbone_channels is not None else _infer_channels(backbone, input_shape)
        self.backbone_channels = C
        self.num_classes = num_classes
        self.num_prototypes_arg = num_prototypes
        if num_prototypes is None:
            self.add_on = nn.Identity()
            self.num_prototypes = C
        else:
            self.add_on = nn.Conv2d(C, num_prototypes, kernel_size=1, bias=True)
            nn.init.xavier_uniform_(self.add_on.weight, gain=nn.init.calculate_gain("sigmoid"))
            self.num_prototypes = num_prototypes
        self.classification = NonNegativeLinear(self.num_prototypes, num_classes, bias=bias,
                                                normalization_multiplier=normalization_multiplier)
        self.inference_clamp = float(inference_clamp)
        self.weight_shrink = float(weight_shrink)

    # ------------------------------------------------------------------------------------------ forward
    def features(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` → pre-softmax prototype features ``a [B, D, H, W]``."""
        a = self.add_on(self.backbone(x))
        if a.dim() != 4 or a.shape[1] != self.num_prototypes:
            raise ValueError(f"features must be [B, {self.num_prototypes}, H, W], got {tuple(a.shape)}; "
                             "check backbone_channels")
        return a

    def softmax_maps(self, x: Tensor) -> Tensor:
        """The full softmax map ``z [B, D, H, W]`` (materialised: for visualisation only)."""
        return torch.softmax(self.features(x), dim=1)

    def presence(self, x: Tensor, inference: bool = False) -> Tuple[Tensor, Tensor]:
        """``(pooled [B, D], argmax [B, D])``: presence scores and the flat location ``i·W + j`` of each maximum
        (first occurrence); with ``inference`` the scores below ``inference_clamp`` are 0."""
        pooled, argmax = protofast.pipnet_presence(self.features(x))
        if inference:
            pooled = self._clamp(pooled)
        return pooled, argmax

    def _clamp(self, pooled: Tensor) -> Tensor:
        return torch.where(pooled < self.inference_clamp, torch.zeros((), dtype=pooled.dtype, device=pooled.device),
                           pooled)

    def forward(self, x: Tensor, inference: bool = False) -> Tuple[Tensor, Tensor]:
        """``(pooled [B, D], out [B, K])``; with ``inference`` pooled is clamped (``< 0.1 → 0``) before the
        classifier and returned clamped, as the original."""
        pooled, _ = self.presence(x, inference=inference)
        return pooled, self.classification(pooled)

    def losses(self, x: Tensor, labels: Optional[Tensor] = None, phase: str = "train",
               align_weight: Optional[float] = None, tanh_weight: Optional[float] = None,
               class_weight: Optional[Tensor] = None, odd_batch: str = "error"):
        """The training loss of one step on the two-view batch ``x = [view 1; view 2]`` ``[2B, 3, S, S]``:
        :func:`protofast.pipnet_losses` (``PIPNetLosses(loss, align, tanh, classification, pooled, out)``).
        ``labels`` [B] (one view's labels) or [2B]; ``phase`` "pretrain" (pass ``align_weight=epoch/epochs``),
        "train" (5·L_A + 2·L_T + 2·L_C) or "finetune" (2·L_C)."""
        kappa = self.classification.normalization_multiplier.detach().reshape(())
        with_classifier = labels is not None
        return protofast.pipnet_losses(
            self.features(x), labels=labels,
            classifier_weight=self.classification.weight if with_classifier else None,
            classifier_bias=self.classification.bias if with_classifier else None,
            normalization_multiplier=kappa, phase=phase, align_weight=align_weight, tanh_weight=tanh_weight,
            class_weight=class_weight, odd_batch=odd_batch)

    @torch.no_grad()
    def shrink_weights_(self) -> None:
        """After every step outside pretraining: ``Wc ← max(Wc − weight_shrink, 0)``, ``κ ← max(κ, 1)``,
        ``bias ← max(bias, 0)``."""
        c = self.classification
        c.weight.sub_(self.weight_shrink).clamp_(min=0.0)
        c.normalization_multiplier.clamp_(min=1.0)
        if c.bias is not None:
            c.bias.clamp_(min=0.0)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(prediction [B] int64, out [B, K], pooled [B, D])`` with ``inference=True``; the prediction is the
        first-occurrence argmax of ``out``, or −1 (abstain: "I haven't seen this before") where ``out`` is all
        zero."""
        pooled, out = self(x, inference=True)
        return self.prediction_from_out(out), out, pooled

    @staticmethod
    def prediction_from_out(out: Tensor) -> Tensor:
        best, pred = out.max(dim=1)
        return torch.where(best == 0, torch.full_like(pred, -1), pred)

    # ------------------------------------------------------------------------------------------ explanation size
    def global_size(self, eps: float = 1e-3) -> int:
        """Prototypes with a classifier weight > eps to at least one class."""
        return int((self.classification.weight.detach() > eps).any(dim=0).sum())

    def sparsity(self, eps: float = 1e-3) -> float:
        """Fraction of classifier weights ≤ eps (the paper's sparsity ratio)."""
        w = self.classification.weight.detach()
        return float((w <= eps).sum()) / max(w.numel(), 1)

    def used_prototypes(self, eps: float = 1e-3) -> Tensor:
        """Indices of the prototypes counted by :meth:`global_size`."""
        return torch.nonzero((self.classification.weight.detach() > eps).any(dim=0)).flatten()

    @torch.no_grad()
    def local_size(self, pooled: Tensor, prediction: Optional[Tensor] = None, eps: float = 1e-3) -> ExplanationSize:
        """Per-image local explanation size from the inference (clamped) presence scores ``pooled [B, D]``:
        ``all_classes[b] = #{d : max_k pooled[b, d]·relu(Wc[k, d]) > eps}``,
        ``predicted[b] = #{d : pooled[b, d]·relu(Wc[ŷ_b, d]) > eps}`` with ŷ = ``prediction`` (default: the
        argmax of the output; an abstained image (−1) has size 0)."""
        w = torch.relu(self.classification.weight.detach()).to(pooled.dtype)            # [K, D]
        contrib = pooled.unsqueeze(1) * w.unsqueeze(0)                                   # [B, K, D]
        all_classes = (contrib > eps).any(dim=1).sum(dim=1)
        if prediction is None:
            prediction = self.prediction_from_out(self.classification(pooled))
        safe = prediction.clamp(min=0)
        predicted = (contrib[torch.arange(pooled.shape[0], device=pooled.device), safe] > eps).sum(dim=1)
        predicted = torch.where(prediction < 0, torch.zeros_like(predicted), predicted)
        return ExplanationSize(all_classes, predicted)

    # ------------------------------------------------------------------------------------------ optimisation
    def param_groups(self, lrs: Optional[dict] = None, lr_scale: float = 1.0) -> list:
        """AdamW parameter groups ``backbone``, ``add_on`` (if any parameters), ``classification`` (weight and
        bias; κ is not trained) with the original's lrs (:data:`DEFAULT_LRS`), ``weight_decay`` 0."""
        lrs = {**DEFAULT_LRS, **(lrs or {})}
        groups = [("backbone", list(self.backbone.parameters())), ("add_on", list(self.add_on.parameters())),
                  ("classification", [p for p in (self.classification.weight, self.classification.bias)
                                      if p is not None])]
        return [{"params": ps, "lr": lrs[name] * lr_scale, "weight_decay": 0.0, "name": name}
                for name, ps in groups if ps]

    # ------------------------------------------------------------------------------------------ config
    def config(self) -> dict:
        spec = self.backbone.config() if hasattr(self.backbone, "config") else {"name": type(self.backbone).__name__}
        return dict(backbone=spec, num_classes=self.num_classes, num_prototypes=self.num_prototypes_arg,
                    bias=self.classification.bias is not None, backbone_channels=self.backbone_channels,
                    inference_clamp=self.inference_clamp, weight_shrink=self.weight_shrink)

    @classmethod
    def from_config(cls, config: dict, backbone: Optional[nn.Module] = None) -> "PIPNet":
        config = dict(config)
        spec = config.pop("backbone")
        return cls(backbone if backbone is not None else build_backbone(spec), **config)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
                f"inference_clamp={self.inference_clamp}, weight_shrink={self.weight_shrink}")


# ---------------------------------------------------------------------------------------------- top-k
class PrototypeTopK(NamedTuple):
    """Per prototype d, its top-k images of a dataset (descending score; fewer than k images → padded with score
    −inf and index/location −1):

    - ``scores`` [D, k] presence scores (inference scores by default: below 0.1 → 0);
    - ``image_index`` [D, k] int64 positions in the loader's order;
    - ``location`` [D, k] int64 flat ``i·W + j`` of the maximum in that image (first occurrence);
    - ``relevant`` [D] bool: prototypes with a classifier weight > 1e-3 to some class (the original only
      tracks those; :func:`zero_unused_prototypes` only touches those);
    - ``feature_shape`` (H, W) of the feature map.
    """

    scores: Tensor
    image_index: Tensor
    location: Tensor
    relevant: Tensor
    feature_shape: Tuple[int, int]


def _images_of(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def dataset_topk(model: PIPNet, loader, k: int = 10, tie: str = "stable", inference: bool = True,
                 generator: Optional[torch.Generator] = None, device=None) -> PrototypeTopK:
    """Streamed dataset-wide top-k of image patches per prototype (replaces the original's batch-size-1 Python
    loop over images and prototypes).

    Each batch is forwarded once (:func:`protofast.pipnet_presence`), its ``[B, D]`` scores are merged into the
    running ``[D, k]`` top-k on the model's device by one sort of ``[D, k + B]`` candidates.

    Args:
        model: a :class:`PIPNet` (evaluated in eval mode; its mode is restored).
        loader: iterable of image batches or ``(images, ...)`` tuples; image indices count in its order.
        k: entries per prototype.
        tie: ``"stable"`` (default): score descending, then the earliest image; ``"random"``: ties broken
            uniformly at random (``generator``) — the original flips a coin at each tied replacement, which is
            order-dependent and not reproduced exactly (SEMANTICS §2.5: ``topk_tie``).
        inference: score with the inference clamp (the original does), else the raw presence scores.
    NaN scores sort as the largest (torch.sort).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if tie not in ("stable", "random"):
        raise ValueError(f"tie must be 'stable' or 'random', got {tie!r}")
    net = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    device = device or next(net.parameters()).device
    D = net.num_prototypes
    scores = None
    index = torch.empty((D, 0), dtype=torch.long, device=device)
    location = torch.empty((D, 0), dtype=torch.long, device=device)
    seen, shape = 0, (0, 0)
    was_training = net.training
    net.eval()
    try:
        for batch in loader:
            x = _images_of(batch).to(device)
            a = net.features(x)
            shape = (int(a.shape[2]), int(a.shape[3]))
            pooled, argmax = protofast.pipnet_presence(a)
            if inference:
                pooled = net._clamp(pooled)
            B = pooled.shape[0]
            if scores is None:
                scores = torch.empty((D, 0), dtype=pooled.dtype, device=device)
            cand_s = torch.cat([scores, pooled.t()], dim=1)                                    # [D, m + B]
            cand_i = torch.cat([index, torch.arange(seen, seen + B, device=device).expand(D, B)], dim=1)
            cand_l = torch.cat([location, argmax.t()], dim=1)
            if tie == "random":
                # a random order first, then a stable sort by score: uniformly random among equal scores
                perm = torch.argsort(torch.rand(cand_s.shape, generator=generator).to(device), dim=1)
                cand_s, cand_i, cand_l = (t.gather(1, perm) for t in (cand_s, cand_i, cand_l))
            order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]
            scores, index, location = (t.gather(1, order) for t in (cand_s, cand_i, cand_l))
            seen += B
    finally:
        net.train(was_training)
    if scores is None:
        scores = torch.empty((D, 0), dtype=net.classification.weight.dtype, device=device)
    pad = k - scores.shape[1]
    if pad > 0:
        scores = torch.cat([scores, torch.full((D, pad), float("-inf"), dtype=scores.dtype, device=device)], dim=1)
        index = torch.cat([index, torch.full((D, pad), -1, dtype=torch.long, device=device)], dim=1)
        location = torch.cat([location, torch.full((D, pad), -1, dtype=torch.long, device=device)], dim=1)
    relevant = (net.classification.weight.detach() > 1e-3).any(dim=0).to(device)
    return PrototypeTopK(scores, index, location, relevant, shape)


@torch.no_grad()
def zero_unused_prototypes(model: PIPNet, topk: PrototypeTopK, threshold: float = 0.1) -> Tensor:
    """Zero the classifier column of every relevant prototype whose top-k scores never exceed ``threshold``
    (the original's step after training: "never detected with similarity > 0.1"); returns their indices."""
    net = model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
    found = (topk.scores > threshold).any(dim=1)
    unused = torch.nonzero(topk.relevant & ~found).flatten()
    net.classification.weight[:, unused.to(net.classification.weight.device)] = 0
    return unused

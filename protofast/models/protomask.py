"""ProtoMask ("ProtoMask: Segmentation-Guided Prototype Learning", uos-sis/quanproto) on protofast's operators.

SEMANTICS.md §3.3. For views ``x [B, V, 3, S, S]`` (the mask crops of :func:`protofast.mask_views`):

* ``e = sigmoid(GAP(conv1x1(backbone(x))))`` ``[B, V, D]``, the backbone run once on all B·V views;
* ``dv[b, v, m] = relu(‖e[b, v]‖² − 2 e[b, v]·p_m + ‖p_m‖²)``, ``mind[b, m] = min_v dv`` (first-occurrence view),
  by :func:`protofast.prototype_min_distances` on the ``[B, V, D]`` sets (dv is never formed);
* ``sim = log((1 + mind)/(mind + ε))`` (ε = 1e-14, quanproto), ``logits = sim · Wcᵀ`` (Wc = 1 own class, else 0);
* joint loss ``CE + 0.8·clst − 0.2·sep + 0.2·div``, fine-tune loss ``CE + 1e-3·l1``; clst/sep as ProtoPNet
  (multiply-then-max, max_dist = D), ``div = mean_b exp(−0.001 Σ_{i,j} ‖v_i − v_j‖₂)`` over the prototypes v of
  class y_b (all ordered pairs).

Shapes: B images, V views per image, D embedding channels, M prototypes, K classes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import protofast

from .protopnet import _infer_channels, build_backbone, check_loss_inputs

__all__ = ["ProtoMask", "diversity_loss", "push_protomask", "MaskPushResult"]

#: quanproto best_params (CUB, SAM2): joint lrs, fine-tune lr; the add-on lr is used only with train_add_on=True
DEFAULT_LRS = {"features": 6e-5, "add_on_layers": 3e-3, "prototype_vectors": 3e-3, "last_layer": 3e-4}
#: quanproto coefs; ``sep`` is subtracted (the loss is crs_ent·CE + clst·clst − sep·sep + div·div)
DEFAULT_COEFS = {"crs_ent": 1.0, "clst": 0.8, "sep": 0.2, "div": 0.2, "l1": 1e-3}
PHASES = ("joint", "fine_tune")


def _class_blocks(identity: Tensor) -> Tuple[Tensor, Tensor]:
    """``(table [K, c] int64, valid [K, c] bool)``: the prototypes of each class (k(m) = first argmax of I[m]),
    in increasing m, padded with M (c = the largest class; classes may be ragged)."""
    from ..push import _class_table

    M, K = identity.shape
    cls = torch.argmax(identity.detach().to("cpu", torch.float64), dim=1)
    table = _class_table(cls, K, M, identity.device)
    return table, table < M


def diversity_loss(prototypes: Tensor, prototype_class_identity: Tensor, labels: Tensor,
                   differentiable: bool = False, class_blocks: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """ProtoMask's diversity term ``mean_b exp(−0.001 · Σ_{i≠j} ‖v_i − v_j‖₂)`` over the prototypes v_i of class
    y_b (ordered pairs: each unordered pair counts twice; the i = j terms are 0 and left out).

    Computed per class from a Gram matrix (``‖v_i − v_j‖² = ‖v_i‖² + ‖v_j‖² − 2 v_i·v_j``, clamped at 0) on the
    ``[K, c, D]`` class blocks: O(K·c²) memory, ragged classes padded and masked, any batch size and any class
    size (a single-prototype class gives exp(0) = 1). ``‖·‖`` at a zero difference has gradient 0.

    Args:
        prototypes: ``[M, D]`` or ``[M, D, 1, 1]``.
        prototype_class_identity: ``[M, K]`` 0/1.
        labels: ``[B]`` class indices.
        differentiable: False reproduces quanproto (the term is a Python float: value only, no gradient);
            True lets the gradient reach the prototypes.
        class_blocks: ``(table, valid)`` from a previous call's class layout (``ProtoMask`` caches it, so a
            training step does not read the identity back to the host).
    Returns:
        a scalar in the prototypes' dtype.
    """
    P = prototypes.reshape(prototypes.shape[0], -1)
    table, valid = class_blocks if class_blocks is not None else _class_blocks(prototype_class_identity)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        Pp = torch.cat([P, P.new_zeros(1, P.shape[1])])[table]                         # [K, c, D]
        sq = (Pp * Pp).sum(-1)
        d2 = sq[:, :, None] + sq[:, None, :] - 2 * Pp @ Pp.transpose(1, 2)             # [K, c, c]
        c = table.shape[1]
        pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(c, dtype=torch.bool, device=P.device)
        pos = pair & (d2 > 0)
        dist = torch.where(pos, torch.sqrt(torch.where(pos, d2, torch.ones_like(d2))), torch.zeros_like(d2))
        per_class = torch.exp(-0.001 * dist.sum((1, 2)))                              # [K]
        out = per_class[labels.to(per_class.device)].mean()
    return out if differentiable else out.detach()


def _fill_invalid_views(e: Tensor, view_valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Replace each invalid view's embedding by its image's first valid view: the min over views of the result
    equals the min over the valid views, with the same first occurrence once indices are mapped back through
    ``src [B, V]`` (src[b, v] = v if valid else the first valid view). Gradients reach the valid views only."""
    B, V, _ = e.shape
    valid = view_valid.to(device=e.device, dtype=torch.bool)
    if not bool(valid.any(1).all()):
        b = int((~valid.any(1)).nonzero()[0, 0])
        raise ValueError(f"view_valid marks no view of image {b} as valid")
    first = torch.argmax(valid.to(torch.uint8), dim=1)                                 # first valid view
    ar = torch.arange(V, device=e.device)[None, :].expand(B, V)
    src = torch.where(valid, ar, first[:, None])
    return e.gather(1, src[:, :, None].expand_as(e)), src


class ProtoMask(nn.Module):
    """ProtoMask: backbone on every mask view → 1×1 conv, global average pool, sigmoid → min distance over views →
    log-similarity → last layer.

    Args:
        backbone: ``nn.Module`` mapping ``[N, 3, S, S]`` views to ``[N, C, h, w]`` (quanproto: resnet50).
        num_classes: K.
        prototypes_per_class: int (class of m = m // n) or a length-K sequence of class sizes (ragged classes,
            contiguous blocks).
        embedding_dim: D (quanproto 1280).
        epsilon: ε of the log-similarity (quanproto 1e-14).
        backbone_channels: C; default from ``backbone.out_channels`` or a dummy forward of ``input_shape``.
        input_shape: one view's shape for that dummy forward.
        incorrect_strength: initial last-layer weight to other classes' prototypes (quanproto 0).
        coefs: overrides of ``crs_ent, clst, sep, div, l1`` (sep is subtracted).
        div_grad: False (quanproto: the diversity term is a constant, no gradient) or True (differentiable).
        train_add_on: False (quanproto: the joint optimiser holds only the backbone and the prototypes, the add-on
            conv stays at its init) or True (the add-on joins the joint optimiser).
        exact_cluster: see :func:`protofast.cluster_separation_costs` (False = the original multiply-then-max).

    Attributes: ``features``, ``add_on_layers`` (Conv2d(C, D, 1), AdaptiveAvgPool2d(1), Sigmoid; PyTorch's default
    init as quanproto), ``prototype_vectors [M, D, 1, 1]`` (uniform [0, 1)), ``prototype_class_identity [M, K]``
    (buffer), ``last_layer`` (``Linear(M, K, bias=False)``).
    """

    def __init__(self, backbone: nn.Module, num_classes: int,
                 prototypes_per_class: Union[int, Sequence[int]] = 10, embedding_dim: int = 1280,
                 epsilon: float = 1e-14, backbone_channels: Optional[int] = None,
                 input_shape: Sequence[int] = (3, 32, 32), incorrect_strength: float = 0.0,
                 coefs: Optional[Dict[str, float]] = None, div_grad: bool = False, train_add_on: bool = False,
                 exact_cluster: bool = False):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(prototypes_per_class, int) and not isinstance(prototypes_per_class, bool):
            sizes = [prototypes_per_class] * num_classes
        else:
            sizes = [int(s) for s in prototypes_per_class]
        if len(sizes) != num_classes or any(s < 1 for s in sizes):
            raise ValueError(f"prototypes_per_class must be a positive int or {num_classes} positive class sizes, "
                             f"got {prototypes_per_class!r}")
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        unknown = set(coefs or {}) - set(DEFAULT_COEFS)
        if unknown:
            raise ValueError(f"unknown loss coefficients {sorted(unknown)}; known: {sorted(DEFAULT_COEFS)}")
        self.num_classes, self.class_sizes = num_classes, sizes
        self.prototypes_per_class = prototypes_per_class if isinstance(prototypes_per_class, int) else list(sizes)
        self.num_prototypes = M = sum(sizes)
        self.embedding_dim = D = embedding_dim
        self.prototype_shape = (M, D, 1, 1)
        self.epsilon = float(epsilon)
        self.coefs = {**DEFAULT_COEFS, **(coefs or {})}
        self.div_grad, self.train_add_on, self.exact_cluster = bool(div_grad), bool(train_add_on), bool(exact_cluster)
        self.incorrect_strength = float(incorrect_strength)
        self.input_shape = tuple(int(s) for s in input_shape)

        self.features = backbone
        C = int(backbone_channels) if backbone_channels is not None else _infer_channels(backbone, self.input_shape)
        self.backbone_channels = C
        self.add_on_layers = nn.Sequential(nn.Conv2d(C, D, 1), nn.AdaptiveAvgPool2d((1, 1)), nn.Sigmoid())
        self.prototype_vectors = nn.Parameter(torch.rand(M, D, 1, 1))
        identity = torch.zeros(M, num_classes)
        identity[torch.arange(M), torch.repeat_interleave(torch.arange(num_classes), torch.tensor(sizes))] = 1
        self.register_buffer("prototype_class_identity", identity)
        self.last_layer = nn.Linear(M, num_classes, bias=False)
        self.set_last_layer_incorrect_connection(self.incorrect_strength)

    def set_last_layer_incorrect_connection(self, incorrect_strength: float = 0.0) -> None:
        """Wc[k, m] = 1 if prototype m belongs to class k else ``incorrect_strength``."""
        positive = self.prototype_class_identity.t()
        with torch.no_grad():
            self.last_layer.weight.copy_(positive + incorrect_strength * (1 - positive))

    # ------------------------------------------------------------------------------------------ forward
    def embed(self, views: Tensor) -> Tensor:
        """Views ``[B, V, 3, S, S]`` → embeddings ``e [B, V, D]`` in (0, 1) (backbone once on all B·V views)."""
        if not isinstance(views, Tensor) or views.dim() != 5:
            raise ValueError(f"views must be a [B, V, C, S, S] tensor, got {getattr(views, 'shape', type(views))}")
        B, V = views.shape[:2]
        z = self.add_on_layers(self.features(views.reshape(B * V, *views.shape[2:])))
        if z.dim() != 4 or z.shape[1:] != (self.embedding_dim, 1, 1):
            raise ValueError(f"the add-on must give [B·V, {self.embedding_dim}, 1, 1], got {tuple(z.shape)}")
        return z.view(B, V, self.embedding_dim)

    def conv_features(self, views: Tensor) -> Tensor:
        """The embeddings in the layout :func:`protofast.push_prototypes` searches: ``[B, D, V, 1]`` (position
        ``(i, j) = (view, 0)``), so a push over it scans (image, view) pairs image-major."""
        return self.embed(views).permute(0, 2, 1).unsqueeze(-1)

    def distance_2_similarity(self, distances: Tensor) -> Tensor:
        return protofast.log_similarity(distances, self.epsilon)

    def head(self, e: Tensor, view_valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Prototype layer and last layer on ``e [B, V, D]``: ``(logits [B, K], min_distances [B, M],
        argmin view [B, M])``. ``view_valid [B, V]`` (bool, optional): invalid views are left out of the min
        (as if their distance were +inf); every image needs one valid view."""
        src = None
        if view_valid is not None:
            if not isinstance(view_valid, Tensor) or tuple(view_valid.shape) != tuple(e.shape[:2]):
                raise ValueError(f"view_valid must be a [B, V] = {list(e.shape[:2])} tensor, got "
                                 f"{getattr(view_valid, 'shape', type(view_valid).__name__)}")
            e, src = _fill_invalid_views(e, view_valid)
        mind, arg = protofast.prototype_min_distances(e, self.prototype_vectors.view(self.num_prototypes, -1))
        if src is not None:
            arg = src.gather(1, arg)
        logits = self.last_layer(self.distance_2_similarity(mind))
        return logits, mind, arg

    def forward(self, views: Tensor, view_valid: Optional[Tensor] = None, return_views: bool = False):
        """``(logits [B, K], min_distances [B, M])`` (+ the argmin view ``[B, M]`` with ``return_views``)."""
        logits, mind, arg = self.head(self.embed(views), view_valid)
        return (logits, mind, arg) if return_views else (logits, mind)

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, logits: Tensor, min_distances: Tensor, labels: Tensor, phase: str = "joint"
             ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """quanproto's ``compute_loss`` (single-label).

        joint: ``crs_ent·CE + clst·clst − sep·sep + div·div`` (1, 0.8, 0.2, 0.2), clst/sep multiply-then-max with
        max_dist = D, div from :func:`diversity_loss` (no gradient unless ``div_grad``);
        fine_tune: ``crs_ent·CE + l1·l1`` (1e-3), ``l1 = Σ |Wc|·(1 − Iᵀ)``.
        Returns ``(total, detached terms)``.
        """
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        labels = check_loss_inputs(logits, min_distances, labels, self.num_classes, self.num_prototypes)
        c = self.coefs
        ce = F.cross_entropy(logits, labels)
        terms = {"cross_entropy": ce}
        if phase == "joint":
            clst, sep, avg_sep = protofast.cluster_separation_costs(
                min_distances, labels, self.prototype_class_identity, float(self.embedding_dim),
                exact=self.exact_cluster)
            div = diversity_loss(self.prototype_vectors, self.prototype_class_identity, labels,
                                 differentiable=self.div_grad, class_blocks=self._class_blocks())
            total = c["crs_ent"] * ce + c["clst"] * clst - c["sep"] * sep + c["div"] * div
            terms.update(cluster=clst, separation=sep, avg_separation=avg_sep, diversity=div)
        else:
            l1 = protofast.masked_l1(self.last_layer.weight, self.prototype_class_identity)
            total = c["crs_ent"] * ce + c["l1"] * l1
            terms["l1"] = l1
        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    def _class_blocks(self) -> Tuple[Tensor, Tensor]:
        """The diversity's class layout, recomputed only when the identity buffer changes (device, version)."""
        I = self.prototype_class_identity
        key = (I.device, I.data_ptr(), I._version, tuple(I.shape))
        cached = getattr(self, "_blocks_cache", None)
        if cached is None or cached[0] != key:
            self._blocks_cache = (key, _class_blocks(I))
        return self._blocks_cache[1]

    # ------------------------------------------------------------------------------------------ phases
    def phase(self, phase: str, lrs: Optional[Dict[str, float]] = None) -> torch.optim.Adam:
        """Set ``requires_grad`` and return the phase's Adam optimizer (quanproto's groups, weight decay 0):
        joint: features (6e-5), prototype_vectors (3e-3) [+ add_on_layers (3e-3) with ``train_add_on``];
        the last layer is frozen. fine_tune: last_layer (3e-4) only."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        unknown = set(lrs or {}) - set(DEFAULT_LRS)
        if unknown:
            raise ValueError(f"unknown learning-rate groups {sorted(unknown)}; known: {sorted(DEFAULT_LRS)}")
        lrs = {**DEFAULT_LRS, **(lrs or {})}
        joint = phase == "joint"
        for p in self.features.parameters():
            p.requires_grad_(joint)
        for p in self.add_on_layers.parameters():
            p.requires_grad_(joint)        # quanproto: gradient computed, but not in the optimiser unless train_add_on
        self.prototype_vectors.requires_grad_(joint)
        for p in self.last_layer.parameters():
            p.requires_grad_(not joint)
        if joint:
            groups = [{"params": list(self.features.parameters()), "lr": lrs["features"], "name": "features"},
                      {"params": [self.prototype_vectors], "lr": lrs["prototype_vectors"],
                       "name": "prototype_vectors"}]
            if self.train_add_on:
                groups.append({"params": list(self.add_on_layers.parameters()), "lr": lrs["add_on_layers"],
                               "name": "add_on_layers"})
        else:
            groups = [{"params": list(self.last_layer.parameters()), "lr": lrs["last_layer"], "name": "last_layer"}]
        return torch.optim.Adam([g for g in groups if g["params"]], weight_decay=0.0)

    # ------------------------------------------------------------------------------------------ config
    def config(self) -> dict:
        spec = self.features.config() if hasattr(self.features, "config") else {"name": type(self.features).__name__}
        return dict(backbone=spec, num_classes=self.num_classes, prototypes_per_class=self.prototypes_per_class,
                    embedding_dim=self.embedding_dim, epsilon=self.epsilon, backbone_channels=self.backbone_channels,
                    input_shape=list(self.input_shape), incorrect_strength=self.incorrect_strength,
                    coefs=dict(self.coefs), div_grad=self.div_grad, train_add_on=self.train_add_on,
                    exact_cluster=self.exact_cluster)

    @classmethod
    def from_config(cls, config: dict, backbone: Optional[nn.Module] = None) -> "ProtoMask":
        config = dict(config)
        spec = config.pop("backbone")
        return cls(backbone if backbone is not None else build_backbone(spec), **config)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, prototype_shape={self.prototype_shape}, epsilon={self.epsilon}, "
                f"div_grad={self.div_grad}, train_add_on={self.train_add_on}")


# ---------------------------------------------------------------------------------------------- projection
class MaskPushResult:
    """What :func:`push_protomask` found, per prototype m (CPU tensors).

    Attributes:
        image_index: ``[M]`` int64 image index in loader order (−1: the prototype's class never appeared).
        view_index: ``[M]`` int64 index of the winning view (mask) of that image (−1 if unseen).
        distance: ``[M]`` float64 squared L2 distance between the old prototype and the winning view's embedding
            (+inf if unseen).
        prototype_class: ``[M]`` int64 class of each prototype.
    """

    def __init__(self, image_index: Tensor, view_index: Tensor, distance: Tensor, prototype_class: Tensor):
        self.image_index, self.view_index = image_index, view_index
        self.distance, self.prototype_class = distance, prototype_class

    @property
    def found(self) -> Tensor:
        return self.image_index >= 0

    def log(self) -> Dict[int, dict]:
        """quanproto's push log: ``{m: {"img_index", "mask_index", "min_dist"}}`` for the projected prototypes."""
        return {m: {"img_index": int(self.image_index[m]), "mask_index": int(self.view_index[m]),
                    "min_dist": float(self.distance[m])} for m in torch.nonzero(self.found).flatten().tolist()}


class _ViewSearch:
    """Adapter presenting a ProtoMask to :func:`protofast.push_prototypes`: ``conv_features`` returns the view
    embeddings as a ``[B, D, V, 1]`` map, so the push's (image, position) search is the (image, view) search,
    image-major; invalid views are replaced by their image's first valid view (the index is mapped back)."""

    def __init__(self, net: ProtoMask):
        self.net = net
        self.prototype_vectors = net.prototype_vectors
        self.prototype_class_identity = net.prototype_class_identity
        self.valid: Optional[Tensor] = None
        self.sources = []

    @property
    def training(self) -> bool:
        return self.net.training

    def eval(self):
        self.net.eval()
        return self

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def conv_features(self, views: Tensor) -> Tensor:
        e = self.net.embed(views)
        B, V, _ = e.shape
        if self.valid is not None:
            e, src = _fill_invalid_views(e, self.valid.to(e.device))
        else:
            src = torch.arange(V, device=e.device).expand(B, V)
        self.sources.append(src.cpu())
        return e.permute(0, 2, 1).unsqueeze(-1)

    def batches(self, loader):
        for t, batch in enumerate(loader):
            if isinstance(batch, (tuple, list)) and len(batch) >= 3:
                valid = batch[2]
                if not isinstance(valid, Tensor) or valid.dim() != 2:
                    raise ValueError(f"the loader's third item must be view_valid [B, V]; batch {t} has "
                                     f"{getattr(valid, 'shape', type(valid).__name__)}")
                self.valid = valid
            else:
                self.valid = None
            yield batch[:2] if isinstance(batch, (tuple, list)) else batch


def push_protomask(model: ProtoMask, loader, *, reset_per_batch: bool = True, unseen: str = "zero",
                   progress: bool = False, device=None) -> MaskPushResult:
    """ProtoMask's projection (SEMANTICS.md §3.5), in place: each prototype becomes the embedding of the nearest
    (image, view) of its class, searched image-major over the loader's batches with
    :func:`protofast.push_prototypes` (strict ``<``, first occurrence: earliest image, then earliest view).

    Args:
        model: a :class:`ProtoMask` (run in eval mode under no_grad; mode restored).
        loader: yields ``(views [B, V, 3, S, S], labels [B])`` or ``(views, labels, view_valid [B, V])``; use the
            unaugmented train set with ``shuffle=False``.
        reset_per_batch: True (quanproto: the best distance is reset every batch, so the last batch containing
            the class wins) or False (the global nearest view).
        unseen: ``"zero"`` (quanproto: prototypes of classes never seen become zero) or ``"keep"``.
    Returns:
        :class:`MaskPushResult` (image index, view index, distance, class per prototype; ``.log()`` gives
        quanproto's push log).
    """
    if not isinstance(model, ProtoMask):
        raise TypeError(f"model must be a ProtoMask, got {type(model).__name__}")
    search = _ViewSearch(model)
    result = protofast.push_prototypes(search, search.batches(loader), class_specific=True, unseen=unseen,
                                       reset_per_batch=reset_per_batch, progress=progress, device=device)
    views = result.position[:, 0].clone()
    found = result.image_index >= 0
    if search.sources and bool(found.any()):
        src = torch.cat(search.sources)                                               # [N, V]
        views[found] = src[result.image_index[found], views[found]]
    return MaskPushResult(result.image_index, views, result.distance, result.prototype_class)

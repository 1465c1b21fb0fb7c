"""DProtoNet ("Decoupling Prototype Activation via Multiple Dynamic Masks") built on protofast's operators.

SEMANTICS.md §4 is the contract (the paper has no public code; its open points are options with documented
defaults). For images x [B, 3, S, S]:

    F = shaping(backbone(x))                      [B, D, H, W]   shaping: 1×1 conv, ReLU, 1×1 conv (no activation)
    z = masked_gap(F, masks)                      [B, I, D]      z[b, i] = GAP(M_i ⊙ F[b])              (eq. 8)
    s[b, i, m] = clamp_min(‖z_bi‖² − 2 z_bi·p_m + ‖p_m‖², 0)                                           (eq. 1)
    mind[b, m] = min_i s[b, i, m]  (first occurrence)   — the fused prototype_min_distances on the set z
    g = log((mind + 1) / (mind + ε)), ε = 1e-12   (eq. 2: max_i of the log-similarity, the same since the map
                                                   is decreasing; the clamp above makes ε = 1e-12 safe)
    logits = g · Wcᵀ                              (eq. 3, no bias; Wc init 1 own class / −0.5 others)

Loss (eqs. 4–7): L = CE + λ1·Clst + λ2·Sep + λ3·l1 with λ = (0.8, −0.08, 1e-4),
Clst = mean_b min_{m ∈ class y_b} mind, separation distance sd = mean_b min_{m ∉ class y_b} mind,
``sep_sign="protopnet"`` (default): Sep = sd, so the total has −0.08·sd (wrong-class prototypes repelled, as
ProtoPNet intends); ``"literal"``: the paper's Sep = −sd (the total then *attracts* them: +0.08·sd).
``cluster_mode="masked_min"`` (default, the paper's true minima) or ``"masked_max"`` (ProtoPNet's
multiply-then-max with max_dist = D). l1 = Σ_{k, m ∉ class k} |Wc[k, m]|.

Nothing of size B×I×D×H×W (1.45 GB at the paper's sizes) or B×I×M (115 MB) is formed in training: masked_gap is
one batched GEMM and the min over masks is fused with the distance GEMM.

DProtoNet is a :class:`~protofast.models.ProtoPNet` whose add-on layers are the shaping net and whose
"patches" are the I masked vectors, so ProtoPNet's phases, optimizers, training epochs and evaluation apply
unchanged (``prototype_vectors`` is ``[M, D, 1, 1]``).

Shapes: B batch, C backbone channels, D prototype channels (512), (H, W) feature map (7×7), I masks (240),
M prototypes (10 per class), K classes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import protofast

from .protopnet import ProtoPNet, _feature_shape, check_loss_inputs

__all__ = ["DProtoNet", "ShapingNet", "PushView"]

#: the paper's Adam learning rates (backbone f_b, shaping f_a, prototypes g_p, last layer f_h); masks (only with
#: masks_trainable=True) are our choice
DEFAULT_LRS = {"features": 1e-4, "add_on_layers": 3e-3, "prototype_vectors": 3e-3, "last_layer": 1e-4,
               "masks": 3e-3}
#: λ1 = 0.8 (cluster), λ2 = −0.08 (separation), λ3 = 1e-4 (l1), cross-entropy 1
DEFAULT_COEFS = {"crs_ent": 1.0, "clst": 0.8, "sep": -0.08, "l1": 1e-4}
CLUSTER_MODES = ("masked_min", "masked_max")
SEP_SIGNS = ("protopnet", "literal")
MASK_INITS = ("uniform", "ones")


class ShapingNet(nn.Sequential):
    """DProtoNet's shaping net f_a: 1×1 conv C→D, ReLU, 1×1 conv D→D (no final activation, as the paper states);
    kaiming-normal fan-out weights and zero biases (ProtoPNet's add-on init)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(), nn.Conv2d(out_channels, out_channels, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)


def mask_min_distances(z: Tensor, prototypes: Tensor) -> Tuple[Tensor, Tensor]:
    """``(min_i s[b, i, m], argmin_i)`` for masked vectors ``z [B, I, D]`` from :func:`protofast.masked_gap`:
    ``z.transpose(1, 2).unsqueeze(-1)`` is a contiguous ``[B, D, I, 1]`` map that the fused
    :func:`protofast.prototype_min_distances` reads channels-first, with no copy; the flat argmin is the mask."""
    return protofast.prototype_min_distances(z.transpose(1, 2).unsqueeze(-1), prototypes)


class DProtoNet(ProtoPNet):
    """DProtoNet: backbone → shaping net → masked GAP over I fixed random feature masks → prototype layer (min
    over masks of the squared L2 distance) → log-similarity (ε = 1e-12) → last layer.

    Args:
        backbone: ``nn.Module`` mapping images to ``[B, C, H, W]`` (``features``).
        num_classes: K.
        prototypes_per_class: M / K (10); prototype m belongs to class ``m // prototypes_per_class``.
        num_masks: I (240).
        prototype_dim: D, the shaping net's output channels = prototype length (512).
        input_shape: image shape used to infer (C, H, W) by one dummy forward of the backbone (default
            ``(3, 224, 224)``); ``feature_shape=(C, H, W)`` skips that forward.
        mask_init: ``"uniform"`` (each mask value drawn once from U[0, 1] with ``mask_seed``, the default) or
            ``"ones"`` (every z_i is the plain GAP; for tests), or a tensor ``[I, D, H, W]``.
        masks_trainable: ``False`` (default: a fixed buffer ``masks``); ``True``: a Parameter trained with the
            backbone (group ``"masks"``, clamped to [0, 1] after every optimizer step of that phase).
        mask_seed: seed of the uniform masks (independent of the global RNG).
        epsilon: ε of the log-similarity (1e-12; the distance clamp makes it safe).
        cluster_mode: ``"masked_min"`` (default) | ``"masked_max"``; sep_sign: ``"protopnet"`` (default) |
            ``"literal"`` — see the module docstring.
        coefs: overrides of ``crs_ent, clst, sep, l1`` (1, 0.8, −0.08, 1e-4).
        incorrect_strength: initial last-layer weight towards other classes' prototypes (−0.5).

    Attributes as :class:`ProtoPNet` (``features``, ``add_on_layers`` = the shaping net, ``prototype_vectors
    [M, D, 1, 1]``, ``prototype_class_identity [M, K]``, ``last_layer``) plus ``masks [I, D, H, W]``.
    ``forward(x)`` returns ``(logits [B, K], min_distances [B, M])`` (and F with ``return_features=True``);
    :meth:`masked_vectors` gives z, :meth:`prototype_activations` the argmin mask indices too.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prototypes_per_class: int = 10, num_masks: int = 240,
                 prototype_dim: int = 512, input_shape: Sequence[int] = (3, 224, 224),
                 feature_shape: Optional[Sequence[int]] = None, mask_init: Union[str, Tensor] = "uniform",
                 masks_trainable: bool = False, mask_seed: int = 0, epsilon: float = 1e-12,
                 cluster_mode: str = "masked_min", sep_sign: str = "protopnet",
                 coefs: Optional[Dict[str, float]] = None, incorrect_strength: float = -0.5):
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
            raise ValueError(f"num_masks must be a positive int, got {num_masks!r}")
        if isinstance(prototype_dim, bool) or not isinstance(prototype_dim, int) or prototype_dim < 1:
            raise ValueError(f"prototype_dim must be a positive int, got {prototype_dim!r}")
        if cluster_mode not in CLUSTER_MODES:
            raise ValueError(f"cluster_mode must be one of {CLUSTER_MODES}, got {cluster_mode!r}")
        if sep_sign not in SEP_SIGNS:
            raise ValueError(f"sep_sign must be one of {SEP_SIGNS}, got {sep_sign!r}")
        unknown = set(coefs or {}) - set(DEFAULT_COEFS)
        if unknown:
            raise ValueError(f"unknown loss coefficients {sorted(unknown)}; known: {sorted(DEFAULT_COEFS)}")
        if feature_shape is None:
            feature_shape = _feature_shape(backbone, input_shape)
        if len(feature_shape) != 3 or any(int(s) < 1 for s in feature_shape):
            raise ValueError(f"feature_shape must be (C, H, W) with positive sizes, got {tuple(feature_shape)}")
        C, H, W = (int(s) for s in feature_shape)
        D = prototype_dim
        super().__init__(backbone, num_classes, prototypes_per_class=prototypes_per_class,
                         prototype_shape=(D, 1, 1), add_on=ShapingNet(C, D), epsilon=epsilon,
                         backbone_channels=C, incorrect_strength=incorrect_strength)
        self.add_on_kind = "shaping"
        self.coefs = {**DEFAULT_COEFS, **(coefs or {})}
        self.cluster_mode, self.sep_sign = cluster_mode, sep_sign
        self.num_masks, self.feature_size, self.mask_seed = num_masks, (H, W), int(mask_seed)
        if isinstance(mask_init, Tensor):
            if tuple(mask_init.shape) != (num_masks, D, H, W):
                raise ValueError(f"mask_init must be [I, D, H, W] = {(num_masks, D, H, W)}, got "
                                 f"{tuple(mask_init.shape)}")
            masks = mask_init.detach().clone().float()
            self.mask_init = "tensor"
        elif mask_init == "uniform":
            masks = torch.rand(num_masks, D, H, W, generator=torch.Generator().manual_seed(self.mask_seed))
            self.mask_init = mask_init
        elif mask_init == "ones":
            masks = torch.ones(num_masks, D, H, W)
            self.mask_init = mask_init
        else:
            raise ValueError(f"mask_init must be one of {MASK_INITS} or a tensor, got {mask_init!r}")
        self.masks_trainable = bool(masks_trainable)
        if self.masks_trainable:
            self.masks = nn.Parameter(masks)
        else:
            self.register_buffer("masks", masks)

    # ------------------------------------------------------------------------------------------ forward
    def masked_vectors(self, features: Tensor) -> Tensor:
        """z [B, I, D] = masked_gap(F, masks) for the shaping output ``F [B, D, H, W]``."""
        if tuple(features.shape[2:]) != self.feature_size:
            raise ValueError(f"the feature map is {tuple(features.shape[2:])} but the masks are {self.feature_size}; "
                             "build the model with the input size used (input_shape / feature_shape)")
        return protofast.masked_gap(features, self.masks.to(features.dtype))

    def prototype_activations(self, features: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(z [B, I, D], min_distances [B, M], argmin [B, M])``: argmin = index i of the mask whose vector is
        nearest to each prototype (first occurrence)."""
        z = self.masked_vectors(features)
        min_distances, argmin = mask_min_distances(z, self.prototype_vectors.to(z.dtype))
        return z, min_distances, argmin

    def head(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """Masked GAP, fused min distances over the masks, log-similarity and last layer on the shaping output
        ``F [B, D, H, W]``: ``(logits [B, K], min_distances [B, M])``."""
        _, min_distances, _ = self.prototype_activations(z)
        logits = self.last_layer(self.distance_2_similarity(min_distances))
        return logits, min_distances

    def push_forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(z [B, I, D], distances [B, M, I])``: the masked vectors and every (prototype, mask) distance."""
        z = self.masked_vectors(self.conv_features(x))
        return z, protofast.prototype_distance_maps(z, self.prototype_vectors.to(z.dtype))

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, logits: Tensor, min_distances: Tensor, labels: Tensor,
             features: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(total, terms)`` with ``total = crs_ent·CE + clst·Clst + sep·Sep + l1·l1`` (1, 0.8, −0.08, 1e-4).

        Clst / sd: the true minimum over the own / the other classes' prototypes (``cluster_mode="masked_min"``,
        :func:`protofast.cluster_separation_costs` with ``exact=True``) or ProtoPNet's multiply-then-max with
        max_dist = D (``"masked_max"``). Sep = sd (``sep_sign="protopnet"``) or −sd (``"literal"``).
        terms: ``cross_entropy, cluster, separation`` (= sd, unsigned), ``avg_separation, l1, total``.
        ``features`` is accepted for ProtoPNet's training loop and unused."""
        labels = check_loss_inputs(logits, min_distances, labels, self.num_classes, self.num_prototypes)
        c = self.coefs
        ce = torch.nn.functional.cross_entropy(logits, labels)
        l1 = protofast.masked_l1(self.last_layer.weight, self.prototype_class_identity)
        clst, sd, avg_sep = protofast.cluster_separation_costs(
            min_distances, labels, self.prototype_class_identity, float(self.prototype_shape[1]),
            exact=self.cluster_mode == "masked_min")
        sep = sd if self.sep_sign == "protopnet" else -sd
        total = c["crs_ent"] * ce + c["clst"] * clst + c["sep"] * sep + c["l1"] * l1
        terms = dict(cross_entropy=ce, cluster=clst, separation=sd, avg_separation=avg_sep, l1=l1, total=total)
        return total, {k: v.detach() for k, v in terms.items()}

    # ------------------------------------------------------------------------------------------ phases
    def _groups(self, phase: str, lrs: Dict[str, float], lr_scale: float):
        groups = super()._groups(phase, lrs, lr_scale)
        if self.masks_trainable and phase in ("warm", "joint"):
            groups.append({"params": [self.masks], "lr": lrs["masks"] * lr_scale, "weight_decay": 0.0,
                           "name": "masks"})
        return groups

    def set_phase(self, phase: str) -> None:
        """As :meth:`ProtoPNet.set_phase`; trainable masks follow the prototypes (off in ``last_layer``)."""
        super().set_phase(phase)
        if self.masks_trainable:
            self.masks.requires_grad_(phase != "last_layer")

    def phase(self, phase: str, lrs: Optional[Dict[str, float]] = None, lr_scale: float = 1.0
              ) -> torch.optim.Adam:
        """Adam for ``phase`` with the paper's learning rates (backbone 1e-4, shaping 3e-3, prototypes 3e-3, last
        layer 1e-4; weight decay 1e-3 on backbone and shaping, as ProtoPNet — the paper states none):
        warm: shaping + prototypes (+ masks); joint: backbone + shaping + prototypes (+ masks); last_layer: Wc.
        Trainable masks are clamped to [0, 1] after every step (an optimizer step post-hook)."""
        unknown = set(lrs or {}) - set(DEFAULT_LRS)
        if unknown:
            raise ValueError(f"unknown learning-rate groups {sorted(unknown)}; known: {sorted(DEFAULT_LRS)}")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, got {lr_scale}")
        self.set_phase(phase)
        optimizer = torch.optim.Adam(self._groups(phase, {**DEFAULT_LRS, **(lrs or {})}, float(lr_scale)))
        if self.masks_trainable and phase != "last_layer":
            optimizer.register_step_post_hook(lambda *_: self.clamp_masks_())
        return optimizer

    @torch.no_grad()
    def clamp_masks_(self) -> None:
        """Keep the masks in [0, 1] (the paper's definition)."""
        self.masks.clamp_(0, 1)

    # ------------------------------------------------------------------------------------------ config
    def config(self) -> dict:
        spec = self.features.config() if hasattr(self.features, "config") else {"name": type(self.features).__name__}
        if self.mask_init == "tensor":
            raise ValueError("a DProtoNet built from a mask tensor has no JSON config (the masks are in the "
                             "state_dict: rebuild with mask_init='ones' and load_state_dict)")
        return dict(backbone=spec, num_classes=self.num_classes, prototypes_per_class=self.prototypes_per_class,
                    num_masks=self.num_masks, prototype_dim=self.prototype_shape[1],
                    feature_shape=[self.backbone_channels, *self.feature_size], mask_init=self.mask_init,
                    masks_trainable=self.masks_trainable, mask_seed=self.mask_seed, epsilon=self.epsilon,
                    cluster_mode=self.cluster_mode, sep_sign=self.sep_sign, coefs=dict(self.coefs),
                    incorrect_strength=self.incorrect_strength)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, prototypes={self.num_prototypes}, masks={self.num_masks}, "
                f"D={self.prototype_shape[1]}, feature_size={self.feature_size}, epsilon={self.epsilon}, "
                f"cluster_mode={self.cluster_mode!r}, sep_sign={self.sep_sign!r}")


class PushView(nn.Module):
    """DProtoNet seen by :func:`protofast.push_prototypes`: the I masked vectors are the "patches".

    ``conv_features(x)`` returns z as a ``[B, D, I, 1]`` map, so the push's position ``(i, 0)`` is the mask
    index. ``prototype_vectors`` is a *copy* of the model's ``[M, D, 1, 1]`` prototypes: a push writes the
    projected vectors there and leaves the model untouched (copy them back to apply a plain projection)."""

    def __init__(self, model: DProtoNet):
        super().__init__()
        self.model = model
        self.prototype_vectors = nn.Parameter(model.prototype_vectors.detach().clone(), requires_grad=False)
        self.register_buffer("prototype_class_identity", model.prototype_class_identity)

    def conv_features(self, x: Tensor) -> Tensor:
        z = self.model.masked_vectors(self.model.conv_features(x))         # [B, I, D]
        return z.transpose(1, 2).unsqueeze(-1)

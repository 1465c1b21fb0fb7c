"""ProtoPNet ("This Looks Like That", Chen et al. 2019) built on protofast's fused operators.

The architecture, initialisation, loss and training phases follow cfchen-duke/ProtoPNet (SEMANTICS.md §1);
the prototype layer never forms the ``[B, M, H', W']`` distance maps in training (``prototype_min_distances``),
only :meth:`ProtoPNet.push_forward` does (for projection and heatmaps).

Shapes: B batch, C backbone channels, D prototype channels, (H, W) feature map, M prototypes (``num_prototypes``),
K classes, (h, w) prototype size.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import protofast

__all__ = ["ProtoPNet", "SmallCNN", "build_backbone", "torchvision_backbone"]

PHASES = ("warm", "joint", "last_layer")
#: cfchen-duke/ProtoPNet settings.py: joint_optimizer_lrs / warm_optimizer_lrs / last_layer_optimizer_lr
DEFAULT_LRS = {"features": 1e-4, "add_on_layers": 3e-3, "prototype_vectors": 3e-3, "last_layer": 1e-4}
#: weight decay of the features and add-on groups (prototypes and last layer have none)
DEFAULT_WEIGHT_DECAY = 1e-3
#: cfchen-duke/ProtoPNet settings.py coefs; ``mean`` replaces ``clst`` and ``sep`` with ``loss="mean"``
DEFAULT_COEFS = {"crs_ent": 1.0, "clst": 0.8, "sep": -0.08, "l1": 1e-4, "mean": 0.8}


# ---------------------------------------------------------------------------------------------- backbones
class SmallCNN(nn.Module):
    """A small convolutional backbone for tests and demos: ``len(channels)`` stages of ``convs_per_stage``
    (3×3 conv, ReLU) followed by a 2×2 max-pool, so ``[B, in_channels, S, S] -> [B, C, S/2^n, S/2^n]`` with
    ``C = out_channels = channels[-1] (+ 2 with coords)``.

    With ``coords=True`` (CoordConv), two channels holding the normalised row and column (in [−1, 1]) are
    concatenated to the input of every stage and to the output, so features can encode *where* a pattern is
    (the add-on layers see the position of every cell directly); a 1×1 prototype on a
    translation-equivariant map would otherwise only see *what* (the synthetic classes depend on both).
    No normalisation layers: a batch's result does not depend on how it is split (DDP gives exactly the
    full-batch step).
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (32, 64), convs_per_stage: int = 2,
                 coords: bool = True):
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one stage")
        self.in_channels, self.channels = int(in_channels), tuple(int(c) for c in channels)
        self.convs_per_stage, self.coords = int(convs_per_stage), bool(coords)
        stages, c_in = [], self.in_channels
        for c in self.channels:
            layers = []
            for n in range(self.convs_per_stage):
                layers += [nn.Conv2d(c_in + (2 if coords and n == 0 else 0), c, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels = self.channels[-1] + (2 if coords else 0)
        for m in self.modules():                  # torchvision's VGG init: keeps activations O(1) through depth
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @staticmethod
    def _with_coords(x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
        return torch.cat([x, ys, xs], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SmallCNN expects [B, {self.in_channels}, H, W] images, got shape {tuple(x.shape)}")
        for stage in self.stages:
            x = stage(self._with_coords(x) if self.coords else x)
        return self._with_coords(x) if self.coords else x

    def config(self) -> dict:
        return {"name": "SmallCNN", "kwargs": dict(in_channels=self.in_channels, channels=list(self.channels),
                                                  convs_per_stage=self.convs_per_stage, coords=self.coords)}


class _TorchvisionFeatures(nn.Module):
    def __init__(self, arch: str, pretrained: bool):
        super().__init__()
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError("torchvision backbones need torchvision: pip install torchvision") from exc
        weights = "DEFAULT" if pretrained else None
        net = getattr(torchvision.models, arch)(weights=weights)
        if arch.startswith(("resnet", "resnext", "wide_resnet")):
            self.body = nn.Sequential(*list(net.children())[:-2])          # drop avgpool, fc
            self.out_channels = net.fc.in_features
        elif arch.startswith(("vgg", "densenet")):
            self.body = net.features
            self.out_channels = net.classifier.in_features if arch.startswith("densenet") else None
        else:
            raise ValueError(f"unsupported torchvision architecture {arch!r} (resnet*, resnext*, wide_resnet*, "
                             "vgg*, densenet*)")
        self.arch, self.pretrained = arch, pretrained

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(x)
        return F.relu(x) if self.arch.startswith("densenet") else x

    def config(self) -> dict:
        # a rebuilt checkpoint gets its weights from the state_dict, never downloads them again
        return {"name": "torchvision", "kwargs": {"arch": self.arch, "pretrained": False}}


def torchvision_backbone(arch: str = "resnet18", pretrained: bool = False) -> nn.Module:
    """The convolutional trunk of a torchvision classifier (resnet*/resnext*/vgg*/densenet*, ProtoPNet's
    backbones) as ``[B, 3, H, W] -> [B, C, H/32, W/32]``. Needs torchvision (optional); ``pretrained=True``
    downloads the ImageNet weights."""
    return _TorchvisionFeatures(arch, pretrained)


def build_backbone(spec: dict) -> nn.Module:
    """Rebuild a backbone from its ``config()`` dict: ``{"name": "SmallCNN" | "torchvision", "kwargs": {...}}``."""
    name, kwargs = spec.get("name"), dict(spec.get("kwargs", {}))
    if name == "SmallCNN":
        return SmallCNN(**kwargs)
    if name == "torchvision":
        return torchvision_backbone(**kwargs)
    raise ValueError(f"unknown backbone {name!r}: pass the backbone module to load_checkpoint(..., backbone=...)")


def _feature_shape(backbone: nn.Module, input_shape: Sequence[int]) -> Tuple[int, int, int]:
    """(C, H', W') of ``backbone``'s feature map for one zero image of ``input_shape`` (eval mode, no grad)."""
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, *input_shape, device=device))
    backbone.train(was_training)
    if not isinstance(out, Tensor) or out.dim() != 4:
        raise ValueError("the backbone must map [B, 3, H, W] images to a [B, C, H', W'] feature map, got "
                         f"{type(out).__name__} {getattr(out, 'shape', '')}")
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def _infer_channels(backbone: nn.Module, input_shape: Sequence[int]) -> int:
    channels = getattr(backbone, "out_channels", None)
    if isinstance(channels, int):
        return channels
    return _feature_shape(backbone, input_shape)[0]


def check_loss_inputs(logits: Tensor, min_distances: Tensor, labels: Tensor, num_classes: int,
                      num_prototypes: int) -> Tensor:
    """Shape/dtype/range checks shared by the ProtoPNet-family ``loss`` methods (ValueError/TypeError naming the
    argument); returns ``labels`` as int64 on the logits' device."""
    B, K, M = logits.shape[0], num_classes, num_prototypes
    if logits.dim() != 2 or logits.shape[1] != K:
        raise ValueError(f"logits must be [B, {K}], got shape {tuple(logits.shape)}")
    if min_distances.shape != (B, M):
        raise ValueError(f"min_distances must be [B, M] = [{B}, {M}], got shape {tuple(min_distances.shape)}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must be a [B] = [{B}] tensor, got {getattr(labels, 'shape', type(labels))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer class-index tensor, got {labels.dtype}")
    # the range check reads values (a host sync, a graph break); under torch.compile the ops check it instead
    if B and not torch.compiler.is_compiling() and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise ValueError(f"labels must be in [0, {K}), got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device=logits.device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- ProtoPNet
class ProtoPNet(nn.Module):
    """ProtoPNet: backbone → add-on layers → prototype layer (min squared L2 distance) → log-similarity →
    last layer.

    For images ``x [B, 3, S, S]``: ``z = add_on(features(x))`` ``[B, D, H, W]`` (in (0, 1) with the regular
    add-on), ``d[b, m, i, j] = relu(‖z_ij‖² − 2 z_ij·p_m + ‖p_m‖²)`` over the valid h×w windows,
    ``mind[b, m] = min_ij d``, ``sim = log((mind + 1) / (mind + ε))``, ``logits = sim · Wcᵀ``.

    Args:
        backbone: any ``nn.Module`` mapping images to a ``[B, C, H, W]`` map (``features``).
        num_classes: K.
        prototypes_per_class: M / K; prototype m belongs to class ``m // prototypes_per_class``.
        prototype_shape: ``(D, h, w)``; prototypes are initialised uniform in [0, 1) as the original.
        add_on: ``"regular"`` (1×1 conv C→D, ReLU, 1×1 conv D→D, sigmoid; kaiming-normal fan-out weights, zero
            bias), ``"none"`` (identity; needs C == D) or an ``nn.Module`` mapping C to D channels.
        loss: ``"minmax"`` (the original: CE + 0.8·clst − 0.08·sep + 1e-4·l1) or ``"mean"`` (CE + 0.8·mean
            distance over all patches and prototypes + 1e-4·l1, SEMANTICS.md §1.7 reading (A)).
        epsilon: ε of the log-similarity (1e-4).
        activation: ``"log"`` (the original) or ``"linear"`` (sim = −mind).
        backbone_channels: C; default: ``backbone.out_channels`` if it is an int, else a dummy forward of a
            zero image of ``input_shape``.
        input_shape: image shape for that dummy forward (default ``(3, 64, 64)``).
        incorrect_strength: initial last-layer weight to other classes' prototypes (−0.5; own class 1).
        coefs: overrides of the loss coefficients (keys ``crs_ent, clst, sep, l1, mean``).
        exact_cluster: ``False`` (the original multiply-then-max cluster/separation) or ``True`` (true masked
            minimum), see :func:`protofast.cluster_separation_costs`.
        mean_reading: which "mean distance" ``loss="mean"`` uses (SEMANTICS.md §1.7): ``"all_patches"``
            (reading (A), default: ``protofast.mean_distance_loss``, the mean of d over b, m and every patch, in
            closed form) or ``"min_distances"`` (reading (B): the mean of ``min_distances`` over b, m).

    Attributes: ``features``, ``add_on_layers``, ``prototype_vectors [M, D, h, w]``,
    ``prototype_class_identity [M, K]`` (buffer), ``last_layer`` (``nn.Linear(M, K, bias=False)``),
    ``epsilon``, ``prototype_shape (M, D, h, w)``, ``num_prototypes``, ``num_classes``.

    Setting ``model.timing`` to a dict makes every forward add seconds to ``timing["backbone_forward"]``
    (``conv_features``: backbone + add-on) and ``timing["head_forward"]`` (prototype layer, similarity, last
    layer), and record in ``timing["_features_grad_at"]`` the ``time.perf_counter()`` at which the backward
    reaches the add-on output (the end of the head's backward); see :func:`protofast.train.train_protopnet`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prototypes_per_class: int = 10,
                 prototype_shape: Sequence[int] = (128, 1, 1), add_on: Union[str, nn.Module] = "regular",
                 loss: str = "minmax", epsilon: float = 1e-4, activation: str = "log",
                 backbone_channels: Optional[int] = None, input_shape: Sequence[int] = (3, 64, 64),
                 incorrect_strength: float = -0.5, coefs: Optional[Dict[str, float]] = None,
                 exact_cluster: bool = False, mean_reading: str = "all_patches"):
        super().__init__()
        if mean_reading not in ("all_patches", "min_distances"):
            raise ValueError(f"mean_reading must be 'all_patches' or 'min_distances', got {mean_reading!r}")
        self.mean_reading = mean_reading
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(prototypes_per_class, int) or prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be a positive int, got {prototypes_per_class!r}")
        if len(prototype_shape) != 3 or any(int(s) < 1 for s in prototype_shape):
            raise ValueError(f"prototype_shape must be (D, h, w) with positive sizes, got {tuple(prototype_shape)}")
        if loss not in ("minmax", "mean"):
            raise ValueError(f"loss must be 'minmax' or 'mean', got {loss!r}")
        if activation not in ("log", "linear"):
            raise ValueError(f"activation must be 'log' or 'linear', got {activation!r}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        unknown = set(coefs or {}) - set(DEFAULT_COEFS)
        if unknown:
            raise ValueError(f"unknown loss coefficients {sorted(unknown)}; known: {sorted(DEFAULT_COEFS)}")

        D, h, w = (int(s) for s in prototype_shape)
        self.num_classes = num_classes
        self.prototypes_per_class = prototypes_per_class
        self.num_prototypes = M = num_classes * prototypes_per_class
        self.prototype_shape = (M, D, h, w)
        self.epsilon = float(epsilon)
        self.activation = activation
        self.loss_mode = loss
        self.coefs = {**DEFAULT_COEFS, **(coefs or {})}
        self.exact_cluster = bool(exact_cluster)
        self.incorrect_strength = float(incorrect_strength)
        self.timing: Optional[dict] = None

        self.features = backbone
        C = int(backbone_channels) if backbone_channels is not None else _infer_channels(backbone, input_shape)
        self.backbone_channels = C
        self.add_on_kind = add_on if isinstance(add_on, str) else "custom"
        if add_on == "regular":
            self.add_on_layers = nn.Sequential(nn.Conv2d(C, D, 1), nn.ReLU(), nn.Conv2d(D, D, 1), nn.Sigmoid())
            for m in self.add_on_layers.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        elif add_on == "none":
            if C != D:
                raise ValueError(f"add_on='none' needs backbone channels == prototype channels, got {C} != {D}")
            self.add_on_layers = nn.Identity()
        elif isinstance(add_on, nn.Module):
            self.add_on_layers = add_on
        else:
            raise ValueError(f"add_on must be 'regular', 'none' or an nn.Module, got {add_on!r}")

        self.prototype_vectors = nn.Parameter(torch.rand(M, D, h, w))
        identity = torch.zeros(M, num_classes)
        identity[torch.arange(M), torch.arange(M) // prototypes_per_class] = 1
        self.register_buffer("prototype_class_identity", identity)
        self.last_layer = nn.Linear(M, num_classes, bias=False)
        self.set_last_layer_incorrect_connection(self.incorrect_strength)

    # ------------------------------------------------------------------------------------------ forward
    def set_last_layer_incorrect_connection(self, incorrect_strength: float = -0.5) -> None:
        """Wc[k, m] = 1 if prototype m belongs to class k else ``incorrect_strength`` (the original init)."""
        positive = self.prototype_class_identity.t()
        with torch.no_grad():
            self.last_layer.weight.copy_(positive + incorrect_strength * (1 - positive))

    def conv_features(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]`` → add-on output ``z [B, D, H, W]``."""
        z = self.add_on_layers(self.features(x))
        if z.dim() != 4 or z.shape[1] != self.prototype_shape[1]:
            raise ValueError(f"conv_features must give [B, {self.prototype_shape[1]}, H, W], got {tuple(z.shape)}; "
                             "check backbone_channels / add_on")
        return z

    def distance_2_similarity(self, distances: Tensor) -> Tensor:
        """``log((d + 1) / (d + ε))`` (``activation="log"``) or ``−d`` (``"linear"``)."""
        if self.activation == "log":
            return protofast.log_similarity(distances, self.epsilon)
        return -distances

    def head(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """Prototype layer and last layer on the add-on output ``z [B, D, H, W]``:
        ``(logits [B, K], min_distances [B, M])``."""
        min_distances, _ = protofast.prototype_min_distances(z, self.prototype_vectors)
        logits = self.last_layer(self.distance_2_similarity(min_distances))
        return logits, min_distances

    def forward(self, x: Tensor, return_features: bool = False):
        """``(logits [B, K], min_distances [B, M])``, plus ``z`` (the add-on output) with ``return_features``
        (needed by ``loss="mean"``)."""
        timing = self.timing
        if timing is None:
            z = self.conv_features(x)
            logits, min_distances = self.head(z)
        else:
            t0 = time.perf_counter()
            z = self.conv_features(x)
            t1 = time.perf_counter()
            if z.requires_grad:
                z.register_hook(_StampHook(timing))
            logits, min_distances = self.head(z)
            t2 = time.perf_counter()
            timing["backbone_forward"] = timing.get("backbone_forward", 0.0) + (t1 - t0)
            timing["head_forward"] = timing.get("head_forward", 0.0) + (t2 - t1)
        return (logits, min_distances, z) if return_features else (logits, min_distances)

    def push_forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(z [B, D, H, W], distance maps [B, M, H−h+1, W−w+1])`` — the original's push_forward."""
        z = self.conv_features(x)
        return z, protofast.prototype_distance_maps(z, self.prototype_vectors)

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, logits: Tensor, min_distances: Tensor, labels: Tensor,
             features: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The training loss and its (detached) terms.

        ``loss="minmax"`` (SEMANTICS.md §1.3, class-specific): with T[b, m] = I[m, y_b] and max_dist = D·h·w,
        ``clst = mean_b [max_dist − max_m (max_dist − mind)·T]``, ``sep`` likewise with 1 − T,
        ``l1 = Σ |Wc|·(1 − Iᵀ)`` and ``total = crs_ent·CE + clst·clst + sep·sep + l1·l1``
        (1, 0.8, −0.08, 1e-4). ``avg_separation`` is reported, never in the loss.

        ``loss="mean"`` (§1.7, reading (A)): ``mean = mean_{b,m,i,j} d[b, m, i, j]`` from the add-on output
        ``features`` in closed form, ``total = crs_ent·CE + mean·mean + l1·l1`` (1, 0.8, 1e-4).

        Args:
            logits: ``[B, K]``; min_distances: ``[B, M]``; labels: int ``[B]`` in [0, K);
            features: ``z [B, D, H, W]`` (``forward(x, return_features=True)[2]``), required by ``loss="mean"``.
        Returns:
            ``(total, terms)``; terms has ``cross_entropy``, ``l1``, ``total`` and ``cluster``, ``separation``,
            ``avg_separation`` (minmax) or ``mean_distance`` (mean).
        """
        labels = check_loss_inputs(logits, min_distances, labels, self.num_classes, self.num_prototypes)
        c = self.coefs
        ce = F.cross_entropy(logits, labels)
        l1 = protofast.masked_l1(self.last_layer.weight, self.prototype_class_identity)
        terms = {"cross_entropy": ce, "l1": l1}
        if self.loss_mode == "minmax":
            max_dist = self.prototype_shape[1] * self.prototype_shape[2] * self.prototype_shape[3]
            clst, sep, avg_sep = protofast.cluster_separation_costs(
                min_distances, labels, self.prototype_class_identity, max_dist, exact=self.exact_cluster)
            total = c["crs_ent"] * ce + c["clst"] * clst + c["sep"] * sep + c["l1"] * l1
            terms.update(cluster=clst, separation=sep, avg_separation=avg_sep)
        else:
            if features is None and self.mean_reading == "all_patches":
                raise ValueError("loss='mean' needs the add-on output: "
                                 "logits, mind, z = model(x, return_features=True); model.loss(logits, mind, y, z)")
            if self.mean_reading == "min_distances":
                mean = min_distances.mean()
            else:
                mean = protofast.mean_distance_loss(features, self.prototype_vectors)
            total = c["crs_ent"] * ce + c["mean"] * mean + c["l1"] * l1
            terms.update(mean_distance=mean)
        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

    # ------------------------------------------------------------------------------------------ phases
    def _groups(self, phase: str, lrs: Dict[str, float], lr_scale: float):
        wd = DEFAULT_WEIGHT_DECAY

        def group(name, params, weight_decay=0.0):
            return {"params": list(params), "lr": lrs[name] * lr_scale, "weight_decay": weight_decay, "name": name}

        if phase == "warm":
            return [group("add_on_layers", self.add_on_layers.parameters(), wd),
                    group("prototype_vectors", [self.prototype_vectors])]
        if phase == "joint":
            return [group("features", self.features.parameters(), wd),
                    group("add_on_layers", self.add_on_layers.parameters(), wd),
                    group("prototype_vectors", [self.prototype_vectors])]
        return [group("last_layer", self.last_layer.parameters())]

    def set_phase(self, phase: str) -> None:
        """``requires_grad`` as the original's warm_only / joint / last_only:
        warm: features frozen, add-on, prototypes and last layer trainable (the last layer's gradient is
        computed but not in the optimizer); joint: everything; last_layer: only the last layer."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        flags = {"warm": (False, True, True, True), "joint": (True, True, True, True),
                 "last_layer": (False, False, False, True)}[phase]
        for module_or_param, flag in zip((self.features, self.add_on_layers, self.prototype_vectors,
                                          self.last_layer), flags):
            params = [module_or_param] if isinstance(module_or_param, nn.Parameter) else \
                module_or_param.parameters()
            for p in params:
                p.requires_grad_(flag)

    def phase(self, phase: str, lrs: Optional[Dict[str, float]] = None, lr_scale: float = 1.0
              ) -> torch.optim.Adam:
        """Set ``requires_grad`` for ``phase`` (:meth:`set_phase`) and return its Adam optimizer with the
        original parameter groups (each group carries a ``"name"``):

        - warm: add_on_layers (lr 3e-3, wd 1e-3), prototype_vectors (3e-3);
        - joint: features (1e-4, wd 1e-3), add_on_layers (3e-3, wd 1e-3), prototype_vectors (3e-3);
        - last_layer: last_layer (1e-4).

        ``lrs`` overrides learning rates by group name; every lr is multiplied by ``lr_scale``.
        """
        unknown = set(lrs or {}) - set(DEFAULT_LRS)
        if unknown:
            raise ValueError(f"unknown learning-rate groups {sorted(unknown)}; known: {sorted(DEFAULT_LRS)}")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, got {lr_scale}")
        self.set_phase(phase)
        return torch.optim.Adam(self._groups(phase, {**DEFAULT_LRS, **(lrs or {})}, float(lr_scale)))

    def warm_optimizer(self, **kwargs) -> torch.optim.Adam:
        return self.phase("warm", **kwargs)

    def joint_optimizer(self, **kwargs) -> torch.optim.Adam:
        return self.phase("joint", **kwargs)

    def last_layer_optimizer(self, **kwargs) -> torch.optim.Adam:
        return self.phase("last_layer", **kwargs)

    # ------------------------------------------------------------------------------------------ config
    def config(self) -> dict:
        """JSON-serialisable constructor arguments (the backbone as its ``config()`` spec when it has one)."""
        if self.add_on_kind == "custom":
            raise ValueError("a ProtoPNet with a custom add_on module has no JSON config")
        spec = self.features.config() if hasattr(self.features, "config") else {"name": type(self.features).__name__}
        return dict(backbone=spec, num_classes=self.num_classes, prototypes_per_class=self.prototypes_per_class,
                    prototype_shape=list(self.prototype_shape[1:]), add_on=self.add_on_kind, loss=self.loss_mode,
                    epsilon=self.epsilon, activation=self.activation, backbone_channels=self.backbone_channels,
                    incorrect_strength=self.incorrect_strength, coefs=dict(self.coefs),
                    exact_cluster=self.exact_cluster, mean_reading=self.mean_reading)

    @classmethod
    def from_config(cls, config: dict, backbone: Optional[nn.Module] = None) -> "ProtoPNet":
        """Inverse of :meth:`config`; ``backbone`` is needed when the spec names no known backbone."""
        config = dict(config)
        spec = config.pop("backbone")
        return cls(backbone if backbone is not None else build_backbone(spec), **config)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, prototype_shape={self.prototype_shape}, loss={self.loss_mode!r}, "
                f"epsilon={self.epsilon}")


class _StampHook:
    """Tensor hook recording when the backward reaches the add-on output (the head's backward is done)."""

    def __init__(self, timing: dict):
        self.timing = timing

    def __call__(self, grad: Tensor) -> None:
        self.timing["_features_grad_at"] = time.perf_counter()
        return None

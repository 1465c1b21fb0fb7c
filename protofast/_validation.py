"""Input checking shared by every public op.

Each check raises a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape, size, device or value)
that names the argument and states what was expected, instead of letting a kernel fail or silently compute
the wrong thing. Shape and dtype checks run in Python (they are static under ``torch.compile``); checks that
read tensor values (label ranges, classes without prototypes) run inside the operators' implementations,
where ``torch.compile`` does not trace.
"""
from __future__ import annotations

import torch

METRICS = ("l2", "cosine")


def check_tensor(name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_metric(metric) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Same dtype (TypeError) and same device (ValueError)."""
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def check_features_prototypes(features, prototypes) -> None:
    """Shapes accepted by the distance ops.

    features:   [B, D, H, W] (NCHW feature map) or [B, N, D] (a set of N vectors per sample)
    prototypes: [M, D], [M, D, 1, 1] or [M, D, h, w] (h*w > 1 only with NCHW features: valid sliding window)
    """
    check_tensor("features", features)
    check_tensor("prototypes", prototypes)
    if features.dim() not in (3, 4):
        raise ValueError(
            f"features must be [B, D, H, W] (NCHW) or [B, N, D], got a {features.dim()}-d tensor of shape "
            f"{tuple(features.shape)}")
    if prototypes.dim() not in (2, 4):
        raise ValueError(
            f"prototypes must be [M, D], [M, D, 1, 1] or [M, D, h, w], got a {prototypes.dim()}-d tensor of shape "
            f"{tuple(prototypes.shape)}")
    check_same("features", features, "prototypes", prototypes)
    d_feat = features.shape[1] if features.dim() == 4 else features.shape[2]
    if prototypes.shape[1] != d_feat:
        layout = "[B, D, H, W]" if features.dim() == 4 else "[B, N, D]"
        raise ValueError(
            f"prototypes have D={prototypes.shape[1]} channels but features {layout} of shape "
            f"{tuple(features.shape)} have D={d_feat}")
    if features.shape[0] == 0:
        raise ValueError("features must have at least one sample (B >= 1), got B=0")
    if prototypes.shape[0] == 0:
        raise ValueError("prototypes must have at least one prototype (M >= 1), got M=0")
    if d_feat == 0:
        raise ValueError("features and prototypes must have at least one channel (D >= 1), got D=0")
    if prototypes.dim() == 4:
        h, w = prototypes.shape[2], prototypes.shape[3]
        if h == 0 or w == 0:
            raise ValueError(f"prototypes must have a non-empty spatial size, got h×w = {h}×{w}")
        if features.dim() == 3 and h * w != 1:
            raise ValueError(
                f"prototypes of spatial size {h}×{w} need NCHW features [B, D, H, W]; features of shape "
                f"{tuple(features.shape)} are a set [B, N, D]")
        if features.dim() == 4 and (features.shape[2] < h or features.shape[3] < w):
            raise ValueError(
                f"features of spatial size {features.shape[2]}×{features.shape[3]} are smaller than the "
                f"prototypes' {h}×{w}: no valid window")
    n = features.shape[2] * features.shape[3] if features.dim() == 4 else features.shape[1]
    if n == 0:
        raise ValueError(f"features must have at least one patch (N >= 1), got shape {tuple(features.shape)}")


def check_min_distances(name: str, d) -> None:
    check_tensor(name, d)
    if d.dim() != 2:
        raise ValueError(f"{name} must be [B, M], got shape {tuple(d.shape)}")
    if d.shape[0] == 0 or d.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty [B, M] with B, M >= 1, got shape {tuple(d.shape)}")


def check_identity(identity, num_prototypes: int) -> None:
    """prototype_class_identity: [M, K] 0/1 matrix, any device, floating/bool/integer dtype."""
    if not isinstance(identity, torch.Tensor):
        raise TypeError(f"prototype_class_identity must be a torch.Tensor, got {type(identity).__name__}")
    if identity.is_complex():
        raise TypeError(f"prototype_class_identity must be real 0/1, got dtype {identity.dtype}")
    if identity.dim() != 2 or identity.shape[0] != num_prototypes or identity.shape[1] == 0:
        raise ValueError(
            f"prototype_class_identity must be [M, K] = [{num_prototypes}, K] with K >= 1, got shape "
            f"{tuple(identity.shape)}")


def check_labels(labels, batch: int, num_classes: int) -> bool:
    """Returns True for multi-label targets [B, K], False for class indices [B]."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() == 1:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels [B] must hold integer class indices, got dtype {labels.dtype}")
        if labels.shape[0] != batch:
            raise ValueError(f"labels must have B={batch} entries, got shape {tuple(labels.shape)}")
        return False
    if labels.dim() == 2:
        if tuple(labels.shape) != (batch, num_classes):
            raise ValueError(
                f"multi-label labels must be [B, K] = [{batch}, {num_classes}], got shape {tuple(labels.shape)}")
        if labels.is_complex():
            raise TypeError(f"multi-label labels must be real 0/1, got dtype {labels.dtype}")
        return True
    raise ValueError(f"labels must be [B] class indices or [B, K] multi-label targets, got shape "
                     f"{tuple(labels.shape)}")


def check_label_values(labels: torch.Tensor, num_classes: int) -> None:
    """Value check (reads the tensor: call from inside an op implementation)."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must be class indices in [0, {num_classes}), found {bad}")

"""ProtoMask references (SEMANTICS.md §3.3): the literal per-mask crop loop and the materialised prototype head.

Plain PyTorch, written for reading and for float64 oracles; autograd gives their gradients.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.views import check_views_inputs

__all__ = ["mask_views", "protomask_head", "diversity_loss"]


def mask_views(images: Tensor, masks: Tensor, size, fill: str = "zero",
               foreground: str = "nonzero") -> Tuple[Tensor, Tensor]:
    """One mask at a time, as quanproto's data loader: mask the image, slice the bounding box, resize it with
    ``F.interpolate(bilinear, align_corners=False)``. Same signature and result as
    :func:`protofast.mask_views`."""
    S = check_views_inputs(images, masks, size, fill, foreground)
    B, C, H, W = images.shape
    V = masks.shape[1]
    views = images.new_zeros(B, V, C, *S)
    valid = torch.zeros(B, V, dtype=torch.bool)
    out = []
    for b in range(B):
        row = []
        for v in range(V):
            m = masks[b, v].bool()
            if not bool(m.any()):
                row.append(images.new_zeros(C, *S))
                continue
            valid[b, v] = True
            fg = m if foreground == "mask" else m & (images[b].sum(0) != 0)
            fgf = fg.to(images.dtype)
            if fill == "original":
                y = images[b]
            elif fill == "zero":
                y = images[b] * fgf
            else:
                n = fgf.sum()
                colour = (images[b] * fgf).sum((1, 2)) / n if n > 0 else images.new_zeros(C)
                y = images[b] * fgf + (1 - fgf) * colour[:, None, None]
            rows = torch.nonzero(m.any(1)).flatten()
            cols = torch.nonzero(m.any(0)).flatten()
            crop = y[:, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
            row.append(F.interpolate(crop[None], size=S, mode="bilinear", align_corners=False)[0])
        out.append(torch.stack(row))
    views = torch.stack(out)
    return views, valid.to(images.device)


def diversity_loss(prototypes: Tensor, identity: Tensor, labels: Tensor, exclude_diagonal: bool = True) -> Tensor:
    """``mean_b exp(−0.001 · Σ_{i,j} ‖v_i − v_j‖₂)`` over the prototypes v of class y_b (all ordered pairs, so each
    unordered pair counts twice; the diagonal is 0). ``exclude_diagonal`` drops i = j (same value, defined
    gradient). Materialises the class's difference vectors, as quanproto."""
    P = prototypes.reshape(prototypes.shape[0], -1)
    cls = torch.argmax(identity, dim=1)
    out = []
    for y in labels.tolist():
        v = P[cls == y]
        diff = v[None, :, :] - v[:, None, :]
        n = v.shape[0]
        if exclude_diagonal:
            off = ~torch.eye(n, dtype=torch.bool)
            dist = torch.linalg.norm(diff[off], dim=-1).sum() if n > 1 else P.new_zeros(())
        else:
            dist = torch.linalg.norm(diff, dim=-1).sum()
        out.append(torch.exp(-0.001 * dist))
    return torch.stack(out).mean()


def protomask_head(e: Tensor, prototypes: Tensor, eps: float = 1e-14,
                   view_valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The straightforward formulation: ``dv[b, v, m] = relu(‖e‖² − 2 e·p + ‖p‖²)`` materialised, invalid views
    set to +inf, ``mind = min_v dv`` (first occurrence), ``sim = log((1 + mind)/(mind + eps))``.
    Returns ``(mind [B, M], argmin view [B, M], sim [B, M])``."""
    P = prototypes.reshape(prototypes.shape[0], -1)
    dv = torch.relu((e * e).sum(-1, keepdim=True) - 2 * e @ P.t() + (P * P).sum(-1)[None, None, :])
    if view_valid is not None:
        dv = dv.masked_fill(~view_valid.bool()[:, :, None], float("inf"))
    mind, arg = torch.min(dv, dim=1)
    sim = torch.log((mind + 1) / (mind + eps))
    return mind, arg, sim


def push_original(model, loader, reset_per_batch: bool = True):
    """quanproto's ProtoMask push, literally (per batch, per prototype, a Python loop over the candidate images):
    dv = relu'd distances of every (image, view) to every prototype (materialised), the candidates are the batch's
    images of the prototype's class in batch order, the batch minimum over (candidate, view) flattened
    image-major (first occurrence), a strict ``<`` against the best so far (reset to +inf every batch with
    ``reset_per_batch``), the winning view's embedding copied. Prototypes never updated become zero.
    Loader items: ``(views, labels)`` or ``(views, labels, view_valid)`` (invalid views: +inf).
    Returns ``(new prototypes [M, D], {m: (image index, view index, distance)})``; does not modify the model."""
    P = model.prototype_vectors.detach().reshape(model.num_prototypes, -1)
    M = P.shape[0]
    cls = [int(torch.argmax(model.prototype_class_identity[m])) for m in range(M)]
    best = [float("inf")] * M
    new = torch.zeros_like(P)
    log = {}
    seen = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            views, labels = batch[0], batch[1]
            valid = batch[2] if len(batch) > 2 else None
            e = model.embed(views)                                           # [B, V, D]
            dv = torch.relu((e * e).sum(-1, keepdim=True) - 2 * e @ P.t() + (P * P).sum(-1))   # [B, V, M]
            if valid is not None:
                dv = dv.masked_fill(~valid.bool()[:, :, None], float("inf"))
            if reset_per_batch:
                best = [float("inf")] * M
            for m in range(M):
                candidates = [b for b in range(len(labels)) if int(labels[b]) == cls[m]]
                if not candidates:
                    continue
                d = dv[candidates][:, :, m]                                   # [n, V]
                flat = int(torch.argmin(d.flatten()))
                v = float(d.flatten()[flat])
                if v < best[m]:
                    b, view = candidates[flat // d.shape[1]], flat % d.shape[1]
                    best[m] = v
                    new[m] = e[b, view]
                    log[m] = (seen + b, view, v)
            seen += len(labels)
    model.train(was_training)
    return new, log

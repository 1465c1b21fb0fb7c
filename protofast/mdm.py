"""DProtoNet's MDM decoder (eqs. 12–18, SEMANTICS.md §4.5): which pixels of an image make a masked vector
close to a prototype, found by optimising low-resolution mask vectors through the frozen network.

For an image x with masked vector index j and a target vector t (eq. 13: t = z_j(x), the image's own vector;
eq. 14: t = p_t for the image x^{p_t} the prototype came from, with j = j_{p_t}), L_d mask vectors
d_i ∈ [0, 1]^{a_i×a_i}, a_i = 5 + i (6 … 15), initialised to τ = 0.5, upsampled to the image by g (bilinear,
align_corners=False), minimise

    L_i = ‖z_j(g(d_i) ⊙ x) − t‖² + η_i · Σ_{u,v} |d_i[u, v]| / a_i²          (η_i = 10)

with Adam (lr 0.01, 800 iterations) and a clamp to [0, 1] after every step. All mask vectors of all images are
independent problems (the network is frozen and in eval mode), so they are optimised together: one forward of
N·L_d masked images per iteration with the summed loss, which gives every d_i exactly its own gradient, and Adam
(per element) exactly its own trajectory (tested against one problem at a time).

Mask generation (eqs. 15–18): S = Σ_i g(d_i); A = N(1[S ≥ γ] ⊙ S), γ = 3, N(X) = (X − min X)/(max X − min X) per
image (``constant_map="zeros"``: a constant thresholded map gives A = 0 instead of 0/0; ``"nan"``: the literal
division); heatmap A_h = α·x + β·A (α = 0.5, β = 0.3); masked image A_b = A ⊙ x; binary mask: the top
``keep`` fraction of A (50 % RSNA / iChallenge-PM, 80 % CUB).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MDMResult", "optimise_mask_vectors", "generate_mask", "binarise", "explain", "prototypes_for",
           "save_mdm_figure"]

DEFAULT_SIZES = tuple(5 + i for i in range(1, 11))            # a_i = b_i = 5 + i, i = 1..10


def _masked_vector(model, images: Tensor, mask_index: Tensor) -> Tensor:
    """z_{j_n}(x_n) [N, D]: the one masked vector each image needs (GAP(M_j ⊙ F), eq. 8, without the other I−1)."""
    feats = model.conv_features(images)                                           # [N, D, H, W]
    masks = model.masks.to(feats.dtype)[mask_index]                               # [N, D, H, W]
    return (feats * masks).mean(dim=(2, 3))


def upsample(d: Tensor, size) -> Tensor:
    """g(d): [N, a, b] -> [N, S_h, S_w], bilinear, align_corners=False."""
    return F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def optimise_mask_vectors(model, images: Tensor, mask_index: Tensor, targets: Tensor,
                          sizes: Sequence[int] = DEFAULT_SIZES, iterations: int = 800, lr: float = 0.01,
                          eta: float = 10.0, tau: float = 0.5, clamp: bool = True) -> List[Tensor]:
    """Optimise ``len(sizes)`` mask vectors per image, all images and sizes in one batch (eq. 13 / 14).

    Args:
        model: a DProtoNet (frozen here: no parameter receives gradient; run in eval mode, restored after).
        images: ``[N, 3, S, S]`` (as the model takes them, e.g. normalised).
        mask_index: ``[N]`` int, the masked vector j of each image.
        targets: ``[N, D]``, the constant target vector of each image (z_j(x) or p_t).
        sizes: a_i (square d_i of a_i × a_i); iterations, lr (Adam), eta (η_i), tau (init), clamp to [0, 1].

    Returns:
        ``[d_1 [N, a_1, a_1], ..., d_L [N, a_L, a_L]]``.
    """
    N, _, Sh, Sw = images.shape
    L = len(sizes)
    if mask_index.shape != (N,) or targets.dim() != 2 or targets.shape[0] != N:
        raise ValueError(f"mask_index must be [N] and targets [N, D] with N = {N}, got {tuple(mask_index.shape)} "
                         f"and {tuple(targets.shape)}")
    ds = [torch.full((N, a, a), float(tau), dtype=images.dtype, device=images.device, requires_grad=True)
          for a in sizes]
    opt = torch.optim.Adam(ds, lr=lr)
    x = images.detach().repeat(L, 1, 1, 1)                                        # [L·N, 3, S, S], size-major
    j = mask_index.repeat(L)
    t = targets.detach().repeat(L, 1)
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(iterations):
            g = torch.cat([upsample(d, (Sh, Sw)) for d in ds])                    # [L·N, S, S]
            z = _masked_vector(model, g[:, None] * x, j)
            fidelity = ((z - t) ** 2).sum()
            sparsity = sum(eta * d.abs().sum() / (d.shape[1] * d.shape[2]) for d in ds)
            opt.zero_grad(set_to_none=True)
            (fidelity + sparsity).backward()
            opt.step()
            if clamp:
                with torch.no_grad():
                    for d in ds:
                        d.clamp_(0, 1)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return [d.detach() for d in ds]


def generate_mask(ds: Sequence[Tensor], size, gamma: float = 3.0, constant_map: str = "zeros") -> Tensor:
    """A = N(1[S ≥ γ] ⊙ S) with S = Σ_i g(d_i) (eqs. 15–16), per image: ``[N, S_h, S_w]`` in [0, 1]."""
    if constant_map not in ("zeros", "nan"):
        raise ValueError(f"constant_map must be 'zeros' or 'nan', got {constant_map!r}")
    S = sum(upsample(d, size) for d in ds)
    T = torch.where(S >= gamma, S, torch.zeros_like(S))
    lo = T.flatten(1).min(1).values[:, None, None]
    hi = T.flatten(1).max(1).values[:, None, None]
    span = hi - lo
    if constant_map == "nan":
        return (T - lo) / span
    return torch.where(span > 0, (T - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(T))


@dataclasses.dataclass
class MDMResult:
    """Per image n: ``mask [N, S, S]`` (A for x), ``prototype_mask [N, S, S]`` (A for x^{p_t}), ``heatmap`` and
    ``masked_image`` ``[N, 3, S, S]`` (eqs. 17–18 for x), ``binary [N, S, S]`` (top ``keep`` of A),
    ``predicted [N]``, ``prototype [N]`` (p_t), ``mask_index [N]`` (j_x), ``prototype_mask_index [N]`` (j_{p_t}),
    ``vectors`` / ``prototype_vectors``: the optimised d_i."""

    mask: Tensor
    prototype_mask: Tensor
    heatmap: Tensor
    masked_image: Tensor
    binary: Tensor
    predicted: Tensor
    prototype: Tensor
    mask_index: Tensor
    prototype_mask_index: Tensor
    vectors: List[Tensor]
    prototype_vectors: List[Tensor]


def binarise(A: Tensor, keep: float) -> Tensor:
    """1 on the top ``keep`` fraction of each map (ties at the threshold kept), 0 elsewhere; pixels where A = 0
    (removed by the γ threshold) never enter the mask, so a sparse A gives fewer than ``keep`` pixels."""
    flat = A.flatten(1)
    k = max(1, int(round(keep * flat.shape[1])))
    thresh = flat.topk(k, dim=1).values[:, -1]
    return ((A >= thresh[:, None, None]) & (A > 0)).to(A.dtype)


def explain(model, images: Tensor, source_images: Tensor, sizes: Sequence[int] = DEFAULT_SIZES,
            iterations: int = 800, lr: float = 0.01, eta: float = 10.0, tau: float = 0.5, gamma: float = 3.0,
            alpha: float = 0.5, beta: float = 0.3, keep: float = 0.5, constant_map: str = "zeros") -> MDMResult:
    """The MDM decoder for a batch of images (eqs. 12–18).

    For each image x: c = the predicted class, p_t = the class-c prototype most activated by x (smallest min
    distance), j_x = argmin_j ‖z_j(x) − p_t‖ (eq. 12). ``source_images[n]`` is x^{p_t}, the image p_t was
    projected from (``UpdateResult.image_index[p_t]`` after :func:`protofast.dprotonet_train.update_prototypes`;
    :func:`prototypes_for` tells which p_t each image gets), with j_{p_t} = argmin_j ‖z_j(x^{p_t}) − p_t‖. The 2·N·L
    mask-vector problems (eqs. 13, 14) are optimised in one batch.
    """
    predicted, proto, j_x = prototypes_for(model, images)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p_t = model.prototype_vectors[proto, :, 0, 0].to(images.dtype)          # [N, D]
            z_x = _masked_vector(model, images, j_x)
            z_src = model.masked_vectors(model.conv_features(source_images))        # [N, I, D]
            j_src = ((z_src - p_t[:, None]) ** 2).sum(-1).argmin(1)
    finally:
        model.train(was_training)
    both = optimise_mask_vectors(model, torch.cat([images, source_images]), torch.cat([j_x, j_src]),
                                 torch.cat([z_x, p_t]), sizes, iterations, lr, eta, tau)
    N = images.shape[0]
    size = tuple(images.shape[2:])
    A = generate_mask([d[:N] for d in both], size, gamma, constant_map)
    A_src = generate_mask([d[N:] for d in both], size, gamma, constant_map)
    heatmap = alpha * images + beta * A[:, None]
    return MDMResult(mask=A, prototype_mask=A_src, heatmap=heatmap, masked_image=A[:, None] * images,
                     binary=binarise(A, keep), predicted=predicted, prototype=proto, mask_index=j_x,
                     prototype_mask_index=j_src, vectors=[d[:N] for d in both],
                     prototype_vectors=[d[N:] for d in both])


@torch.no_grad()
def prototypes_for(model, images: Tensor):
    """``(predicted class [N], p_t [N], j_x [N])``: the class-c prototype with the smallest min distance to x and
    the index of x's nearest masked vector to it (eq. 12)."""
    was_training = model.training
    model.eval()
    try:
        feats = model.conv_features(images)
        z, mind, argmin = model.prototype_activations(feats)
        logits = model.last_layer(model.distance_2_similarity(mind))
    finally:
        model.train(was_training)
    predicted = logits.argmax(1)
    own = model.prototype_class_identity[:, predicted].t() > 0                      # [N, M]
    proto = torch.where(own, mind, torch.full_like(mind, float("inf"))).argmin(1)
    return predicted, proto, argmin.gather(1, proto[:, None])[:, 0]


def save_mdm_figure(result: MDMResult, images: Tensor, source_images: Tensor, path: str) -> str:
    """A PNG with one row per image: x, the heatmap A_h, the binary mask, x^{p_t} and its mask A^{p_t}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("save_mdm_figure needs matplotlib: pip install 'protofast[plot]'") from exc

    def show(ax, img, title, overlay=None, cmap=None):
        img = img.detach().cpu().float()
        if img.dim() == 3:
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
            ax.imshow(img.permute(1, 2, 0).numpy())
        else:
            ax.imshow(img.numpy(), cmap=cmap or "gray", vmin=0, vmax=1)
        if overlay is not None:
            ax.imshow(overlay.detach().cpu().float().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])

    N = images.shape[0]
    fig, axes = plt.subplots(N, 5, figsize=(7.5, 1.6 * N), squeeze=False)
    for n in range(N):
        show(axes[n, 0], images[n], f"x (pred {int(result.predicted[n])})")
        show(axes[n, 1], result.heatmap[n], "heatmap A_h", overlay=result.mask[n])
        show(axes[n, 2], result.binary[n], "binary mask")
        show(axes[n, 3], source_images[n], f"x^p (p{int(result.prototype[n])})")
        show(axes[n, 4], source_images[n], "A for x^p", overlay=result.prototype_mask[n])
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

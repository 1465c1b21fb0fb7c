"""ProtoNMF: turn a trained classifier (backbone + linear head on GAP features) into a prototype model.

SEMANTICS.md §5; paper "ProtoNMF: Turning a Black Box into a Prototype Based Interpretable Model via NMF".

Conversion (``ProtoNMF.from_classifier``), for every class c:

1. A^c (n·H·W × D): the backbone's feature vectors of all the loader's images of class c, image-major then
   row-major (h, w); negative entries set to 0 (``clip_negative``). NMF (``protofast.batched_nmf``, all classes
   at once): A^c ≈ E^c B^c, B^c (p × D) the class's prototypes.
2. Head reconstruction (eq. 4): C^c = argmin_C ‖V^c − C B^c‖² (least squares; V^c the head's weight row).
3. Residual prototype (eq. 5): R^c = V^c − C^c B^c, so V^c = Σ_i a_i b_i + R^c exactly (a_i = C^c[i]).
4. Residual heatmaps (eq. 6): H^c = (A Rᵀ − E (B Rᵀ)) / ‖R‖² (zeros when R = 0), n maps of H × W.
5. Augmented prototypes (eq. 8): b'_i = b_i + R^c / Σ_i a_i (so V^c = Σ_i a_i b'_i); a class with Σ a_i = 0
   raises unless ``sum_a_eps`` is given (|Σ a| < sum_a_eps is then replaced by ±sum_a_eps, and that class's
   augmented prototypes no longer sum to V exactly — the logits never use them). Their encodings (eq. 9):
   E' = argmin ‖A − E' B'‖² (unconstrained least squares).

Inference (``forward``): with g = GAP(f) (f the unclipped features, as the original head sees them),
    logit_c = Σ_i a_i · mean_hw(f_hw · b_i) + mean_hw(f_hw · R^c) + bias_c = V^c · g + bias_c,
returned with each prototype's contribution a_i · (g · b_i) and the residual's g · R^c. The decomposition is
computed in float64, so the logits equal the original head's to float32 rounding.

Table-1-style comparison (``reconstruction_error``, ``protopnet_style_prototypes``): how well p prototypes
reconstruct a class's features, min_{E ≥ 0} ‖A − E P‖_F / ‖A‖_F (encodings by the fixed-basis multiplicative
updates, ``protofast.nmf_encode``, the same solver for every prototype set), for the NMF prototypes and for p
prototypes chosen ProtoPNet-style: ProtoPNet's prototypes end up as actual training patches of their class
(push projects each onto its nearest class patch); without a trained ProtoPNet we pick, per class, the nearest
training patch to each of p k-means centres of the class's patches (k-means++ seeding, seeded) — the most
favourable patch choice a clustering objective like ProtoPNet's would make.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops.nmf import batched_nmf, nmf_encode

__all__ = ["ProtoNMF", "ProtoNMFOutput", "reconstruction_error", "protopnet_style_prototypes"]


class ProtoNMFOutput(NamedTuple):
    logits: Tensor         # [B, K] = original head's logits
    contributions: Tensor  # [B, K, p]: a_i · mean_hw(f_hw · b_i) of each class's prototypes
    residual: Tensor       # [B, K]: mean_hw(f_hw · R^c)


def _feature_rows(f: Tensor) -> Tensor:
    """[B, D, H, W] -> [B, H·W, D] (row-major (h, w) per image)."""
    if f.dim() != 4:
        raise ValueError(f"the backbone must return [B, D, H, W] feature maps, got shape {tuple(f.shape)}")
    return f.flatten(2).transpose(1, 2)


class ProtoNMF(nn.Module):
    """A converted classifier: the backbone, per-class NMF prototypes B [K, p, D], head coefficients C [K, p],
    residual prototypes R [K, D], the head's bias [K] and augmented prototypes B' [K, p, D].

    Build it with :meth:`from_classifier`. Buffers are float64 (the decomposition is exact there).
    After conversion, ``conversion`` holds the training-side results: per-class encodings E (list of
    [n_c·H·W, p]), residual heatmaps (list of [n_c, H, W]), augmented encodings E', NMF errors and iterations.
    """

    def __init__(self, backbone: nn.Module, prototypes: Tensor, coefficients: Tensor, residual: Tensor,
                 bias: Tensor, augmented: Optional[Tensor] = None):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("prototypes", prototypes.double())
        self.register_buffer("coefficients", coefficients.double())
        self.register_buffer("residual_prototypes", residual.double())
        self.register_buffer("bias", bias.double())
        self.register_buffer("augmented_prototypes", None if augmented is None else augmented.double())
        self.conversion: dict = {}

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def rank(self) -> int:
        return self.prototypes.shape[1]

    # ------------------------------------------------------------------------------------ conversion
    @classmethod
    @torch.no_grad()
    def from_classifier(cls, backbone: nn.Module, head: nn.Linear, loader, rank: int = 3, *,
                        clip_negative: bool = True, sum_a_eps: Optional[float] = None, max_iter: int = 200,
                        tol: float = 1e-4, seed: int = 0, **nmf_kwargs) -> "ProtoNMF":
        """Convert ``backbone`` + ``head`` (nn.Linear on global-average-pooled features) with the images of
        ``loader`` (an iterable of ``(images, labels)`` batches; every class needs at least one image).

        ``rank`` = p prototypes per class; ``max_iter``, ``tol``, ``seed`` and ``nmf_kwargs`` go to
        ``protofast.batched_nmf`` (DFF's defaults). ``sum_a_eps``: see the module docstring.
        """
        if not isinstance(head, nn.Linear):
            raise TypeError(f"head must be an nn.Linear on GAP features, got {type(head).__name__}")
        K, D = head.weight.shape
        was_training = backbone.training
        backbone.eval()
        per_class: List[List[Tensor]] = [[] for _ in range(K)]
        spatial = None
        for batch in loader:
            x, y = batch[0], batch[1]
            y = torch.as_tensor(y).reshape(-1)
            f = backbone(x.to(head.weight.device))
            rows = _feature_rows(f)
            if f.shape[1] != D:
                raise ValueError(f"the backbone gives D={f.shape[1]} channels but head expects in_features={D}")
            if spatial is None:
                spatial = tuple(f.shape[2:])
            if int(y.min()) < 0 or int(y.max()) >= K:
                raise ValueError(f"labels must be class indices in [0, {K}), found {int(y.min())}..{int(y.max())}")
            for c in y.unique().tolist():
                per_class[c].append(rows[(y == c).to(rows.device)].reshape(-1, D).float().cpu())
        backbone.train(was_training)
        missing = [c for c in range(K) if not per_class[c]]
        if missing:
            raise ValueError(f"loader has no images of classes {missing[:10]}: every class needs at least one image")
        A = [torch.cat(parts) for parts in per_class]
        if clip_negative:
            A = [a.clamp(min=0) for a in A]
        res = batched_nmf(A, rank, max_iter=max_iter, tol=tol, seed=seed, clip_negative=clip_negative,
                          **nmf_kwargs)
        B = res.B.double()                                                         # [K, p, D]
        V = head.weight.detach().double().cpu()                                    # [K, D]
        bias = (head.bias.detach().double().cpu() if head.bias is not None else torch.zeros(K, dtype=torch.float64))
        C = torch.linalg.lstsq(B.transpose(1, 2), V[:, :, None], driver="gelsd").solution[:, :, 0]   # [K, p]
        R = V - torch.einsum("kp,kpd->kd", C, B)
        augmented, aug_enc = _augment(C, B, R, sum_a_eps, A)
        model = cls(backbone, B, C, R, bias, augmented)
        HW = spatial[0] * spatial[1]
        heat = []
        for c, a in enumerate(A):
            E = res.E[c, : a.shape[0]].double()
            r = R[c]
            rr = float(r @ r)
            h = (a.double() @ r - E @ (B[c] @ r)) / rr if rr > 0 else torch.zeros(a.shape[0], dtype=torch.float64)
            heat.append(h.reshape(-1, *spatial))
        model.conversion = {
            "encodings": res.encodings(), "nmf_error": res.err, "nmf_iterations": res.n_iter,
            "residual_heatmaps": heat, "augmented_encodings": aug_enc, "spatial": spatial,
            "images_per_class": [a.shape[0] // HW for a in A],
        }
        return model.to(head.weight.device)

    # ------------------------------------------------------------------------------------ inference
    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def decompose(self, f: Tensor) -> ProtoNMFOutput:
        """The logit decomposition of feature maps f [B, D, H, W] (float64 inside, f's dtype out)."""
        g = f.double().mean((2, 3))                                                     # GAP [B, D]
        sim = torch.einsum("bd,kpd->bkp", g, self.prototypes)                           # mean_hw(f_hw · b_i)
        contributions = sim * self.coefficients[None]
        residual = g @ self.residual_prototypes.t()
        logits = contributions.sum(2) + residual + self.bias
        return ProtoNMFOutput(logits.to(f.dtype), contributions.to(f.dtype), residual.to(f.dtype))

    def forward(self, x: Tensor) -> ProtoNMFOutput:
        return self.decompose(self.backbone(x))

    def similarity_maps(self, x: Tensor) -> Tensor:
        """f_hw · b_i for every class's prototypes: [B, K, p, H, W] (their spatial mean is what the logit uses)."""
        f = self.backbone(x).double()
        return torch.einsum("bdhw,kpd->bkphw", f, self.prototypes).to(x.dtype)

    @torch.no_grad()
    def presence_maps(self, x: Tensor, class_index=None, max_iter: int = 200, tol: float = 1e-4) -> Tensor:
        """Where each prototype of a class is present in each image: the NMF encodings E of the image's (clipped)
        features against that class's prototypes (fixed-basis multiplicative updates, ``nmf_encode``), as the
        paper visualises them. ``class_index``: an int, [B] classes, or None (the predicted class).
        Returns [B, p, H, W]."""
        f = self.backbone(x)
        Bn, D, H, W = f.shape
        if class_index is None:
            cls_idx = self.decompose(f).logits.argmax(1)
        else:
            cls_idx = torch.as_tensor(class_index, device=f.device).reshape(-1).expand(Bn) \
                if not isinstance(class_index, int) else torch.full((Bn,), class_index, device=f.device)
        cls_idx = cls_idx.long().cpu()
        if int(cls_idx.min()) < 0 or int(cls_idx.max()) >= self.num_classes:
            raise ValueError(f"class_index must be in [0, {self.num_classes}), got {cls_idx.tolist()}")
        rows = _feature_rows(f).double().clamp(min=0).cpu().contiguous()
        basis = self.prototypes.cpu()[cls_idx].contiguous()
        enc = nmf_encode(rows, basis, max_iter=max_iter, tol=tol)
        return enc.E.transpose(1, 2).reshape(Bn, self.rank, H, W).to(x.dtype)

    def save_presence_png(self, x: Tensor, path, class_index=None, images: Optional[Tensor] = None) -> None:
        """A PNG of where each prototype is present: one row per image, the image then one panel per prototype
        (its presence map bilinearly upsampled to the image and overlaid), and a last panel colouring every
        pixel by its strongest prototype."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("save_presence_png needs matplotlib: pip install matplotlib "
                              "(or protofast[plot])") from exc
        maps = self.presence_maps(x, class_index).float()                        # [B, p, H, W]
        imgs = (x if images is None else images).detach().float().cpu()
        S = imgs.shape[-2:]
        up = torch.nn.functional.interpolate(maps.cpu(), size=S, mode="bilinear", align_corners=False)
        Bn, p = maps.shape[:2]
        fig, axes = plt.subplots(Bn, p + 2, figsize=(2 * (p + 2), 2 * Bn), squeeze=False)
        colours = plt.get_cmap("tab10")
        for b in range(Bn):
            img = imgs[b].permute(1, 2, 0).clamp(0, 1).numpy() if imgs.shape[1] == 3 else imgs[b, 0].numpy()
            axes[b, 0].imshow(img)
            axes[b, 0].set_title("image", fontsize=8)
            for i in range(p):
                axes[b, i + 1].imshow(img)
                axes[b, i + 1].imshow(up[b, i].numpy(), cmap="jet", alpha=0.5)
                axes[b, i + 1].set_title(f"prototype {i}", fontsize=8)
            strongest = up[b].argmax(0)
            rgb = torch.tensor([colours(i)[:3] for i in range(p)])[strongest]
            axes[b, p + 1].imshow(img)
            axes[b, p + 1].imshow(rgb.numpy(), alpha=0.5)
            axes[b, p + 1].set_title("strongest", fontsize=8)
            for ax in axes[b]:
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def _augment(C: Tensor, B: Tensor, R: Tensor, sum_a_eps: Optional[float], A: Sequence[Tensor]):
    """b'_i = b_i + R / Σ a_i per class, and the augmented encodings E' = argmin ‖A − E' B'‖² (least squares)."""
    s = C.sum(1)                                                              # [K]
    if sum_a_eps is None:
        zero = (s == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"classes {zero[:10]} have head coefficients summing to exactly 0: the augmented "
                             "prototypes b_i + R / Σ a_i are undefined (pass sum_a_eps to clamp |Σ a_i|)")
    else:
        if not (isinstance(sum_a_eps, (int, float)) and sum_a_eps > 0 and math.isfinite(sum_a_eps)):
            raise ValueError(f"sum_a_eps must be a finite number > 0, got {sum_a_eps!r}")
        sign = torch.where(s < 0, -1.0, 1.0).double()
        s = torch.where(s.abs() < sum_a_eps, sign * sum_a_eps, s)
    Bp = B + (R / s[:, None])[:, None, :]                                     # [K, p, D]
    enc = [torch.linalg.lstsq(Bp[c].t(), a.double().t(), driver="gelsd").solution.t() for c, a in enumerate(A)]
    return Bp, enc


# ---------------------------------------------------------------------------------------- Table 1
def reconstruction_error(A: Tensor, prototypes: Tensor, max_iter: int = 500) -> float:
    """min_{E ≥ 0} ‖A − E P‖_F / ‖A‖_F for features A [n, D] (clipped at 0) and prototypes P [p, D] ≥ 0: the
    encodings by the fixed-basis multiplicative updates (``nmf_encode``, ``max_iter`` updates, no early stop)."""
    A = A.double().clamp(min=0)
    r = nmf_encode([A], prototypes.double().clamp(min=0), max_iter=max_iter, tol=0)
    norm = float(torch.linalg.norm(A))
    return float(r.err[0]) / norm if norm > 0 else 0.0


def protopnet_style_prototypes(A: Tensor, p: int, seed: int = 0, iters: int = 30) -> Tensor:
    """p actual patches of the class (rows of A [n, D]) chosen as ProtoPNet's push would leave them: the nearest
    patch to each of p k-means centres (k-means++ seeding from a private generator, Lloyd iterations);
    distinct patches. Returns [p, D]."""
    A = A.double()
    n = A.shape[0]
    if not 1 <= p <= n:
        raise ValueError(f"p must be in 1..n = {n}, got {p}")
    g = torch.Generator().manual_seed(seed)
    centres = [A[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, p):                                    # k-means++
        d2 = torch.cdist(A, torch.stack(centres)).min(1).values ** 2
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        centres.append(A[int(torch.multinomial(probs, 1, generator=g))])
    Cm = torch.stack(centres)
    for _ in range(iters):                                    # Lloyd
        assign = torch.cdist(A, Cm).argmin(1)
        for j in range(p):
            members = A[assign == j]
            if members.shape[0]:
                Cm[j] = members.mean(0)
    chosen: List[int] = []
    dist = torch.cdist(Cm, A)                                 # [p, n]
    for j in range(p):                                        # push: nearest patch, each patch used once
        order = dist[j].argsort()
        idx = next(int(i) for i in order if int(i) not in chosen)
        chosen.append(idx)
    return A[chosen]

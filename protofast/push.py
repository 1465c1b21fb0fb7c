"""Prototype projection ("push"): replace every prototype by its nearest training patch, streamed on the device.

Semantics (SEMANTICS.md §1.5, the cfchen-duke/ProtoPNet contract). For prototype m with class
k(m) = first-occurrence argmax of I[m, :], over the loader's batches t in order, with features x = conv_features
and the squared L2 distance d[b, m, i, j] = relu(S[b, i, j] − 2·G[b, m, i, j] + Q[m]) (§1.2):

* candidates of m in batch t: the images whose label is k(m) (multi-label: whose target has k(m); every image
  with ``class_specific=False``), in batch order; none → m is skipped for this batch;
* v = min over (candidate b, i, j) of d[b, m, i, j], and (b*, i*, j*) its first occurrence in that order;
* if v < best[m] (**strict**): best[m] = v, patch[m] = x[b*, :, i*·s : i*·s + h, j*·s : j*·s + w] (s = 1);
* at the end p[m] ← patch[m]; prototypes whose class never appeared become zero (``unseen="zero"``, the
  original) or stay unchanged (``unseen="keep"``).

Ties therefore go to the earliest image in loader order, then the earliest (i, j) in row-major order.
``reset_per_batch=True`` reproduces uos-sis/quanproto (§3.5): best[m] is reset to +inf at every batch, so each
prototype ends on the best patch of the *last* batch containing its class.

How it is computed, per batch, on the model's device (nothing of size B×M×H'×W' is formed):

* class-specific (the default): each image has c candidate prototypes (those of its class; c = 10 at ProtoPNet's
  defaults, against M = 2000). They are gathered per image and the B×c distance maps are formed by one batched
  GEMM in the expanded form above, then reduced over positions (first occurrence): B·c·H'·W' entries, not
  B·M·H'·W'. A ``scatter_reduce`` over the (image, slot) pairs gives, per prototype, the batch minimum v and its
  first (image, position). On the CPU this small search runs on one thread (parallel regions cost more than they
  save at this size);
* ``class_specific=False`` (or multi-label targets with many positive classes, c > M/4): the fused
  :func:`protofast.prototype_min_distances` over all B×M pairs (masked to +inf for non-candidates), then
  ``torch.min`` over the batch (first occurrence).

Only the winning patches are copied, into an [M, D, h, w] buffer. Memory: O(B·D·H·W + B·c·H'·W' + M·D·h·w) per
batch (O(B·M) more on the fused path), independent of the dataset size.

Distributed (``torch.distributed`` initialised): each rank pushes over its shard and the per-rank results are
merged with ``all_gather`` of (distance, global image index, position, patch): per prototype the minimum distance
wins, then the lowest global image index. The global index of an image is its index into the dataset as given
by the loader's sampler when ``loader.sampler`` is a ``torch.utils.data.DistributedSampler`` (the list
``list(iter(loader.sampler))`` is read once before the pass; with ``shuffle=False`` it is deterministic and the
merged result equals a single-process push over the dataset in order). Without a DistributedSampler every rank
is assumed to see the whole dataset in the same order and the index is the position in loader order.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["PushResult", "push_prototypes"]


@dataclasses.dataclass
class PushResult:
    """What :func:`push_prototypes` found, per prototype m (all tensors on the CPU).

    Attributes:
        image_index: ``[M]`` int64, global index of the image the new prototype comes from (loader order, or the
            dataset index under a DistributedSampler); −1 when the prototype was never updated (unseen class).
        position: ``[M, 2]`` int64, ``(i, j)`` of the patch's top-left corner in the distance map (−1, −1 if unseen).
        distance: ``[M]`` float64, the squared L2 distance between the *old* prototype and the chosen patch
            (+inf if unseen).
        prototype_class: ``[M]`` int64, k(m) = first-occurrence argmax of ``prototype_class_identity[m]``
            (−1 with ``class_specific=False`` when the model has no identity).
        feature_size: ``(H, W)`` of the feature map the push ran on.
        prototype_size: ``(h, w)`` of the prototypes.
        host_maps: with ``return_host_maps=True``, one ``(features, distances)`` numpy pair per batch, as the
            original copies them to the host: ``[B, D, H, W]`` and ``[B, M, H', W']`` (old prototypes).
    """

    image_index: Tensor
    position: Tensor
    distance: Tensor
    prototype_class: Tensor
    feature_size: Tuple[int, int]
    prototype_size: Tuple[int, int]
    host_maps: Optional[List[tuple]] = None

    @property
    def found(self) -> Tensor:
        """``[M]`` bool: the prototype was projected onto a patch."""
        return self.image_index >= 0

    def receptive_field_boxes(self, image_size, feature_size=None, rf_info=None) -> Tensor:
        """Boxes ``[M, 4]`` int64 ``(y0, y1, x0, x1)`` (end exclusive) in input pixels; −1 rows where unseen.

        Default (``rf_info=None``): proportional mapping. With the feature map ``H×W`` and the image
        ``H_img×W_img``, the patch rows ``i .. i + h`` map to ``floor(i·H_img/H) .. ceil((i + h)·H_img/H)``
        (columns alike). This is the receptive field of an idealised backbone whose feature cells tile the image;
        real CNN receptive fields are larger.

        ``rf_info = (n, j, r, start)`` (cfchen-duke's ``proto_layer_rf_info``): the original's
        ``compute_rf_protoL_at_spatial_location``: centre ``start + i·j``, box ``[max(int(c − r/2), 0),
        min(int(c + r/2), size))`` per axis, from the top-left position only (as the original, also for h×w > 1).

        Args:
            image_size: ``int`` (square) or ``(H_img, W_img)``.
            feature_size: ``(H, W)``; defaults to the size recorded during the push.
        """
        img_h, img_w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        feat_h, feat_w = feature_size if feature_size is not None else self.feature_size
        out = torch.full((len(self.image_index), 4), -1, dtype=torch.long)
        for m in torch.nonzero(self.found).flatten().tolist():
            i, j = (int(v) for v in self.position[m])
            if rf_info is not None:
                _, step, r, start = rf_info
                ch, cw = start + i * step, start + j * step
                out[m] = torch.tensor([max(int(ch - r / 2), 0), min(int(ch + r / 2), img_h),
                                       max(int(cw - r / 2), 0), min(int(cw + r / 2), img_w)])
            else:
                h, w = self.prototype_size
                out[m] = torch.tensor([(i * img_h) // feat_h, -((-(i + h) * img_h) // feat_h),
                                       (j * img_w) // feat_w, -((-(j + w) * img_w) // feat_w)])
        return out


# ------------------------------------------------------------------------------------------------ helpers
def _unwrap(model):
    """The module holding the prototype layer (``nn.DataParallel`` / DDP wrappers are unwrapped)."""
    while not hasattr(model, "prototype_vectors") and hasattr(model, "module"):
        model = model.module
    return model


def _check_model(net, class_specific: bool) -> None:
    needed = ["conv_features", "prototype_vectors"] + (["prototype_class_identity"] if class_specific else [])
    missing = [a for a in needed if not hasattr(net, a)]
    if missing:
        raise AttributeError(
            f"push_prototypes needs a model with conv_features(x) -> [B, D, H, W], prototype_vectors [M, D, h, w] "
            f"and prototype_class_identity [M, K]; {type(net).__name__} has no {', '.join(missing)}")
    p = net.prototype_vectors
    if not isinstance(p, Tensor) or p.dim() != 4:
        raise ValueError(f"model.prototype_vectors must be a [M, D, h, w] tensor, got "
                         f"{getattr(p, 'shape', type(p).__name__)}")
    if class_specific:
        identity = net.prototype_class_identity
        if not isinstance(identity, Tensor) or identity.dim() != 2 or identity.shape[0] != p.shape[0]:
            raise ValueError(f"model.prototype_class_identity must be [M, K] with M = {p.shape[0]}, got "
                             f"{getattr(identity, 'shape', type(identity).__name__)}")


def _global_indices(loader) -> Optional[List[int]]:
    """Dataset indices of the images in the order this rank sees them, when the loader shards with a
    DistributedSampler; None otherwise (then the position in loader order is used)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        return list(iter(sampler))
    return None


def _check_batch(images, labels, K: int, multilabel: bool, class_specific: bool, t: int):
    if not isinstance(images, Tensor):
        raise TypeError(f"the loader must yield (images, labels) tensors; batch {t} has images of type "
                        f"{type(images).__name__}")
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    B = images.shape[0]
    if multilabel:
        if labels.dim() != 2 or labels.shape[0] != B or (K and labels.shape[1] != K):
            raise ValueError(f"multilabel=True needs [B, K] = [{B}, {K}] multi-hot labels; batch {t} has labels of "
                             f"shape {tuple(labels.shape)}")
    else:
        if labels.dim() != 1 or labels.shape[0] != B:
            raise ValueError(f"labels must be [B] class indices with B = {B} (the batch size of the images; use "
                             f"multilabel=True for [B, K] targets); batch {t} has labels of shape "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integer class indices; batch {t} has dtype {labels.dtype}")
        if class_specific and B and (int(labels.min()) < 0 or int(labels.max()) >= K):
            raise ValueError(f"labels must lie in [0, {K}) (K = prototype_class_identity.shape[1]); batch {t} has "
                             f"labels in [{int(labels.min())}, {int(labels.max())}]")
    return labels


def _class_table(cls: Tensor, K: int, M: int, device) -> Tensor:
    """table [K, c] int64: the prototypes m with k(m) = k in increasing m, padded with M (c = largest class)."""
    counts = torch.bincount(cls, minlength=K)
    c = max(int(counts.max()), 1)
    table = torch.full((K, c), M, dtype=torch.long)
    order = torch.argsort(cls, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(M) - starts[cls[order]]
    table[cls[order], slot] = order
    return table.to(device)


def _batch_winners(x: Tensor, P: Tensor, Pf: Tensor, Q: Tensor, labels: Tensor, cls: Tensor,
                   table: Optional[Tensor], class_specific: bool, multilabel: bool):
    """The batch's best candidate patch of every prototype.

    Returns ``(v [M], b [M], pos [M], has [M])``: v[m] = min over (candidate image b, position n) of d[b, m, n]
    with (b, n) its first occurrence (earliest candidate image in batch order, then earliest flat position), and
    has[m] = m has at least one candidate in the batch (v = +inf, b = 0 otherwise). ``Pf [M + 1, D·h·w]`` are the
    flattened prototypes with a zero padding row, ``Q [M + 1]`` their squared norms (computed once per push).

    Candidates (image b searched for prototype m): label of b = k(m); multi-label: target[b, k(m)] ≠ 0; every
    image with ``class_specific=False``. With c = the largest number of candidate prototypes of one image:

    * c ≤ M/4 (the class-specific push: c = prototypes per class): per image, its candidate prototypes (increasing
      m, padded to c) are gathered and d[b, ·, n] = relu(S[b, n] − 2·G[b, ·, n] + Q[·]) is formed by one batched
      GEMM ``[B, c, D·h·w] @ [B, D·h·w, H'·W']``: B·c·H'·W' entries instead of B·M·H'·W'. The per-prototype
      reduction over the batch is a ``scatter_reduce`` over the (b, slot) pairs;
    * otherwise the fused :func:`protofast.prototype_min_distances` over all B×M pairs, masked to +inf, then
      ``torch.min`` over the batch dimension (first occurrence).

    Both use the expanded form of SEMANTICS §1.2; nothing of size B×M×H'×W' is formed.
    """
    from ._layout import as_patch_sets
    from .ops.distances import prototype_min_distances

    B, M = x.shape[0], P.shape[0]
    inf = float("inf")
    idx = None
    candidate = None
    if class_specific and not multilabel:
        idx = table[labels]                                                              # [B, c], M = padding
    elif class_specific:
        candidate = labels.ne(0)[:, cls]                                                 # [B, M]
        counts = candidate.sum(1)
        c = max(int(counts.max()), 1)
        if 4 * c <= M:
            order = torch.sort((~candidate).to(torch.uint8), dim=1, stable=True).indices[:, :c]
            valid = torch.arange(c, device=x.device)[None, :] < counts[:, None]
            idx = torch.where(valid, order, torch.full_like(order, M))
    if idx is None:                                                                      # all B×M pairs, fused
        values, argmin = prototype_min_distances(x, P)
        if bool(torch.isnan(values).any()):
            raise ValueError("NaN distance: the features (or prototypes) contain NaN")
        if candidate is not None:
            values = values.masked_fill(~candidate, inf)
            has = candidate.any(0)
        else:
            has = torch.ones(M, dtype=torch.bool, device=x.device)
        v, b = values.min(dim=0)
        return v, b, argmin.gather(0, b[None]).squeeze(0), has

    c = idx.shape[1]
    valid = idx < M
    X, _, _ = as_patch_sets(x, P, channels_first=True)                                   # X [B, Dhw, N]
    S = (X * X).sum(1)                                                                   # [B, N]
    G = torch.bmm(Pf[idx], X)                                                            # [B, c, N]
    d = torch.clamp_min(S[:, None, :] - 2 * G + Q[idx][:, :, None], 0)
    vmin, amin = torch.min(d, dim=2)                                                     # [B, c], first occurrence
    if bool(torch.isnan(vmin).any()):
        raise ValueError("NaN distance: the features (or prototypes) contain NaN")
    vmin = vmin.masked_fill(~valid, inf)
    flat_idx = idx.flatten()
    v = torch.full((M + 1,), inf, dtype=vmin.dtype, device=x.device)
    v = v.scatter_reduce(0, flat_idx, vmin.flatten(), "amin")
    # first (b, slot) pair attaining v[m]; pairs are numbered b·c + slot, so the smallest number = earliest image
    big = B * c
    pair = torch.arange(big, device=x.device).view(B, c)
    key = torch.where(valid & (vmin == v[idx]), pair, torch.full_like(pair, big))
    first = torch.full((M + 1,), big, dtype=torch.long, device=x.device)
    first = first.scatter_reduce(0, flat_idx, key.flatten(), "amin")[:M]
    has = first < big
    first = torch.where(has, first, torch.zeros_like(first))
    return v[:M], first // c, amin.flatten()[first], has


_SMALL_WORK = 1 << 24   # multiply-adds per batch below which the CPU search runs on one thread


class _cpu_threads:
    """Context manager: ``torch.set_num_threads(n)`` inside (CPU tensors only; ``n=None``: unchanged).

    The per-batch candidate search of a class-specific push is tiny (B·c·H'·W'·D multiply-adds, 4.7·10⁶ at
    ProtoPNet's defaults) but made of a dozen ops; on the CPU each parallel region costs more than it saves there,
    and on a busy machine every region waits for a descheduled worker thread (measured: 35 ms for the whole
    2000-image push on one thread against 2.3 s on two threads with the second core busy)."""

    def __init__(self, device, n):
        self.n = n if device.type == "cpu" else None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            if self.old != self.n:
                torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n is not None and self.old != self.n:
            torch.set_num_threads(self.old)
        return False


def _gather_patches(x: Tensor, b: Tensor, i: Tensor, j: Tensor, h: int, w: int, stride: int) -> Tensor:
    """x[b[u], :, i[u]·s : i[u]·s + h, j[u]·s : j[u]·s + w] for every u → [U, D, h, w]."""
    rows = (i * stride)[:, None] + torch.arange(h, device=x.device)[None, :]          # [U, h]
    cols = (j * stride)[:, None] + torch.arange(w, device=x.device)[None, :]          # [U, w]
    patches = x[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]               # [U, h, w, D]
    return patches.permute(0, 3, 1, 2)


def _merge_distributed(best: Tensor, index: Tensor, pos: Tensor, patches: Tensor):
    """all_gather the per-rank results; per prototype: min distance, then lowest global index."""
    import torch.distributed as dist

    world = dist.get_world_size()
    gathered = []
    for t in (best, index, pos, patches):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        gathered.append(torch.stack(parts))                       # [R, M, ...]
    d_all, i_all, p_all, x_all = gathered
    # lexicographic (distance, index) minimum over ranks; unseen entries have +inf and a huge index
    big = torch.iinfo(torch.long).max
    key_index = torch.where(i_all >= 0, i_all, torch.full_like(i_all, big))
    d_min = d_all.min(0).values
    tied = d_all == d_min[None]
    key_index = torch.where(tied, key_index, torch.full_like(key_index, big))
    winner = key_index.argmin(0)                                   # [M]
    ar = torch.arange(best.shape[0], device=best.device)
    return d_all[winner, ar], i_all[winner, ar], p_all[winner, ar], x_all[winner, ar]


# ------------------------------------------------------------------------------------------------ push
def push_prototypes(model, loader, *, class_specific: bool = True, unseen: str = "zero",
                    reset_per_batch: bool = False, multilabel: bool = False, progress: bool = True,
                    device=None, return_host_maps: bool = False, preprocess: Optional[Callable] = None,
                    prototype_layer_stride: int = 1) -> PushResult:
    """Project every prototype onto its nearest training patch (ProtoPNet's push), in place.

    Args:
        model: a module with ``conv_features(images) -> x [B, D, H, W]``, ``prototype_vectors`` (Parameter
            ``[M, D, h, w]``) and ``prototype_class_identity`` (``[M, K]`` 0/1): :class:`protofast.models.ProtoPNet`
            and cfchen-duke's ``PPNet`` (DataParallel/DDP wrappers are unwrapped). It runs in eval mode under
            ``no_grad``; its training mode is restored afterwards.
        loader: iterable of ``(images, labels)``; labels ``[B]`` int class indices, or ``[B, K]`` multi-hot with
            ``multilabel=True``. Use the unaugmented train set with ``shuffle=False`` (ties go to the earliest image
            in loader order).
        class_specific: search only the images of the prototype's class (the original default); False: all images.
        unseen: ``"zero"`` (original: a prototype whose class never appears becomes zero) or ``"keep"``.
        reset_per_batch: quanproto's quirk (best distance reset each batch: the last batch with the class wins).
        multilabel: labels are ``[B, K]`` multi-hot; an image is a candidate for every positive class.
        progress: tqdm progress bar over the batches.
        device: where to run; default the device of ``model.prototype_vectors``.
        return_host_maps: also keep, per batch, numpy copies of the features ``[B, D, H, W]`` and of the full
            distance maps ``[B, M, H', W']`` (old prototypes) like the original's ``push_forward`` copies, for old
            tooling. Memory heavy: 4·N·M·H'·W' bytes for N images (≈ 400 MB for 1000 images at ProtoPNet's defaults).
        preprocess: optional callable applied to each image batch before ``conv_features`` (e.g. normalisation,
            the original's ``preprocess_input_function``).
        prototype_layer_stride: s in the patch window ``i·s : i·s + h`` (the original's argument; 1 for ProtoPNet).

    Returns:
        :class:`PushResult` with, per prototype, the global image index, the position (i, j), the distance and
        the class. ``model.prototype_vectors`` is overwritten in place (dtype and device preserved).

    Raises:
        AttributeError: the model lacks one of the attributes above (named).
        ValueError / TypeError: the loader yields wrong shapes or dtypes, labels out of ``[0, K)``, NaN distances,
            an unknown ``unseen``, or ``reset_per_batch`` under torch.distributed.
    """
    if unseen not in ("zero", "keep"):
        raise ValueError(f"unseen must be 'zero' or 'keep', got {unseen!r}")
    if isinstance(prototype_layer_stride, bool) or not isinstance(prototype_layer_stride, int) \
            or prototype_layer_stride < 1:
        raise ValueError(f"prototype_layer_stride must be a positive int, got {prototype_layer_stride!r}")
    if multilabel and not class_specific:
        raise ValueError("multilabel=True only changes the class-specific search; use class_specific=True")
    net = _unwrap(model)
    _check_model(net, class_specific)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and reset_per_batch:
        raise ValueError("reset_per_batch=True ('last batch wins') is not defined for a sharded push")

    proto_param = net.prototype_vectors
    device = torch.device(device) if device is not None else proto_param.device
    P = proto_param.detach().to(device)
    M, D, h, w = P.shape
    has_identity = hasattr(net, "prototype_class_identity") and isinstance(net.prototype_class_identity, Tensor) \
        and net.prototype_class_identity.dim() == 2 and net.prototype_class_identity.shape[0] == M
    if has_identity:
        # k(m) = first-occurrence argmax of I[m, :] (torch.argmax, as the original)
        cls = torch.argmax(net.prototype_class_identity.detach().to("cpu", torch.float64), dim=1)
        K = net.prototype_class_identity.shape[1]
    else:
        cls, K = torch.full((M,), -1, dtype=torch.long), 0
    cls_dev = cls.to(device)
    table = _class_table(cls, K, M, device) if has_identity and class_specific and not multilabel else None

    Pf = torch.cat([P.reshape(M, -1), P.new_zeros(1, D * h * w)])                      # row M: padding
    Q = (Pf * Pf).sum(1)
    global_indices = _global_indices(loader) if distributed else None
    c_max = int(table.shape[1]) if table is not None else M

    def small_batch_work(x):
        return table is not None and x.shape[0] * c_max * x.shape[2] * x.shape[3] * D * h * w < _SMALL_WORK
    best_dtype = torch.float64 if P.dtype == torch.float64 else torch.float32
    best = torch.full((M,), float("inf"), dtype=best_dtype, device=device)
    best_index = torch.full((M,), -1, dtype=torch.long, device=device)
    best_pos = torch.full((M, 2), -1, dtype=torch.long, device=device)
    patches = torch.zeros(M, D, h, w, dtype=P.dtype, device=device)
    host_maps = [] if return_host_maps else None
    feature_size = None

    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="push", unit="batch", leave=False)

    was_training = net.training
    net.eval()
    seen = 0
    try:
        with torch.no_grad():
            for t, batch in enumerate(iterator):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError(f"the loader must yield (images, labels); batch {t} is a "
                                     f"{type(batch).__name__}")
                images, labels = batch[0], batch[1]
                labels = _check_batch(images, labels, K, multilabel, class_specific, t)
                B = images.shape[0]
                if B == 0:
                    continue
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if preprocess is not None:
                    images = preprocess(images)
                x = net.conv_features(images)
                if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] != B or x.shape[1] != D:
                    raise ValueError(f"conv_features must return [B, D, H, W] = [{B}, {D}, H, W] features; batch {t} "
                                     f"gave {getattr(x, 'shape', type(x).__name__)}")
                if x.shape[2] < h or x.shape[3] < w:
                    raise ValueError(f"feature map {tuple(x.shape[2:])} is smaller than the prototypes' {h}×{w}")
                x = x.to(P.dtype)
                feature_size = (x.shape[2], x.shape[3])
                Wd = x.shape[3] - w + 1
                if prototype_layer_stride != 1 and ((x.shape[2] - h) * prototype_layer_stride + h > x.shape[2]
                                                    or (Wd - 1) * prototype_layer_stride + w > x.shape[3]):
                    raise ValueError(f"prototype_layer_stride={prototype_layer_stride} puts patch windows outside the "
                                     f"{x.shape[2]}×{x.shape[3]} feature map")
                if return_host_maps:
                    from .ops.distances import prototype_distance_maps

                    host_maps.append((x.cpu().numpy().copy(), prototype_distance_maps(x, P).cpu().numpy().copy()))

                with _cpu_threads(x.device, 1 if small_batch_work(x) else None):  # search + update
                    v, b_star, flat, has = _batch_winners(x, P, Pf, Q, labels, cls_dev, table, class_specific,
                                                          multilabel)
                    # strict "<" against the running best (against +inf with quanproto's per-batch reset)
                    threshold = torch.full_like(best, float("inf")) if reset_per_batch else best
                    update = has & (v.to(best_dtype) < threshold)
                    upd = torch.nonzero(update).flatten()
                    if upd.numel():
                        bu, fu = b_star[upd], flat[upd]
                        iu, ju = fu // Wd, fu % Wd
                        patches[upd] = _gather_patches(x, bu, iu, ju, h, w, prototype_layer_stride)
                        best[upd] = v[upd].to(best_dtype)
                        if global_indices is not None:
                            gi = torch.tensor(global_indices[seen:seen + B], dtype=torch.long, device=device)
                            best_index[upd] = gi[bu]
                        else:
                            best_index[upd] = seen + bu
                        best_pos[upd, 0], best_pos[upd, 1] = iu, ju
                seen += B
    finally:
        net.train(was_training)

    if distributed:
        best, best_index, best_pos, patches = _merge_distributed(best, best_index, best_pos, patches)

    found = best_index >= 0
    with torch.no_grad():
        new = patches if unseen == "zero" else torch.where(found[:, None, None, None], patches, P)
        proto_param.copy_(new.to(device=proto_param.device, dtype=proto_param.dtype))
    return PushResult(
        image_index=best_index.cpu(), position=best_pos.cpu(), distance=best.double().cpu(),
        prototype_class=cls.cpu(), feature_size=feature_size if feature_size is not None else (0, 0),
        prototype_size=(h, w), host_maps=host_maps)

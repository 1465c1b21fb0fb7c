"""Interpretability metrics of prototype models against ground-truth parts.

Part purity (the "does this prototype look at one part?" metric of the ProtoPNet literature): for prototype m of
class c, take its k nearest patches among the training images of class c, map each patch's feature cells to a
pixel box, and ask which annotated part that box covers most. With ``part(m, t)`` the part under the t-th nearest
patch (−1 when the box touches no part),

    purity[m] = max_p  |{t < k : part(m, t) = p}| / k        (p over real parts, not −1)

so 1 means all k nearest patches lie on the same part, and a prototype that looks at background scores 0.
``on_class_part[m]`` is the fraction of the k patches that lie on one of class c's own parts (not a distractor).

The nearest patches are found with the streamed distance maps (``protofast.prototype_distance_maps`` per batch,
a running top-k per prototype): memory is O(M·(k + B·H'·W')), never the dataset's maps. Ties go to the earliest
image, then the earliest position, as in push.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["PurityResult", "part_purity"]


@dataclass
class PurityResult:
    """``purity [M]`` and ``on_class_part [M]`` in [0, 1]; ``part [M]`` the majority part id (−1: none);
    ``image_index [M, k]``, ``position [M, k, 2]`` (top-left cell (i, j)) and ``distance [M, k]`` of the k nearest
    patches (image −1 where the class has fewer than k patches); ``k``."""

    purity: Tensor
    on_class_part: Tensor
    part: Tensor
    image_index: Tensor
    position: Tensor
    distance: Tensor
    k: int

    @property
    def mean_purity(self) -> float:
        return float(self.purity.mean())


def _cell_box(i: int, j: int, h: int, w: int, H: int, W: int, S_h: int, S_w: int):
    """Feature cells [i, i+h) × [j, j+w) of an H×W map → pixel box (top, left, bottom, right) of an S_h×S_w image
    (proportional mapping, bottom/right exclusive)."""
    return (math.floor(i * S_h / H), math.floor(j * S_w / W), math.ceil((i + h) * S_h / H),
            math.ceil((j + w) * S_w / W))


def _covered_part(box, parts: Tensor) -> int:
    """The part id whose box overlaps ``box`` the most (−1 if none). ``parts`` [n, 5] (part, top, left, bottom,
    right)."""
    best, best_area = -1, 0
    for p, t, lft, b, r in parts.tolist():
        area = max(0, min(box[2], b) - max(box[0], t)) * max(0, min(box[3], r) - max(box[1], lft))
        if area > best_area:
            best, best_area = p, area
    return best


@torch.no_grad()
def part_purity(model, dataset, k: int = 10, batch_size: int = 64, device=None) -> PurityResult:
    """Part purity of every prototype of ``model`` on ``dataset`` (see the module docstring).

    Args:
        model: a ProtoPNet-like module with ``conv_features``, ``prototype_vectors`` [M, D, h, w] and
            ``prototype_class_identity`` [M, K] (``protofast.models.ProtoPNet``, a patched cfchen-duke PPNet).
        dataset: yields ``(image [C, S, S], label)`` and has ``part_locations(i) -> [n, 5]`` (part, top, left,
            bottom, right) and ``num_parts`` (ids ≥ num_parts are distractors), e.g. ``protofast.data.SyntheticParts``.
        k: nearest patches per prototype (≥ 1).
    """
    import protofast

    if not hasattr(dataset, "part_locations"):
        raise TypeError(f"dataset must provide part_locations(i) (e.g. protofast.data.SyntheticParts), got "
                        f"{type(dataset).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    net = model.module if hasattr(model, "module") else model
    device = device or next(net.parameters()).device
    identity = net.prototype_class_identity.to(device)
    cls = identity.argmax(1)                                                        # [M] first occurrence
    M = cls.numel()
    h, w = net.prototype_vectors.shape[2:]
    best_v = torch.full((M, 0), math.inf, dtype=torch.float64, device=device)
    best_i = torch.zeros((M, 0), dtype=torch.long, device=device)
    was_training = net.training
    net.eval()
    seen, map_shape, image_shape = 0, None, None
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            z = net.conv_features(x.to(device))
            maps = protofast.prototype_distance_maps(z, net.prototype_vectors)     # [B, M, H', W']
            B, _, Hp, Wp = maps.shape
            map_shape, image_shape = (Hp, Wp, z.shape[2], z.shape[3]), x.shape[2:]
            own = y.to(device)[:, None] == cls[None, :]                              # [B, M]
            d = maps.double().masked_fill(~own[:, :, None, None], math.inf)
            d = d.permute(1, 0, 2, 3).reshape(M, B * Hp * Wp)                        # flat index (image, i, j)
            flat = seen * Hp * Wp + torch.arange(B * Hp * Wp, device=device)
            # earlier candidates first, so a stable sort keeps the earliest image / position among equal values
            vals = torch.cat([best_v, d], 1)
            idx = torch.cat([best_i, flat.expand(M, -1)], 1)
            order = torch.sort(vals, dim=1, stable=True).indices[:, :k]
            best_v, best_i = vals.gather(1, order), idx.gather(1, order)
            seen += B
    finally:
        net.train(was_training)
    if map_shape is None:
        raise ValueError("dataset is empty")
    Hp, Wp, H, W = map_shape
    valid = torch.isfinite(best_v)
    image_index = torch.where(valid, best_i // (Hp * Wp), -1).cpu()
    pos = best_i % (Hp * Wp)
    position = torch.stack([pos // Wp, pos % Wp], -1).cpu()
    purity, on_class, majority = torch.zeros(M), torch.zeros(M), torch.full((M,), -1, dtype=torch.long)
    class_parts = getattr(dataset, "class_parts", None)
    num_parts = getattr(dataset, "num_parts", None)
    for m in range(M):
        hits = []
        for t in range(best_v.shape[1]):
            n = int(image_index[m, t])
            if n < 0:
                continue
            i, j = position[m, t].tolist()
            box = _cell_box(i, j, h, w, H, W, *image_shape)
            hits.append(_covered_part(box, dataset.part_locations(n)))
        real = [p for p in hits if p >= 0]
        if real:
            counts = torch.bincount(torch.tensor(real))
            majority[m] = int(counts.argmax())
            purity[m] = float(counts.max()) / k
        if class_parts is not None:
            own_parts = {p for p, _ in class_parts[int(cls[m])]}
            on_class[m] = sum(p in own_parts for p in real) / k
        elif num_parts is not None:
            on_class[m] = sum(p < num_parts for p in real) / k
    return PurityResult(purity, on_class, majority, image_index, position, best_v.cpu(), k)

"""ProtoMask's views: each segmentation mask's bounding-box crop of the masked image, resized (SEMANTICS.md §3.3).

For images ``x [B, C, H, W]`` and masks ``m [B, V, H, W]`` (bool or 0/1), view (b, v) is

    1. the masked image  ``y = x[b]·f + fill·(1 − f)`` with the foreground ``f`` (below) and the fill rule:
       ``"zero"`` (quanproto's default): fill = 0;  ``"mean"``: fill = the mean colour of ``x[b]`` over ``f``;
       ``"original"``: fill = ``x[b]`` itself (the view is a crop of the unmasked image);
    2. cropped to the mask's bounding box ``[y0, y1] × [x0, x1]`` (inclusive, from ``m[b, v]``, not from ``f``);
    3. resized to ``size = (S_h, S_w)`` by bilinear interpolation with half-pixel centres and no antialiasing,
       i.e. ``F.interpolate(crop, size, mode="bilinear", align_corners=False)`` (albumentations' / OpenCV's
       ``INTER_LINEAR`` resize, which quanproto applies after its crop).

The foreground (``foreground="nonzero"``, quanproto's rule) is ``m[b, v] ∧ (Σ_c x[b, c] ≠ 0)``: quanproto stores
the masked image and then treats every pixel with a zero RGB sum as background, so a pure-black pixel inside the
mask is filled too; ``foreground="mask"`` uses ``m[b, v]`` alone. The two differ only for ``fill="mean"`` (and
only where the image is exactly 0 inside the mask). quanproto computes the mean colour on uint8 images and
truncates it to an integer; on float images protofast uses the exact mean.

How the crop + resize is computed for all B·V views at once (no Python loop per mask): the bounding boxes come
from ``any`` reductions of the masks over rows and columns; a batched affine sampling grid (the grid
``F.affine_grid(θ, align_corners=False)`` gives, built from its two per-view 1-D axes because θ is diagonal:
forming it through ``F.affine_grid`` and clamping the [B·V, S_h, S_w, 2] tensor cost 3× the sampling itself at
224², measured) maps each output pixel centre to ``y0 + (o + ½)·h/S_h − ½`` in input pixels
(``h = y1 − y0 + 1``; columns alike), the grid is clamped to the crop's first and last pixel centres ``[y0, y1]`` (the clamp ``F.interpolate`` applies to
its source index inside the crop: negative indices → 0, neighbours past the last row → the last row), and one
``F.grid_sample`` (bilinear, ``align_corners=False``, border padding) samples the masked images. In real
arithmetic this equals the per-mask ``F.interpolate`` of the sliced crop exactly: the same source coordinate,
the same two neighbours inside the crop, the same weights. In floating point the grid's normalised coordinates
round (relative 2⁻²⁴ in float32), so a sample can move by ~W·2⁻²⁴ pixels: values agree to ~1e-6 of the pixel
range in float32 and ~1e-14 in float64 (tests pin both), and a sample clamped to the last row may give a weight of
that order to the pixel just outside the crop.

Order of operations as quanproto: mask and fill on the *unnormalised* image, crop, resize, then normalise the
views (``(views − mean)/std``); passing normalised images changes what the zero fill and the non-zero
foreground rule mean. The crop is the mask's tight bounding box (quanproto reads stored boxes, SAM2's, which
are the masks' tight boxes; its ``RandomCropNearBBox(max_part_shift=0)`` slices the same pixels).

Empty masks (no pixel set) give an all-zero view and ``valid[b, v] = False``; feed ``valid`` to
:class:`protofast.models.ProtoMask` (``view_valid``) to exclude them. Gradients flow to ``images`` (through the
masking, the mean colour and the bilinear weights); masks are data.

Memory: the masked images ``[B·V, C, H, W]`` are formed once (the per-mask loop forms the same, one at a time);
``fill="original"`` samples the ``[B, C, H, W]`` images directly with a ``[B, V·S_h, S_w]`` grid and forms no
per-view copy.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mask_views", "mask_bounding_boxes"]

FILLS = ("zero", "mean", "original")
FOREGROUNDS = ("nonzero", "mask")


def _check_size(size) -> Tuple[int, int]:
    if isinstance(size, bool):
        raise TypeError(f"size must be an int or a pair of ints, got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(size, (tuple, list)) or len(size) != 2 or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in size):
        raise TypeError(f"size must be an int or a pair of ints (S_h, S_w), got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


def check_views_inputs(images, masks, size, fill: str, foreground: str) -> Tuple[int, int]:
    """Shape / dtype / option checks shared by :func:`mask_views` and the reference; returns ``(S_h, S_w)``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got dtype {images.dtype}")
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.is_complex():
        raise TypeError(f"masks must be bool or real 0/1, got dtype {masks.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if masks.dim() != 4:
        raise ValueError(f"masks must be [B, V, H, W], got shape {tuple(masks.shape)}")
    B, C, H, W = images.shape
    if masks.shape[0] != B or tuple(masks.shape[2:]) != (H, W):
        raise ValueError(f"masks [B, V, H, W] must match images [B, C, H, W] = {tuple(images.shape)} in B, H and W, "
                         f"got shape {tuple(masks.shape)}")
    if B == 0 or C == 0 or H == 0 or W == 0 or masks.shape[1] == 0:
        raise ValueError(f"images {tuple(images.shape)} and masks {tuple(masks.shape)} must be non-empty "
                         "(B, C, V, H, W >= 1)")
    if masks.device != images.device:
        raise ValueError(f"masks and images must be on the same device, got {masks.device} and {images.device}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if foreground not in FOREGROUNDS:
        raise ValueError(f"foreground must be one of {FOREGROUNDS}, got {foreground!r}")
    S = _check_size(size)
    if masks.dtype != torch.bool and bool(((masks != 0) & (masks != 1)).any()):
        raise ValueError("masks must be boolean or hold only 0 and 1")
    return S


def mask_bounding_boxes(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """Bounding boxes of ``masks [B, V, H, W]`` by reductions: ``(boxes [B, V, 4] int64 (y0, y1, x0, x1)``
    inclusive, ``valid [B, V] bool)``. Empty masks get ``(0, H − 1, 0, W − 1)`` and ``valid = False``."""
    m = masks.bool()
    H, W = m.shape[-2:]
    rows, cols = m.any(-1), m.any(-2)                                  # [B, V, H], [B, V, W]
    valid = rows.any(-1)
    ar_h = torch.arange(H, device=m.device)
    ar_w = torch.arange(W, device=m.device)
    y0 = torch.where(rows, ar_h, H).amin(-1)
    y1 = torch.where(rows, ar_h, -1).amax(-1)
    x0 = torch.where(cols, ar_w, W).amin(-1)
    x1 = torch.where(cols, ar_w, -1).amax(-1)
    boxes = torch.stack([y0, y1, x0, x1], -1)
    empty = torch.tensor([0, H - 1, 0, W - 1], device=m.device)
    return torch.where(valid[..., None], boxes, empty), valid


def foreground_mask(images: Tensor, masks: Tensor, foreground: str) -> Tensor:
    """``[B, V, H, W]`` bool: the mask, and with ``"nonzero"`` also a non-zero channel sum of the image."""
    fg = masks.bool()
    if foreground == "nonzero":
        fg = fg & (images.sum(1) != 0)[:, None]
    return fg


def _axis(lo: Tensor, hi: Tensor, size: int, n_out: int) -> Tensor:
    """Normalised sampling coordinates ``[N, n_out]`` (float64) of one axis of the crop-and-resize of the pixel
    range ``[lo, hi]`` (inclusive) of an axis of length ``size``: the affine map of ``F.affine_grid`` with
    ``align_corners=False`` (output ``u = (2o + 1)/n_out − 1`` ↦ ``(2·lo + n·(u + 1))/size − 1``, n = hi − lo + 1,
    i.e. input pixel ``lo + (o + ½)·n/n_out − ½``), clamped to the normalised centres of pixels lo and hi."""
    lo, hi = lo.to(torch.float64)[:, None], hi.to(torch.float64)[:, None]
    n = hi - lo + 1
    u = (2 * torch.arange(n_out, dtype=torch.float64, device=lo.device) + 1) / n_out - 1
    coord = (2 * lo + n * (u[None, :] + 1)) / size - 1
    return torch.minimum(torch.maximum(coord, (2 * lo + 1) / size - 1), (2 * hi + 1) / size - 1)


def _sampling_grid(boxes: Tensor, H: int, W: int, S: Tuple[int, int], dtype) -> Tensor:
    """``[N, S_h, S_w, 2]`` normalised (x, y) sampling grid of the crop-and-resize of each box (N = B·V).

    The affine map is diagonal (scale + shift per axis), so the grid is the outer combination of two per-view
    1-D coordinate vectors (``_axis``), computed in float64 and cast once; this is the grid
    ``F.affine_grid(θ, align_corners=False)`` gives for ``θ = [[w/W, 0, (2·x0 + w)/W − 1], [0, h/H, (2·y0 + h)/H − 1]]``
    followed by the clamp, without forming a float64 ``[N, S_h, S_w, 2]`` tensor (tests pin the equality)."""
    b = boxes.reshape(-1, 4)
    N = b.shape[0]
    ys = _axis(b[:, 0], b[:, 1], H, S[0]).to(dtype)                                 # [N, S_h]
    xs = _axis(b[:, 2], b[:, 3], W, S[1]).to(dtype)                                 # [N, S_w]
    return torch.stack([xs[:, None, :].expand(N, S[0], S[1]), ys[:, :, None].expand(N, S[0], S[1])], dim=-1)


def affine_sampling_grid(boxes: Tensor, H: int, W: int, S: Tuple[int, int]) -> Tensor:
    """The same grid through ``F.affine_grid`` + clamp, in float64 (kept to pin the equality in the tests)."""
    b = boxes.reshape(-1, 4).to(torch.float64)
    y0, y1, x0, x1 = b.unbind(-1)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    theta = torch.zeros(b.shape[0], 2, 3, dtype=torch.float64, device=boxes.device)
    theta[:, 0, 0], theta[:, 0, 2] = w / W, (2 * x0 + w) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / H, (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, [b.shape[0], 1, S[0], S[1]], align_corners=False)
    lo = torch.stack([(2 * x0 + 1) / W - 1, (2 * y0 + 1) / H - 1], -1)[:, None, None, :]
    hi = torch.stack([(2 * x1 + 1) / W - 1, (2 * y1 + 1) / H - 1], -1)[:, None, None, :]
    return torch.maximum(torch.minimum(grid, hi), lo)


def mask_views(images: Tensor, masks: Tensor, size: Union[int, Tuple[int, int]], fill: str = "zero",
               foreground: str = "nonzero") -> Tuple[Tensor, Tensor]:
    """ProtoMask's mask crops of every image, vectorised over all B·V masks (see the module docstring).

    Args:
        images: ``[B, C, H, W]`` floating point (C = 3 for RGB).
        masks: ``[B, V, H, W]`` bool or 0/1 (any real dtype): V segmentation masks per image, in stored order.
        size: ``S`` or ``(S_h, S_w)``, the view size (quanproto: 224).
        fill: background rule: ``"zero"`` (default, quanproto's default), ``"mean"`` or ``"original"``.
        foreground: ``"nonzero"`` (quanproto: mask ∧ non-zero channel sum) or ``"mask"``.

    Returns:
        ``(views [B, V, C, S_h, S_w]`` in the images' dtype, ``valid [B, V] bool)``; ``valid`` is False for empty
        masks, whose views are zero.

    Raises:
        TypeError / ValueError naming the argument for wrong types, shapes, devices, non-binary masks, bad size
        or unknown options.
    """
    S = check_views_inputs(images, masks, size, fill, foreground)
    B, C, H, W = images.shape
    V = masks.shape[1]
    boxes, valid = mask_bounding_boxes(masks)
    grid = _sampling_grid(boxes, H, W, S, images.dtype)                      # [B·V, S_h, S_w, 2]
    if fill == "original":
        # one grid per image: [B, V·S_h, S_w, 2] samples the unmasked image for all its views
        out = F.grid_sample(images, grid.view(B, V * S[0], S[1], 2), mode="bilinear", padding_mode="border",
                            align_corners=False)                             # [B, C, V·S_h, S_w]
        views = out.view(B, C, V, S[0], S[1]).transpose(1, 2)
    else:
        fg = foreground_mask(images, masks, foreground).to(images.dtype)[:, :, None]   # [B, V, 1, H, W]
        masked = images[:, None] * fg                                        # [B, V, C, H, W]
        if fill == "mean":
            count = fg.sum((-2, -1))                                         # [B, V, 1]
            colour = masked.sum((-2, -1)) / count.clamp_min(1)               # [B, V, C]
            masked = masked + (1 - fg) * colour[..., None, None]
        views = F.grid_sample(masked.reshape(B * V, C, H, W), grid, mode="bilinear", padding_mode="border",
                              align_corners=False).view(B, V, C, S[0], S[1])
    if fill == "original" and not bool(valid.all()):
        # (with "zero" / "mean" an empty mask's masked image is already all zero, hence its view)
        views = views * valid[:, :, None, None, None].to(views.dtype)
    return views, valid

"""protofast.mask_views (one batched affine_grid + grid_sample) against the literal per-mask loop
(slice the bounding box, F.interpolate bilinear, align_corners=False): SEMANTICS.md §3.3."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import protofast
import protofast.reference as ref
from conftest import assert_close

FILLS = ("zero", "mean", "original")


def _inputs(B=2, V=4, H=19, W=23, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)
    masks = torch.rand(B, V, H, W, generator=g) > 0.6
    # a compact blob, a single pixel, an empty mask and a full mask among the views
    masks[0, 0] = False
    masks[0, 0, 3:9, 5:16] = True
    if V > 1:
        masks[0, 1] = False
        masks[0, 1, 7, 11] = True
    if V > 2:
        masks[B - 1, V - 1] = False
        masks[B - 1, 0] = True
    return x.to(dtype).requires_grad_(), masks


def _check(x, masks, size, fill, foreground="nonzero", seed=1):
    views, valid = protofast.mask_views(x, masks, size, fill=fill, foreground=foreground)
    xr = x.detach().double().requires_grad_()
    rviews, rvalid = ref.protomask.mask_views(xr, masks, size, fill=fill, foreground=foreground)
    assert views.dtype == x.dtype and views.shape == rviews.shape
    assert torch.equal(valid, rvalid)
    assert_close(views, rviews, x.dtype, f"views fill={fill}")
    g = torch.randn(views.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (gx,) = torch.autograd.grad((views * g.to(views.dtype)).sum(), x)
    (rgx,) = torch.autograd.grad((rviews * g).sum(), xr)
    assert_close(gx, rgx, x.dtype, f"grad images fill={fill}")
    return views, valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("size", [8, 40, (5, 31)])      # down-, up-sampling, mixed
def test_matches_per_mask_loop(fill, size, dtype):
    x, masks = _inputs(dtype=dtype)
    _check(x, masks, size, fill)


def test_float64_equivalence_is_exact_to_rounding():
    """With the half-pixel affine map and the clamp to the crop, the grid sample IS interpolate(crop)."""
    x, masks = _inputs()
    for fill in FILLS:
        a, _ = protofast.mask_views(x, masks, 13, fill=fill)
        b, _ = ref.protomask.mask_views(x, masks, 13, fill=fill)
        assert (a - b).abs().max().item() < 1e-12


def test_full_mask_is_plain_resize():
    x, _ = _inputs(B=1, V=1)
    masks = torch.ones(1, 1, 19, 23, dtype=torch.bool)
    views, valid = protofast.mask_views(x, masks, (11, 7), fill="zero", foreground="mask")
    expected = F.interpolate(x, size=(11, 7), mode="bilinear", align_corners=False)
    torch.testing.assert_close(views[:, 0], expected, rtol=1e-12, atol=1e-12)
    assert valid.all()


def test_empty_and_single_pixel_masks():
    x, masks = _inputs()
    _check(x, masks, 6, "zero")
    views, valid = protofast.mask_views(x, masks, 6)
    assert not valid[1, 3] and valid[0, 1]
    assert torch.count_nonzero(views[1, 3]) == 0
    # a 1-pixel mask is that pixel's colour everywhere
    torch.testing.assert_close(views[0, 1], x.detach()[0, :, 7, 11][:, None, None].expand(3, 6, 6))
    # empty views receive no gradient
    g = torch.zeros_like(views)
    g[1, 3] = 1
    (gx,) = torch.autograd.grad((views * g).sum(), x)
    assert torch.count_nonzero(gx) == 0


def test_all_masks_empty():
    x = torch.rand(2, 3, 8, 8)
    views, valid = protofast.mask_views(x, torch.zeros(2, 3, 8, 8), 4)
    assert not valid.any() and torch.count_nonzero(views) == 0


@pytest.mark.parametrize("B,V", [(1, 1), (1, 3), (3, 1)])
def test_small_batches(B, V):
    x, masks = _inputs(B=B, V=V, seed=B * 10 + V)
    for fill in FILLS:
        _check(x, masks, 9, fill)


def test_fill_rules():
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64)
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    mask[0, 0, 1:5, 1:5] = True
    mask[0, 0, 2, 2] = False                       # a hole inside the box
    x[0, :, 3, 3] = 0                              # a black pixel inside the mask
    # size = the box size: the resize is the identity and the fill is visible pixel by pixel
    zero, _ = protofast.mask_views(x, mask, 4, fill="zero")
    orig, _ = protofast.mask_views(x, mask, 4, fill="original")
    mean, _ = protofast.mask_views(x, mask, 4, fill="mean")
    mean_m, _ = protofast.mask_views(x, mask, 4, fill="mean", foreground="mask")
    crop = x[0, :, 1:5, 1:5]
    torch.testing.assert_close(orig[0, 0], crop)
    assert torch.all(zero[0, 0, :, 1, 1] == 0)
    torch.testing.assert_close(zero[0, 0, :, 0, 0], crop[:, 0, 0])
    fg = mask[0, 0] & (x[0].sum(0) != 0)
    colour = (x[0] * fg).sum((1, 2)) / fg.sum()
    torch.testing.assert_close(mean[0, 0, :, 1, 1], colour)          # the hole
    torch.testing.assert_close(mean[0, 0, :, 2, 2], colour)          # the black pixel counts as background
    colour_m = (x[0] * mask[0, 0]).sum((1, 2)) / mask[0, 0].sum()
    torch.testing.assert_close(mean_m[0, 0, :, 2, 2], torch.zeros(3, dtype=torch.float64))  # kept black
    torch.testing.assert_close(mean_m[0, 0, :, 1, 1], colour_m)
    _check(x.requires_grad_(), mask, 4, "mean", foreground="mask")


def test_integer_masks_and_bounding_boxes():
    x, masks = _inputs()
    a, va = protofast.mask_views(x, masks.to(torch.uint8), 7)
    b, vb = protofast.mask_views(x, masks, 7)
    assert torch.equal(a, b) and torch.equal(va, vb)
    boxes, valid = protofast.ops.views.mask_bounding_boxes(masks)
    assert boxes[0, 0].tolist() == [3, 8, 5, 15] and boxes[0, 1].tolist() == [7, 7, 11, 11]
    assert not valid[1, 3]


def test_gradcheck():
    x = torch.rand(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    masks = torch.zeros(1, 2, 5, 6, dtype=torch.bool)
    masks[0, 0, 1:4, 2:5] = True
    masks[0, 1, 0:2, 0:6] = True
    for fill in FILLS:
        assert torch.autograd.gradcheck(lambda t: protofast.mask_views(t, masks, (4, 7), fill=fill)[0], (x,))


def test_bad_inputs():
    x, masks = _inputs()
    with pytest.raises(TypeError, match="images"):
        protofast.mask_views(x.detach().long(), masks, 4)
    with pytest.raises(TypeError, match="images"):
        protofast.mask_views(x.detach().numpy(), masks, 4)
    with pytest.raises(TypeError, match="masks"):
        protofast.mask_views(x, masks.numpy(), 4)
    with pytest.raises(ValueError, match="images"):
        protofast.mask_views(x[0], masks, 4)
    with pytest.raises(ValueError, match="masks"):
        protofast.mask_views(x, masks[0], 4)
    with pytest.raises(ValueError, match="masks"):
        protofast.mask_views(x, masks[:, :, :-1], 4)
    with pytest.raises(ValueError, match="masks"):
        protofast.mask_views(x, masks[:1], 4)
    with pytest.raises(ValueError, match="masks"):
        protofast.mask_views(x, masks.float() * 0.5, 4)
    with pytest.raises(ValueError, match="size"):
        protofast.mask_views(x, masks, 0)
    with pytest.raises(TypeError, match="size"):
        protofast.mask_views(x, masks, 4.0)
    with pytest.raises(TypeError, match="size"):
        protofast.mask_views(x, masks, (4, 4, 4))
    with pytest.raises(ValueError, match="fill"):
        protofast.mask_views(x, masks, 4, fill="black")
    with pytest.raises(ValueError, match="foreground"):
        protofast.mask_views(x, masks, 4, foreground="all")
    with pytest.raises(ValueError, match="non-empty"):
        protofast.mask_views(x, masks[:, :0], 4)


def test_nan_propagates_like_reference():
    x, masks = _inputs()
    x = x.detach().clone()
    x[0, 1, 4, 6] = float("nan")
    a, _ = protofast.mask_views(x, masks, 9, fill="original")
    b, _ = ref.protomask.mask_views(x, masks, 9, fill="original")
    assert torch.equal(torch.isnan(a), torch.isnan(b))


def test_torch_compile_traces():
    """mask_views runs under torch.compile (dynamo + AOT autograd; the inductor compile is left out: ~40 s here)."""
    x, masks = _inputs(dtype=torch.float32)
    compiled = torch.compile(protofast.mask_views, backend="aot_eager")
    for fill in ("zero", "original"):
        a, va = compiled(x, masks, 6, fill=fill)
        b, vb = protofast.mask_views(x, masks, 6, fill=fill)
        torch.testing.assert_close(a, b)
        assert torch.equal(va, vb)
        (ga,) = torch.autograd.grad(a.sum(), x)
        (gb,) = torch.autograd.grad(b.sum(), x)
        torch.testing.assert_close(ga, gb)


def test_grid_is_the_clamped_affine_grid():
    """The per-axis grid equals F.affine_grid(θ, align_corners=False) clamped to the crop, entry for entry."""
    from protofast.ops.views import _sampling_grid, affine_sampling_grid, mask_bounding_boxes

    _, masks = _inputs()
    boxes, _ = mask_bounding_boxes(masks)
    for S in [(8, 8), (40, 3)]:
        a = _sampling_grid(boxes, 19, 23, S, torch.float64)
        b = affine_sampling_grid(boxes, 19, 23, S)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)

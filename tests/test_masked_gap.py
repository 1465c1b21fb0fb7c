"""protofast.masked_gap (DProtoNet eq. 8, SEMANTICS.md §4.2) against the literal GAP(M_i ⊙ F) in float64.

Values and both gradients (features and masks) with a non-trivial upstream gradient, in float32/float64 and for
float16 inputs; edge sizes (B = 1, I = 1, H = W = 1), non-contiguous inputs, NaN propagation, bad inputs,
gradcheck, opcheck of the three registered ops, torch.compile(fullgraph=True), and a peak-memory check that
the [B, I, D, H, W] product is never formed.
"""
from __future__ import annotations

import pytest
import torch

import protofast
from protofast.reference import dprotonet as ref
from conftest import as_reference, assert_close

ops = torch.ops.protofast


def _inputs(B=3, I=5, D=4, H=3, W=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, H, W, generator=g, dtype=torch.float64).to(dtype)
    m = torch.rand(I, D, H, W, generator=g, dtype=torch.float64).to(dtype)
    return f.requires_grad_(), m.requires_grad_()


def _upstream(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def check_parity(f, m, dtype):
    z = protofast.masked_gap(f, m)
    B, D = f.shape[:2]
    assert z.shape == (B, m.shape[0], D) and z.dtype == f.dtype
    assert z.transpose(1, 2).is_contiguous()               # a [B, D, I] buffer, read channels-first
    fr, mr = as_reference(f, m)
    zr = ref.masked_gap(fr, mr)
    assert_close(z, zr, dtype, "z")
    up = _upstream(z.shape, dtype)
    gf, gm = torch.autograd.grad(z, (f, m), up)
    rgf, rgm = torch.autograd.grad(zr, (fr, mr), up.double())
    assert gf.shape == f.shape and gm.shape == m.shape and gf.dtype == f.dtype and gm.dtype == m.dtype
    assert_close(gf, rgf, dtype, "grad features")
    assert_close(gm, rgm, dtype, "grad masks")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("sizes", [dict(), dict(B=1), dict(I=1), dict(H=1, W=1), dict(B=1, I=1, D=1, H=1, W=1),
                                   dict(B=7, I=13, D=9, H=5, W=3)],
                         ids=["base", "B1", "I1", "HW1", "all1", "odd"])
def test_parity(dtype, sizes):
    f, m = _inputs(dtype=dtype, **sizes)
    check_parity(f, m, dtype)


def test_value_by_hand():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])                      # B=1, D=1, 2×2
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.5, 0.5], [0.5, 0.5]]]])   # I=2
    z = protofast.masked_gap(f, m)
    assert z.tolist() == [[[0.25], [1.25]]]                           # 1/4, (0.5·10)/4


def test_non_contiguous():
    """Channels-last features, a strided slice of masks, a transposed map: same values and gradients."""
    f, m = _inputs(B=4, I=6, D=5, H=4, W=4, dtype=torch.float32)
    f_cl = f.detach().to(memory_format=torch.channels_last).requires_grad_()
    big = torch.rand(12, 5, 4, 8, dtype=torch.float32)
    m_slice = big[::2, :, :, ::2].detach().requires_grad_()
    assert not f_cl.is_contiguous() and not m_slice.is_contiguous()
    check_parity(f_cl, m_slice, torch.float32)
    f_t = f.detach().transpose(2, 3).requires_grad_()
    check_parity(f_t, m.detach().transpose(2, 3).requires_grad_(), torch.float32)


def test_masks_without_gradient():
    """A fixed mask buffer (the DProtoNet default): only the features get a gradient (grad_masks op not run)."""
    f, m = _inputs()
    m = m.detach()
    z = protofast.masked_gap(f, m)
    (gf,) = torch.autograd.grad(z, (f,), _upstream(z.shape, z.dtype))
    fr = f.detach().requires_grad_()
    (rgf,) = torch.autograd.grad(ref.masked_gap(fr, m), (fr,), _upstream(z.shape, z.dtype))
    assert_close(gf, rgf, torch.float64)


def test_nan_propagates_to_its_channel_only():
    f, m = _inputs(B=3, I=4, D=5)
    f = f.detach().clone()
    f[1, 2, 0, 1] = float("nan")
    z = protofast.masked_gap(f, m.detach())
    nan = torch.isnan(z)
    expected = torch.zeros_like(nan)
    expected[1, :, 2] = True
    assert torch.equal(nan, expected)
    m2 = m.detach().clone()
    m2[3, 0, 1, 0] = float("nan")
    nan = torch.isnan(protofast.masked_gap(f.nan_to_num(0.0), m2))
    expected = torch.zeros_like(nan)
    expected[:, 3, 0] = True
    assert torch.equal(nan, expected)


@pytest.mark.parametrize("features, masks, error, match", [
    (torch.rand(2, 3, 4, 4), torch.rand(5, 3, 4, 5), ValueError, "masks"),              # spatial mismatch
    (torch.rand(2, 3, 4, 4), torch.rand(5, 2, 4, 4), ValueError, "masks"),              # channel mismatch
    (torch.rand(2, 3, 16), torch.rand(5, 3, 4, 4), ValueError, "features"),             # rank
    (torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4), ValueError, "masks"),                 # rank
    (torch.rand(2, 3, 4, 4), torch.rand(5, 3, 4, 4).double(), TypeError, "dtype"),      # dtype mismatch
    (torch.ones(2, 3, 4, 4, dtype=torch.long), torch.rand(5, 3, 4, 4), TypeError, "features"),  # integer
    (torch.rand(2, 3, 4, 4), torch.ones(5, 3, 4, 4, dtype=torch.bool), TypeError, "masks"),
    ([[1.0]], torch.rand(5, 3, 4, 4), TypeError, "features"),                           # not a tensor
    (torch.rand(0, 3, 4, 4), torch.rand(5, 3, 4, 4), ValueError, "features"),           # empty B
    (torch.rand(2, 3, 0, 4), torch.rand(5, 3, 0, 4), ValueError, "features"),           # empty H
    (torch.rand(2, 3, 4, 4), torch.rand(0, 3, 4, 4), ValueError, "masks"),              # no masks
])
def test_bad_inputs(features, masks, error, match):
    with pytest.raises(error, match=match):
        protofast.masked_gap(features, masks)


def test_device_mismatch():
    with pytest.raises(ValueError, match="device"):
        protofast.masked_gap(torch.rand(2, 3, 4, 4), torch.rand(5, 3, 4, 4, device="meta"))


def test_gradcheck():
    f, m = _inputs(B=2, I=3, D=3, H=2, W=3)
    assert torch.autograd.gradcheck(protofast.masked_gap, (f, m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype):
    f, m = _inputs(dtype=dtype)
    torch.library.opcheck(ops.masked_gap.default, (f, m))
    up = _upstream((3, 5, 4), dtype)
    torch.library.opcheck(ops.masked_gap_grad_features.default, (up, m.detach(), 3, 2))
    torch.library.opcheck(ops.masked_gap_grad_masks.default, (up, f.detach()))


def test_compile_fullgraph():
    torch._dynamo.reset()
    try:
        f, m = _inputs(dtype=torch.float32)

        def fn(features, masks):
            return (protofast.masked_gap(features, masks) ** 2).sum()

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        eager = torch.autograd.grad(fn(f, m), (f, m))
        out = compiled(f, m)
        torch.testing.assert_close(out, fn(f, m))
        for a, b in zip(torch.autograd.grad(out, (f, m)), eager):
            torch.testing.assert_close(a, b)
    finally:
        torch._dynamo.reset()


def test_peak_memory_is_not_the_5d_product():
    """The literal GAP(M ⊙ F) allocates B·I·D·H·W floats; masked_gap (forward + both gradients) stays far below."""
    from protofast.bench import peak_memory_mb

    B, I, D, H, W = 8, 64, 64, 7, 7
    f = torch.rand(B, D, H, W, requires_grad=True)
    m = torch.rand(I, D, H, W, requires_grad=True)
    product_mb = B * I * D * H * W * 4 / 1e6                                     # 6.4 MB

    def run():
        z = protofast.masked_gap(f, m)
        return torch.autograd.grad(z.sum(), (f, m))

    run()
    peak = peak_memory_mb(run)
    io_mb = (f.numel() + 2 * m.numel() + 2 * B * I * D) * 4 / 1e6                  # grads, z, its gradient
    assert peak < product_mb / 2, (peak, product_mb)
    assert peak < 2 * io_mb + 0.5, (peak, io_mb)

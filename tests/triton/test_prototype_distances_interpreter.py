"""Interpreter parity of the Triton prototype-distance launchers (``kernels/prototype_distances.py``) against the
float64 reference, on CPU tensors under ``TRITON_INTERPRET=1`` (see conftest.py; DESIGN.md §3, gate 1).

The launchers take the canonical operands of the registered ops: X [B, N, K] or channels-first [B, K, N] (an NCHW
map viewed as [B, D, H·W], or unfold's windows), P [M, K]; for cosine, X and P are already unit vectors and
d = 1 − x·p. The oracle is therefore the float64 distance of those same (rounded) operands: SEMANTICS.md §1.2 for
l2 (``protofast.reference``), 1 − x·p for cosine, and autograd through ``torch.min`` for the gradients (§1.4).

Under the interpreter every launcher uses the 16 × 16 × 16 ``INTERPRETER_CONFIG``, so shapes of 15, 16 and 17 are
"block size ± 1" on every tiled axis. bfloat16 is covered by the AOT gate only: the interpreter's bf16 ``tl.dot``
is wrong (DESIGN.md §6).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import protofast.reference as ref
from protofast._layout import as_patch_sets
from protofast.kernels import prototype_distances as tk
from conftest import assert_close

BLOCK = tk.INTERPRETER_CONFIG.block_n
assert tk.INTERPRETER_CONFIG.block_m == tk.INTERPRETER_CONFIG.block_k == BLOCK


def test_interpreter_config_is_selected():
    assert tk.interpreting()
    for pick in (tk._pick_fwd, tk._pick_maps, tk._pick_bwd_x):
        assert pick(49, 2000, 128, torch.float32) is tk.INTERPRETER_CONFIG
    assert tk._pick_bwd_p(2000, 128, torch.float16) is tk.INTERPRETER_CONFIG


# --------------------------------------------------------------------------------------------- oracle
def oracle_maps(X: torch.Tensor, P: torch.Tensor, cosine: bool) -> torch.Tensor:
    """float64 d [B, M, N] of canonical X [B, N, K], P [M, K] (differentiable)."""
    if cosine:
        return 1 - torch.einsum("bnk,mk->bmn", X, P)
    return ref.prototype_distance_maps(X, P, "l2")


def canonical(X: torch.Tensor, channels_first: bool) -> torch.Tensor:
    return X.transpose(1, 2) if channels_first else X


def draw(features_shape, prototypes_shape, dtype, cosine, channels_first, seed=0, min_gap=1e-3):
    """Launcher operands (X in the requested layout, P [M, K]) from random NCHW maps or [B, N, D] sets, rounded
    to ``dtype`` (cosine: normalised in float64 first), such that the two smallest entries of every reference map
    differ by ``min_gap`` (argmins unambiguous)."""
    for attempt in range(50):
        g = torch.Generator().manual_seed(seed + 1000 * attempt)
        f = torch.randn(features_shape, generator=g, dtype=torch.float64)
        p = torch.randn(prototypes_shape, generator=g, dtype=torch.float64)
        X, P, _ = as_patch_sets(f, p, channels_first=channels_first and f.dim() == 4)
        if cosine:
            X = F.normalize(X, dim=1 if channels_first and f.dim() == 4 else -1)
            P = F.normalize(P, dim=-1)
        if channels_first and f.dim() == 3:   # a set stored channels-first: [B, K, N] contiguous
            X = X.transpose(1, 2).contiguous()
        X, P = X.to(dtype), P.to(dtype)
        d = oracle_maps(canonical(X, channels_first).double(), P.double(), cosine)
        if d.shape[2] == 1 or float(d.topk(2, dim=2, largest=False).values.diff(dim=2).min()) >= min_gap:
            return X, P
    raise AssertionError("could not draw tie-free inputs")


def upstream(B, M, seed=7):
    return torch.randn(B, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_parity(X, P, cosine, channels_first, dtype, exact_argmin=True):
    """Forward values/argmins, both gradients and the full maps of the launchers against the oracle."""
    B, M = X.shape[0], P.shape[0]
    values, argmin = tk.min_distances_forward(X, P, cosine, channels_first)
    assert values.shape == (B, M) and values.dtype == torch.float32
    assert argmin.shape == (B, M) and argmin.dtype == torch.int64

    Xr = canonical(X, channels_first).detach().double().requires_grad_()
    Pr = P.detach().double().requires_grad_()
    rmaps = oracle_maps(Xr, Pr, cosine)
    rv, ra = rmaps.min(dim=2)
    assert_close(values, rv, dtype, "values")
    # argmin by value: the reference map at the kernel's argmin is the reference minimum
    assert_close(rmaps.detach().gather(2, argmin[..., None]).squeeze(2), rv, dtype, "reference map at the argmin")
    if exact_argmin:
        torch.testing.assert_close(argmin, ra, rtol=0, atol=0)

    up = upstream(B, M).to(dtype)
    grad_X, grad_P = tk.min_distances_backward(up, X, P, values, argmin, cosine, channels_first)
    assert grad_X.shape == X.shape and grad_X.dtype == X.dtype and grad_X.stride() == X.stride()
    assert grad_P.shape == P.shape and grad_P.dtype == P.dtype
    rgX, rgP = torch.autograd.grad(rv, (Xr, Pr), up.double())
    assert_close(canonical(grad_X, channels_first), rgX, dtype, "grad X")
    assert_close(grad_P, rgP, dtype, "grad P")

    maps = tk.distance_maps(canonical(X, channels_first), P, cosine)
    assert maps.shape == rmaps.shape and maps.dtype == torch.float32
    assert_close(maps, rmaps.detach(), dtype, "maps")


# --------------------------------------------------------------------------------------------- parity
# (id, features, prototypes): NCHW maps ([M, D], [M, D, 1, 1] or h×w windows through unfold) and [B, N, D] sets.
# B = 1, M = 1, N = 1, K = 1, non-powers-of-two, and 15 / 16 / 17 (= the interpreter block ∓ 1) on each of N, M, K.
SHAPES = {
    "B1_M1": ((1, 7, 5), (1, 5)),
    "N1": ((2, 1, 6), (3, 6)),
    "K1": ((2, 1, 3, 4), (5, 1)),
    "odd_map": ((3, 13, 5, 7), (11, 13, 1, 1)),         # N = 35: three patch tiles, the last ragged
    "hw_windows": ((2, 5, 5, 7), (11, 5, 2, 3)),        # K = 30, N = 4·5 windows
    "block_minus_1": ((2, 15, 15), (15, 15)),
    "block": ((2, 16, 16), (16, 16)),
    "block_plus_1": ((2, 17, 17), (17, 17)),
    "panels": ((2, 40, 6, 6), (37, 40)),               # several tiles on every axis
}
FP32_CASES = [pytest.param(name, cf, cosine, id=f"{name}-{'cf' if cf else 'nk'}-{'cos' if cosine else 'l2'}")
              for name in SHAPES for cf in (False, True) for cosine in (False, True)
              if not (cosine and name == "K1")             # cosine with K = 1: all ties (see the tie tests)
              and (cf or name in ("odd_map", "hw_windows", "block_plus_1"))]


@pytest.mark.parametrize("name, channels_first, cosine", FP32_CASES)
def test_parity_fp32(name, channels_first, cosine):
    X, P = draw(*SHAPES[name], torch.float32, cosine, channels_first)
    check_parity(X, P, cosine, channels_first, torch.float32)


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("name, channels_first", [("odd_map", True), ("hw_windows", False), ("block_plus_1", False)])
def test_parity_fp16(name, channels_first, cosine):
    """float16 operands: products accumulated in float32, values float32, gradients rounded to float16."""
    X, P = draw(*SHAPES[name], torch.float16, cosine, channels_first)
    check_parity(X, P, cosine, channels_first, torch.float16)


def test_non_contiguous_operands():
    """X with permuted strides (NHWC storage read as [B, N, K] and as [B, K, N]), sliced with a storage offset,
    and P transposed: read through strides, gradients written in X's own layout."""
    X, P = draw((3, 6, 5, 4), (9, 6), torch.float32, False, False)           # X [3, 20, 6]: a transposed view
    X = X.contiguous().transpose(1, 2).contiguous().transpose(1, 2)[1:]      # [2, 20, 6], K-major storage
    P = P.t().contiguous().t()
    assert not X.is_contiguous() and X.storage_offset() > 0 and not P.is_contiguous()
    check_parity(X, P, False, False, torch.float32)
    check_parity(X.transpose(1, 2), P, False, True, torch.float32)          # same storage seen as [B, K, N]


# --------------------------------------------------------------------------------------------- ties
@pytest.mark.parametrize("proto", [(3, (1, 1)), (2, (2, 2))], ids=["1x1", "2x2"])
def test_integer_ties_match_reference_exactly(proto):
    """Small integers (exact in float32): many exact ties across the 16-patch tiles of a 7×7 map; argmins,
    values and gradients equal the reference's first-occurrence ones bit for bit."""
    D, hw = proto
    g = torch.Generator().manual_seed(11)
    f = torch.randint(-1, 2, (2, D, 7, 7), generator=g).double()
    p = torch.randint(-1, 2, (20, D, *hw), generator=g).double()
    X, P, _ = as_patch_sets(f, p, channels_first=True)
    Xr = X.transpose(1, 2).clone().requires_grad_()
    Pr = P.clone().requires_grad_()
    rmaps = oracle_maps(Xr, Pr, False)
    rv, ra = rmaps.min(dim=2)
    assert int(((rmaps == rv[..., None]).sum(2) > 1).sum()) > 10, "fixture should contain many exact ties"
    assert int((ra >= BLOCK).sum()) > 0, "fixture should have argmins past the first patch tile"
    values, argmin = tk.min_distances_forward(X.float(), P.float(), False, True)
    torch.testing.assert_close(argmin, ra, rtol=0, atol=0)
    torch.testing.assert_close(values.double(), rv.detach(), rtol=0, atol=0)
    up = torch.randint(-3, 4, rv.shape, generator=g).double()
    gX, gP = tk.min_distances_backward(up.float(), X.float(), P.float(), values, argmin, False, True)
    rgX, rgP = torch.autograd.grad(rv, (Xr, Pr), up)
    torch.testing.assert_close(gX.transpose(1, 2).double(), rgX, rtol=0, atol=0)
    torch.testing.assert_close(gP.double(), rgP, rtol=0, atol=0)


def test_identical_patches_first_occurrence():
    """Copies of one real-valued patch in different patch tiles (n = 5, 17, 30, 48): the first copy wins and alone
    receives the gradient."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1, 49, 6, generator=g) + 4.0
    P = torch.randn(3, 6, generator=g)
    near = P.mean(0) + 0.01 * torch.randn(6, generator=g)
    for n in (5, 17, 30, 48):
        X[0, n] = near
    values, argmin = tk.min_distances_forward(X, P, False, False)
    assert argmin.tolist() == [[5, 5, 5]]
    up = torch.tensor([[1.0, 0.5, -2.0]])
    gX, gP = tk.min_distances_backward(up, X, P, values, argmin, False, False)
    assert torch.count_nonzero(gX[0, [17, 30, 48]]) == 0 and torch.count_nonzero(gX[0, 5]) > 0
    expected = 2 * (up[0, :, None] * (near[None] - P)).sum(0)
    torch.testing.assert_close(gX[0, 5], expected, rtol=1e-5, atol=1e-5)


def test_equidistant_patches_first_occurrence():
    """Distinct patches at the same distance (exactly representable): the first wins."""
    X = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]],
                      [[2.0, 2.0], [-1.0, -1.0], [1.0, -1.0], [1.0, 1.0]]])
    P = torch.zeros(1, 2)
    values, argmin = tk.min_distances_forward(X, P, False, False)
    assert argmin.tolist() == [[1], [1]] and values.tolist() == [[1.0], [2.0]]


def test_tie_at_relu_clamp_has_zero_gradient():
    """Several patches equal to the prototype: value exactly 0, argmin the first of them (in the second patch
    tile), and no gradient anywhere (relu derivative 0 at 0)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randint(-3, 4, (2, 40, 4), generator=g).float()
    P = torch.randint(-3, 4, (3, 4), generator=g).float() + 10.0     # far from every patch
    P[1] = X[1, 20]
    X[1, 33] = X[1, 20]
    values, argmin = tk.min_distances_forward(X, P, False, False)
    assert values[1, 1].item() == 0.0 and argmin[1, 1].item() == int((X[1] == P[1]).all(1).nonzero()[0])
    up = torch.zeros(2, 3)
    up[1, 1] = 1.0
    gX, gP = tk.min_distances_backward(up, X, P, values, argmin, False, False)
    assert torch.count_nonzero(gX) == 0 and torch.count_nonzero(gP) == 0


def test_relu_clamp_by_rounding_has_zero_gradient():
    """x ≠ p whose expanded float32 distance rounds to exactly 0 (true value 2.4e-7): the relu clamps it, so the
    pair gets no gradient although x − p ≠ 0 (G = grad·[values > 0], SEMANTICS.md §0)."""
    p = 1000.0 + 2.0 ** -11                                   # 8 float32 ulps above 1000
    X = torch.tensor([[[1000.0], [5000.0]]])
    P = torch.tensor([[p]])
    assert float(P[0, 0]) != 1000.0
    values, argmin = tk.min_distances_forward(X, P, False, False)
    assert values.tolist() == [[0.0]] and argmin.tolist() == [[0]]
    gX, gP = tk.min_distances_backward(torch.ones(1, 1), X, P, values, argmin, False, False)
    assert torch.count_nonzero(gX) == 0 and torch.count_nonzero(gP) == 0


def test_cosine_ties():
    """Unit vectors at the same angle to p (and copies of one direction) tie exactly: the first wins."""
    s = 0.5 ** 0.5
    X = torch.tensor([[[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
                      [[0.0, -1.0], [s, s], [s, s], [1.0, 0.0]]])
    P = torch.tensor([[s, s]])
    values, argmin = tk.min_distances_forward(X, P, True, False)
    assert argmin.tolist() == [[1], [1]]
    up = torch.tensor([[1.0], [-2.0]])
    gX, gP = tk.min_distances_backward(up, X, P, values, argmin, True, False)
    expected = torch.zeros_like(X)
    expected[0, 1], expected[1, 1] = -1.0 * P[0], 2.0 * P[0]
    torch.testing.assert_close(gX, expected, rtol=0, atol=0)
    torch.testing.assert_close(gP, -(1.0 * X[0, 1] - 2.0 * X[1, 1])[None], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_nan_in_features_poisons_its_row_only(cosine):
    """A NaN in patch 21 (second tile) of image 1: every value of image 1 is NaN with argmin 21 (the first NaN,
    torch.min's rule), even where a smaller finite distance comes earlier; other images are untouched."""
    X, P = draw((3, 40, 5), (6, 5), torch.float32, cosine, False)
    clean_values, clean_argmin = tk.min_distances_forward(X, P, cosine, False)
    X[1, 21, 2] = float("nan")
    X[1, 30, 0] = float("nan")
    values, argmin = tk.min_distances_forward(X, P, cosine, False)
    assert torch.isnan(values[1]).all() and argmin[1].tolist() == [21] * 6
    for b in (0, 2):
        torch.testing.assert_close(values[b], clean_values[b], rtol=0, atol=0)
        torch.testing.assert_close(argmin[b], clean_argmin[b], rtol=0, atol=0)
    maps = tk.distance_maps(X, P, cosine)
    assert torch.isnan(maps[1, :, [21, 30]]).all() and not torch.isnan(maps[1, :, :21]).any()
    # l2 backward: NaN values are not > 0, so G = 0 and image 1 gets no gradient at all, not even 0·NaN at its
    # NaN entries (pairs with G = 0 are skipped, as in the C++ kernel); the other images are unaffected
    if not cosine:
        gX, gP = tk.min_distances_backward(torch.ones(3, 6), X, P, values, argmin, False, False)
        assert torch.count_nonzero(gX[1]) == 0 and torch.isfinite(gP).all()
        assert torch.count_nonzero(gX[[0, 2]]) > 0


def test_nan_in_prototype_poisons_its_column_only():
    X, P = draw((3, 20, 4), (18, 4), torch.float32, False, False)
    clean_values, clean_argmin = tk.min_distances_forward(X, P, False, False)
    P[17, 0] = float("nan")                                   # the second prototype tile
    values, argmin = tk.min_distances_forward(X, P, False, False)
    assert torch.isnan(values[:, 17]).all() and argmin[:, 17].tolist() == [0, 0, 0]
    torch.testing.assert_close(values[:, :17], clean_values[:, :17], rtol=0, atol=0)
    torch.testing.assert_close(argmin[:, :17], clean_argmin[:, :17], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_all_infinite_row():
    """A patch set whose every distance overflows to inf: (inf, 0), as torch.min."""
    X = torch.full((1, 18, 3), 3e38)
    values, argmin = tk.min_distances_forward(X, torch.zeros(2, 3), False, False)
    assert values.tolist() == [[float("inf")] * 2] and argmin.tolist() == [[0, 0]]


# --------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
def test_backward_is_deterministic(cosine):
    """Many prototypes routed to few patches (N = 3, M = 40: each patch receives ~13 contributions summed across
    prototype tiles): two runs are bitwise equal and match the oracle."""
    X, P = draw((2, 3, 20), (40, 20), torch.float32, cosine, False, min_gap=1e-4)
    values, argmin = tk.min_distances_forward(X, P, cosine, False)
    up = upstream(2, 40).float()
    first = tk.min_distances_backward(up, X, P, values, argmin, cosine, False)
    second = tk.min_distances_backward(up, X, P, values, argmin, cosine, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    Xr, Pr = X.double().requires_grad_(), P.double().requires_grad_()
    rgX, rgP = torch.autograd.grad(oracle_maps(Xr, Pr, cosine).min(2).values, (Xr, Pr), up.double())
    assert_close(first[0], rgX, torch.float32)
    assert_close(first[1], rgP, torch.float32)


# --------------------------------------------------------------------------------------------- input checks
def test_input_errors():
    X, P = torch.zeros(2, 3, 4), torch.zeros(5, 4)
    with pytest.raises(TypeError, match="dtype"):
        tk.min_distances_forward(X.double(), P.double(), False, False)
    with pytest.raises(TypeError, match="dtype"):
        tk.distance_maps(X, P.half(), False)
    with pytest.raises(ValueError, match="channels"):
        tk.min_distances_forward(X, torch.zeros(5, 3), False, False)
    with pytest.raises(ValueError, match=r"\[B, M\]"):
        tk.min_distances_backward(torch.zeros(2, 4), X, P, torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long),
                                  False, False)

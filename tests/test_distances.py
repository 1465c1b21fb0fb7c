"""prototype_min_distances / prototype_distance_maps / log_similarity against the float64 reference.

SEMANTICS.md §0 (first occurrence, clamp gradients), §1.2 (distances), §1.4 (gradient routing), §3.3 (sets).
"""
from __future__ import annotations

import pytest
import torch

import protofast
import protofast.ops.distances as distances_module
import protofast.reference as ref
from conftest import as_reference, assert_close, grads, make_inputs, tol

# (id, features shape, prototypes shape): B = 1, M = 1, N = 1 (1×1 map), D = 1, non-powers-of-two, h×w > 1
# prototypes ([M, D, 2, 3]), prototypes as large as the map, [M, D, 1, 1] and [M, D] prototypes, [B, N, D] sets,
# and a size spanning several prototype panels and patch row blocks of the C++ kernel.
SHAPES = [
    ("B1", (1, 4, 3, 3), (5, 4)),
    ("M1", (2, 4, 3, 3), (1, 4, 1, 1)),
    ("N1_map", (2, 5, 1, 1), (3, 5, 1, 1)),
    ("D1", (2, 1, 3, 4), (4, 1)),
    ("odd", (3, 13, 5, 7), (11, 13, 1, 1)),
    ("odd_flat", (3, 13, 5, 7), (11, 13)),
    ("hw", (3, 13, 5, 7), (11, 13, 2, 3)),
    ("hw_full_map", (2, 3, 2, 3), (4, 3, 2, 3)),
    ("set", (3, 6, 13), (11, 13)),
    ("set_1x1_protos", (2, 4, 5), (3, 5, 1, 1)),
    ("set_N1", (2, 1, 5), (3, 5)),
    ("panels", (2, 8, 7, 7), (70, 8)),
    ("wide_D", (2, 150, 3, 3), (7, 150)),    # D past the C++ backward's 8-vector channel loop, plus tails
    ("medium", (2, 64, 14, 14), (50, 64)),
]
METRICS = ("l2", "cosine")
# cosine distances with D = 1 are all 0 or 2 (ties everywhere): covered by the tie tests instead
CASES = [pytest.param(fs, ps, metric, id=f"{name}-{metric}")
         for name, fs, ps in SHAPES for metric in METRICS if not (metric == "cosine" and name == "D1")]


def _map_shape(fs, ps):
    if len(fs) == 3:
        return (fs[1],)
    h, w = (ps[2], ps[3]) if len(ps) == 4 else (1, 1)
    return (fs[2] - h + 1, fs[3] - w + 1)


def _upstream(shape, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def check_min_parity(f, p, metric, dtype, exact_argmin=True):
    """Values, argmins (exactly and by value) and both gradients against the float64 reference."""
    values, argmin = protofast.prototype_min_distances(f, p, metric)
    B, M = f.shape[0], p.shape[0]
    assert values.shape == (B, M) and argmin.shape == (B, M)
    assert values.dtype == f.dtype and argmin.dtype == torch.int64
    fr, pr = as_reference(f, p)
    rv, ra = ref.prototype_min_distances(fr, pr, metric)
    assert_close(values, rv, dtype, "values")
    # argmin by value: the reference map at the op's argmin is the reference minimum
    rmap = ref.prototype_distance_maps(fr, pr, metric).flatten(2)
    assert_close(rmap.gather(2, argmin[..., None]).squeeze(2), rv, dtype, "reference map at the argmin")
    if exact_argmin:
        torch.testing.assert_close(argmin, ra, rtol=0, atol=0)
    up = _upstream((B, M), dtype)                 # the reference gets the same (rounded) upstream
    gf, gp = grads(values, (f, p), up)
    rgf, rgp = grads(rv, (fr, pr), up.double())
    assert gf.dtype == f.dtype and gp.dtype == p.dtype
    assert_close(gf, rgf, dtype, "grad features")
    assert_close(gp, rgp, dtype, "grad prototypes")


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("fs, ps, metric", CASES)
def test_min_distances_parity(backend, fs, ps, metric, dtype):
    f, p = make_inputs(fs, ps, dtype, metric)
    check_min_parity(f, p, metric, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fs, ps", [((3, 13, 5, 7), (11, 13, 2, 3)), ((3, 6, 13), (11, 13))], ids=["hw", "set"])
def test_min_distances_half_precision(backend, fs, ps, metric, dtype):
    """float16 / bfloat16 inputs: computed in float32, values returned in the input dtype, gradients too."""
    f, p = make_inputs(fs, ps, dtype, metric)
    check_min_parity(f, p, metric, dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fs, ps", [((3, 13, 5, 7), (11, 13, 2, 3)), ((3, 13, 5, 7), (11, 13)),
                                    ((2, 70, 3), (5, 3))], ids=["hw", "1x1", "set_N_above_chunk"])
def test_torch_fallback_many_chunks(monkeypatch, small_chunks, fs, ps, metric):
    """The chunked torch fallback (64 distance entries per chunk) gives the reference's values, argmins and
    gradients, for the min op and the full maps."""
    monkeypatch.setenv("PROTOFAST_BACKEND", "torch")
    calls = []
    original = distances_module._chunks

    def counting_chunks(B, N, M):
        tiles = list(original(B, N, M))
        calls.append(len(tiles))
        return iter(tiles)

    monkeypatch.setattr(distances_module, "_chunks", counting_chunks)
    f, p = make_inputs(fs, ps, torch.float64, metric)
    check_min_parity(f, p, metric, torch.float64)
    check_maps_parity(f, p, metric, torch.float64)
    assert calls and min(calls) > 1, f"the fallback was not chunked: {calls}"


def test_non_contiguous_inputs(backend):
    f, p = make_inputs((3, 6, 5, 7), (4, 6), torch.float64)
    f_nc = f.detach().transpose(1, 3).contiguous().transpose(1, 3).requires_grad_()  # same values, NHWC strides
    p_nc = p.detach().t().contiguous().t().requires_grad_()                           # [M, D], transposed strides
    assert not f_nc.is_contiguous() and not p_nc.is_contiguous()
    check_min_parity(f_nc, p_nc, "l2", torch.float64)


def test_sliced_inputs_and_strided_upstream(backend):
    """Inputs with a storage offset, and upstream gradients that are transposed or expanded (stride 0)."""
    f_full, p_full = make_inputs((4, 5, 4, 6), (7, 5), torch.float64, requires_grad=False)
    f = f_full[1:].requires_grad_()
    p = p_full[2:].requires_grad_()
    assert f.storage_offset() > 0 and p.storage_offset() > 0
    fr, pr = as_reference(f, p)
    w = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    reductions = (lambda v: (v.t() * w).sum(),        # transposed upstream
                  lambda v: v.sum(),                  # expanded upstream
                  lambda v: v[:, ::2].sum())          # strided upstream
    for reduce in reductions:
        loss = reduce(protofast.prototype_min_distances(f, p)[0])
        rloss = reduce(ref.prototype_min_distances(fr, pr)[0])
        for a, b in zip(grads(loss, (f, p), None), grads(rloss, (fr, pr), None)):
            assert_close(a, b)


def test_only_prototypes_require_grad(backend):
    f, p = make_inputs((2, 3, 4, 4), (5, 3), torch.float64)
    f = f.detach()
    values, _ = protofast.prototype_min_distances(f, p)
    (gp,) = torch.autograd.grad(values.sum(), p)
    (rgp,) = torch.autograd.grad(ref.prototype_min_distances(f, p)[0].sum(), p)
    assert_close(gp, rgp)


# --------------------------------------------------------------------------------------------- full maps
def check_maps_parity(f, p, metric, dtype):
    maps = protofast.prototype_distance_maps(f, p, metric)
    assert maps.shape == (f.shape[0], p.shape[0], *_map_shape(tuple(f.shape), tuple(p.shape)))
    assert maps.dtype == f.dtype
    fr, pr = as_reference(f, p)
    rmaps = ref.prototype_distance_maps(fr, pr, metric)
    assert_close(maps, rmaps, dtype, "maps")
    up = _upstream(maps.shape, dtype, seed=3)
    gf, gp = grads(maps, (f, p), up)
    rgf, rgp = grads(rmaps, (fr, pr), up.double())
    assert_close(gf, rgf, dtype, "grad features")
    assert_close(gp, rgp, dtype, "grad prototypes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("fs, ps, metric", CASES)
def test_distance_maps_parity(fs, ps, metric, dtype):
    f, p = make_inputs(fs, ps, dtype, metric, min_separation=0)
    check_maps_parity(f, p, metric, dtype)


def test_distance_maps_relu_clamp_has_zero_gradient():
    """Map entries clamped to exactly 0 (prototype equal to the patch) carry no gradient (SEMANTICS §0)."""
    f = torch.tensor([[[[1.0, 2.0], [3.0, 1.0]]]], dtype=torch.float64, requires_grad=True)  # [1, 1, 2, 2]
    p = torch.tensor([[1.0], [5.0]], dtype=torch.float64, requires_grad=True)
    maps = protofast.prototype_distance_maps(f, p)
    assert maps[0, 0].tolist() == [[0.0, 1.0], [4.0, 0.0]]
    up = torch.zeros_like(maps)
    up[0, 0, 0, 0] = up[0, 0, 1, 1] = 1.0      # upstream only on the clamped entries
    gf, gp = grads(maps, (f, p), up)
    assert torch.count_nonzero(gf) == 0 and torch.count_nonzero(gp) == 0


# --------------------------------------------------------------------------------------------- ties
def _tie_free_flat_index(x_patches, p):
    """First n with x_patches[n] == p, or None."""
    hits = (x_patches == p).all(-1).nonzero()
    return int(hits[0, 0]) if len(hits) else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_identical_patches_first_occurrence(backend, dtype):
    """Several identical patches nearest to the prototype (in different C++ row blocks of a 7×7 map): argmin is
    the first, and the gradient reaches that patch only."""
    D, H, W = 3, 7, 7
    f = torch.full((1, D, H, W), 9.0, dtype=dtype)
    near = torch.tensor([1.0, 2.0, 2.0], dtype=dtype)
    positions = [5, 17, 30, 48]                      # flat (i, j) indices, across row blocks
    for n in positions:
        f[0, :, n // W, n % W] = near
    p = torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]], dtype=dtype)  # both nearest to `near`
    f.requires_grad_(), p.requires_grad_()
    values, argmin = protofast.prototype_min_distances(f, p)
    assert argmin.tolist() == [[5, 5]]
    assert values.tolist() == [[1.0, 9.0]]
    gf, gp = grads(values, (f, p), torch.tensor([[1.0, 0.5]], dtype=dtype))
    expected_gf = torch.zeros_like(f)
    expected_gf[0, :, 0, 5] = 2 * 1.0 * (near - p[0].detach()) + 2 * 0.5 * (near - p[1].detach())
    torch.testing.assert_close(gf, expected_gf, rtol=0, atol=0)
    expected_gp = torch.stack([2 * 1.0 * (p[0].detach() - near), 2 * 0.5 * (p[1].detach() - near)])
    torch.testing.assert_close(gp, expected_gp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_equidistant_patches_first_occurrence(backend, dtype):
    """Distinct patches at the same distance: the first (row-major) wins."""
    # [B=2, N=4, D=2] set; prototype at the origin; patches 1, 2, 3 of sample 0 all at squared distance 1
    f = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]],
                      [[2.0, 2.0], [-1.0, -1.0], [1.0, -1.0], [1.0, 1.0]]], dtype=dtype, requires_grad=True)
    p = torch.zeros(1, 2, dtype=dtype, requires_grad=True)
    values, argmin = protofast.prototype_min_distances(f, p)
    assert argmin.tolist() == [[1], [1]]
    assert values.tolist() == [[1.0], [2.0]]
    gf, gp = grads(values, (f, p), torch.ones(2, 1, dtype=dtype))
    expected = torch.zeros_like(f)
    expected[0, 1] = 2 * f[0, 1].detach()
    expected[1, 1] = 2 * f[1, 1].detach()
    torch.testing.assert_close(gf, expected, rtol=0, atol=0)
    torch.testing.assert_close(gp, -(expected[0, 1] + expected[1, 1])[None], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("proto", [(3, (1, 1)), (2, (2, 2))], ids=["1x1", "2x2"])
def test_random_integer_ties_match_reference(backend, dtype, proto):
    """Small integer inputs (exact in float32) produce many exact ties; argmins and gradients must equal the
    reference's first-occurrence ones exactly."""
    D, hw = proto
    g = torch.Generator().manual_seed(11)
    f = torch.randint(-1, 2, (3, D, 7, 7), generator=g).to(dtype).requires_grad_()
    p = torch.randint(-1, 2, (40, D, *hw), generator=g).to(dtype).requires_grad_()
    fr, pr = as_reference(f, p)
    rmap = ref.prototype_distance_maps(fr, pr).flatten(2)
    rv, ra = rmap.min(2)
    n_tied = int(((rmap == rv[..., None]).sum(2) > 1).sum())
    assert n_tied > 20, "fixture should contain many exact ties"
    values, argmin = protofast.prototype_min_distances(f, p)
    torch.testing.assert_close(argmin, ra, rtol=0, atol=0)
    torch.testing.assert_close(values.double(), rv, rtol=0, atol=0)
    up = torch.randint(-3, 4, values.shape, generator=g).double()
    gf, gp = grads(values, (f, p), up.to(dtype))
    rgf, rgp = grads(rv, (fr, pr), up)
    torch.testing.assert_close(gf.double(), rgf, rtol=0, atol=0)
    torch.testing.assert_close(gp.double(), rgp, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_duplicated_real_valued_patch_first_occurrence(backend, dtype):
    """A non-integer patch vector copied to 20 scattered positions of a 14×14 map: identical vectors must give
    bitwise identical distances wherever they sit in the GEMM tiling, so the first copy wins."""
    g = torch.Generator().manual_seed(3)
    B, D, H, W, M = 3, 37, 14, 14, 45
    f = torch.randn(B, D, H, W, generator=g, dtype=torch.float64).to(dtype)
    p = torch.randn(M, D, generator=g, dtype=torch.float64).to(dtype)
    v = p.mean(0) + 0.01 * torch.randn(D, generator=g, dtype=torch.float64).to(dtype)  # near every prototype
    positions = torch.randperm(H * W, generator=g)[:20].tolist()
    for n in positions:
        f[:, :, n // W, n % W] = v
    _, argmin = protofast.prototype_min_distances(f, p)
    patches = f.flatten(2).transpose(1, 2)
    won_by_copy = (patches[torch.arange(B)[:, None], argmin] == v).all(-1)
    assert int(won_by_copy.sum()) > B * M // 2, "fixture: the copies should win most maps"
    assert (argmin[won_by_copy] == min(positions)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tie_at_relu_clamp(backend, dtype):
    """Several patches equal to the prototype: value 0, argmin the first of them, zero gradient everywhere."""
    g = torch.Generator().manual_seed(5)
    f = torch.randint(-3, 4, (2, 4, 6, 6), generator=g).to(dtype)
    v = f[1, :, 1, 2].clone()
    for (i, j) in [(3, 0), (5, 5)]:
        f[1, :, i, j] = v
    p = torch.randint(-3, 4, (3, 4), generator=g).to(dtype)
    p[1] = v
    first = _tie_free_flat_index(f[1].flatten(1).t(), v)
    assert first == 1 * 6 + 2
    f.requires_grad_(), p.requires_grad_()
    values, argmin = protofast.prototype_min_distances(f, p)
    assert values[1, 1].item() == 0.0
    assert argmin[1, 1].item() == first
    up = torch.zeros(2, 3, dtype=dtype)
    up[1, 1] = 1.0
    gf, gp = grads(values, (f, p), up)
    assert torch.count_nonzero(gf) == 0 and torch.count_nonzero(gp) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cosine_ties(backend, dtype):
    """Cosine: patches of the same direction (x and 2x) and patches at the same angle tie exactly; the first
    wins and alone receives gradient."""
    # sample 0: [1, 0] and [0, 1] at the same angle to p = [1, 1]; sample 1: [1, 1] and [2, 2] both at angle 0
    f = torch.tensor([[[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]],
                      [[0.0, -1.0], [2.0, 2.0], [1.0, 1.0], [1.0, 0.0]]], dtype=dtype, requires_grad=True)
    p = torch.tensor([[1.0, 1.0]], dtype=dtype, requires_grad=True)
    values, argmin = protofast.prototype_min_distances(f, p, "cosine")
    assert argmin.tolist() == [[1], [1]]
    fr, pr = as_reference(f, p)
    rv, ra = ref.prototype_min_distances(fr, pr, "cosine")
    assert ra.tolist() == [[1], [1]]
    assert_close(values, rv, dtype)
    gf, gp = grads(values, (f, p), torch.tensor([[1.0], [-2.0]], dtype=dtype))
    rgf, rgp = grads(rv, (fr, pr), torch.tensor([[1.0], [-2.0]], dtype=torch.float64))
    assert_close(gf, rgf, dtype)
    assert_close(gp, rgp, dtype)
    others = torch.ones(2, 4, dtype=torch.bool)
    others[:, 1] = False
    assert torch.count_nonzero(gf[others]) == 0 and torch.count_nonzero(gf[:, 1]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cosine_one_channel_ties(backend, dtype):
    """D = 1: every cosine distance is exactly 0 or 2, so each map is full of ties."""
    g = torch.Generator().manual_seed(2)
    f = torch.randint(1, 4, (3, 1, 4, 5), generator=g).to(dtype) * torch.where(
        torch.rand(3, 1, 4, 5, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    p = torch.tensor([[2.0], [-1.0], [0.5]], dtype=dtype)
    values, argmin = protofast.prototype_min_distances(f, p, "cosine")
    rv, ra = ref.prototype_min_distances(f.double(), p.double(), "cosine")
    torch.testing.assert_close(argmin, ra, rtol=0, atol=0)
    assert_close(values, rv, dtype)


def test_cosine_zero_vectors(backend):
    """x / max(‖x‖, 1e-12): a zero patch or prototype has cosine distance exactly 1 (and finite gradients)."""
    f, p = make_inputs((2, 3, 3, 3), (4, 3), torch.float64, "cosine", requires_grad=False)
    f[0, :, :, :] = 0.0          # sample 0: every patch is zero → all its distances are 1 (tied)
    p[2] = 0.0
    f.requires_grad_(), p.requires_grad_()
    values, argmin = protofast.prototype_min_distances(f, p, "cosine")
    assert values[0].tolist() == [1.0] * 4 and argmin[0].tolist() == [0] * 4
    assert values[:, 2].tolist() == [1.0, 1.0]
    check_min_parity(f, p, "cosine", torch.float64, exact_argmin=True)


# --------------------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("proto", [(1, 1), (2, 2)], ids=["1x1", "2x2"])
def test_nan_in_features_poisons_its_sample_only(backend, metric, proto):
    f, p = make_inputs((3, 4, 3, 3), (5, 4, *proto), torch.float32, metric, requires_grad=False)
    clean_values, clean_argmin = protofast.prototype_min_distances(f, p, metric)
    f[1, 2, 1, 1] = float("nan")
    values, argmin = protofast.prototype_min_distances(f, p, metric)
    assert torch.isnan(values[1]).all()
    for b in (0, 2):
        torch.testing.assert_close(values[b], clean_values[b], rtol=0, atol=0)
        torch.testing.assert_close(argmin[b], clean_argmin[b], rtol=0, atol=0)
    # "NaN in a row wins" (torch.min semantics): the argmin is the first patch that holds the NaN
    first_nan = 1 * 3 + 1 if proto == (1, 1) else 0
    assert argmin[1].tolist() == [first_nan] * 5


@pytest.mark.parametrize("metric", METRICS)
def test_nan_in_prototype_poisons_its_column_only(backend, metric):
    f, p = make_inputs((3, 4, 3, 3), (5, 4), torch.float32, metric, requires_grad=False)
    clean_values, clean_argmin = protofast.prototype_min_distances(f, p, metric)
    p[2, 0] = float("nan")
    values, argmin = protofast.prototype_min_distances(f, p, metric)
    assert torch.isnan(values[:, 2]).all()
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(values[:, keep], clean_values[:, keep], rtol=0, atol=0)
    torch.testing.assert_close(argmin[:, keep], clean_argmin[:, keep], rtol=0, atol=0)
    assert argmin[:, 2].tolist() == [0, 0, 0]


# --------------------------------------------------------------------------------------------- gradcheck
GRADCHECK_SHAPES = [((2, 3, 3, 3), (4, 3)), ((2, 3, 3, 4), (3, 3, 2, 2)), ((2, 4, 3), (3, 3, 1, 1))]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fs, ps", GRADCHECK_SHAPES, ids=["1x1", "2x2", "set"])
def test_gradcheck_min_distances(backend, fs, ps, metric):
    f, p = make_inputs(fs, ps, torch.float64, metric, min_separation=1e-2, min_value=0.05)
    assert torch.autograd.gradcheck(lambda a, b: protofast.prototype_min_distances(a, b, metric)[0], (f, p))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fs, ps", GRADCHECK_SHAPES, ids=["1x1", "2x2", "set"])
def test_gradcheck_distance_maps(fs, ps, metric):
    f, p = make_inputs(fs, ps, torch.float64, metric, min_separation=0, min_value=0.05)
    assert torch.autograd.gradcheck(lambda a, b: protofast.prototype_distance_maps(a, b, metric), (f, p))


# --------------------------------------------------------------------------------------------- log-similarity
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("eps", [1e-4, 1e-14, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_log_similarity_parity(dtype, eps):
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(4, 6, generator=g, dtype=torch.float64) * 3).to(dtype)
    d[0, 0] = 0.0
    d.requires_grad_()
    out = protofast.log_similarity(d, eps)
    assert out.dtype == dtype and out.shape == d.shape
    (dr,) = as_reference(d)
    rout = ref.log_similarity(dr, eps)
    up = _upstream(d.shape, dtype)
    (gd,) = grads(out, (d,), up)
    (rgd,) = grads(rout, (dr,), up.double())
    if dtype in (torch.float64, torch.float32):
        assert_close(out, rout, dtype)
        finite = d.detach().double() > 0.05   # near 0 the derivative is 1/eps-sized: compare relatively there
        assert_close(gd.double()[finite], rgd[finite], dtype)
        torch.testing.assert_close(gd.double()[~finite], rgd[~finite], rtol=tol(dtype)["rtol"], atol=0)
    else:
        # float16 / bfloat16, as the distance ops: computed in float32, rounded once to the input dtype (a
        # derivative beyond the dtype's range, ~1/eps at d = 0, rounds to inf)
        rtol = 2 * tol(dtype)["rtol"]
        torch.testing.assert_close(out.double(), rout.to(dtype).double(), rtol=rtol, atol=0)
        torch.testing.assert_close(gd.double(), rgd.to(dtype).double(), rtol=rtol, atol=tol(dtype)["atol"])


def test_log_similarity_default_eps():
    d = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(protofast.log_similarity(d),
                               torch.log(torch.tensor([1 / 1e-4, 2 / (1 + 1e-4)], dtype=torch.float64)))


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("eps", [1e-4, 1e-2])
def test_gradcheck_log_similarity(eps):
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: protofast.log_similarity(x, eps), (d,))

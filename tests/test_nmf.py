"""protofast.batched_nmf / nmf / nmf_encode against the float64 per-class reference (SEMANTICS.md §5.1).

The reference itself is checked against an independent implementation (scikit-learn's multiplicative-update
NMF from the same initial factors) and against hand-made stopping-rule cases.
"""
from __future__ import annotations

import math

import pytest
import torch

import protofast
import protofast.ops.nmf as N
import protofast.reference.nmf as R


def lowrank(n, D, r, noise, seed, dtype=torch.float64):
    """A non-negative n×D matrix: rank-r non-negative product plus uniform noise (tie-free)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(n, r, generator=g, dtype=torch.float64) @ torch.rand(r, D, generator=g, dtype=torch.float64)
    return (A + noise * torch.rand(n, D, generator=g, dtype=torch.float64)).to(dtype)


def ragged_classes(dtype=torch.float64):
    """Classes of different sizes and difficulty: with tol=1e-3 they stop at different checks."""
    return [lowrank(40, 16, 1, 0.0, 1, dtype), lowrank(23, 16, 3, 0.1, 2, dtype), lowrank(31, 16, 6, 0.5, 3, dtype),
            lowrank(7, 16, 1, 1.0, 4, dtype), lowrank(1, 16, 1, 0.2, 5, dtype)]


@pytest.fixture
def nmf_backend(backend):
    if backend == "cpp":
        assert N._cpp_has_nmf(), "the C++ extension is built but has no NMF kernels"
    return backend


def check_against_reference(classes, rank, result, rtol=1e-9, atol=1e-12, iters_equal=True, **kw):
    refs = [R.nmf(a, rank, **kw) for a in classes]
    for k, (a, ref) in enumerate(zip(classes, refs)):
        n = a.shape[0]
        if iters_equal:
            assert int(result.n_iter[k]) == ref.n_iter, f"class {k}: stopped after {int(result.n_iter[k])} " \
                                                         f"updates, reference after {ref.n_iter}"
        torch.testing.assert_close(result.E[k, :n].double(), ref.E, rtol=rtol, atol=atol, msg=f"E of class {k}")
        assert bool((result.E[k, n:] == 0).all()), f"padded rows of class {k} are not 0"
        torch.testing.assert_close(result.B[k].double(), ref.B, rtol=rtol, atol=atol, msg=f"B of class {k}")
        assert math.isclose(float(result.err[k]), ref.err, rel_tol=max(rtol, 1e-12), abs_tol=atol), \
            f"err of class {k}: {float(result.err[k])} vs {ref.err}"
    return refs


# --------------------------------------------------------------------------------------------- the reference
def test_reference_matches_sklearn_mu_from_same_init():
    """An independent implementation: sklearn's MU (Frobenius), same initial W = E, H = B, no early stop."""
    sklearn = pytest.importorskip("sklearn.decomposition")
    A = lowrank(60, 24, 4, 0.3, 7)
    E0, B0 = R.init_factors(A, 3, seed=0)
    for iters in (1, 2, 37):
        ref = R.nmf(A, 3, max_iter=iters, tol=0, E0=E0, B0=B0)
        model = sklearn.NMF(3, solver="mu", init="custom", beta_loss="frobenius", max_iter=iters, tol=0)
        W = model.fit_transform(A.numpy(), W=E0.numpy().copy(), H=B0.numpy().copy())
        torch.testing.assert_close(ref.E, torch.from_numpy(W), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ref.B, torch.from_numpy(model.components_), rtol=1e-9, atol=1e-12)
        assert math.isclose(ref.err, model.reconstruction_err_, rel_tol=1e-9)
        assert ref.n_iter == iters


def test_reference_init_is_dff():
    """scale = √(mean(A)/p); E = |N(0,1)|·scale drawn first, then B, from a generator seeded per call."""
    A = lowrank(10, 6, 2, 0.1, 3)
    E, B = R.init_factors(A, 4, seed=5)
    g = torch.Generator().manual_seed(5)
    scale = math.sqrt(float(A.mean()) / 4)
    torch.testing.assert_close(E, (torch.randn(10, 4, generator=g).double() * scale).abs())
    torch.testing.assert_close(B, (torch.randn(4, 6, generator=g).double() * scale).abs())
    Ec, Bc = R.init_factors(A, 4, seed=5, init="clipped_gaussian")
    assert bool(((Ec == 0) | (Ec == E)).all()) and bool((Ec == 0).any()) and bool((Bc == 0).any())


def test_reference_stopping_rule_by_hand():
    A = lowrank(30, 10, 2, 0.2, 11)
    assert R.nmf(A, 2, tol=10.0).n_iter == 1                         # any change is too small: stop at t = 0
    assert R.nmf(A, 2, tol=0).n_iter == 200                           # tol = 0: no checks
    assert R.nmf(A, 2, tol=0, max_iter=17).n_iter == 17
    # the rule by hand: errors after every update from the same start
    E0, B0 = R.init_factors(A, 2)
    errs, E, B = [], E0, B0
    for _ in range(200):
        E, B = R.multiplicative_update(A, E, B)
        errs.append(R.approximation_error(A, E, B))
    err0 = R.approximation_error(A, E0, B0)
    for tol, every in ((1e-3, 10), (1e-3, 1), (3e-3, 7)):
        prev, expect = err0, 200
        for t in range(0, 200, every):
            if (prev - errs[t]) / err0 < tol:
                expect = t + 1
                break
            prev = errs[t]
        got = R.nmf(A, 2, tol=tol, check_every=every)
        assert got.n_iter == expect and expect < 200
        assert math.isclose(got.err, errs[expect - 1], rel_tol=1e-12)
    # squared error: relative changes are about twice as large, so it stops no earlier than 'fro'
    assert R.nmf(A, 2, tol=1e-3, stop_error="fro_squared").n_iter <= R.nmf(A, 2, tol=1e-3).n_iter


# --------------------------------------------------------------------------------------------- batched vs reference
@pytest.mark.parametrize("error_mode", ["stream", "gram"])
def test_batched_matches_reference_ragged(nmf_backend, error_mode):
    classes = ragged_classes()
    r = protofast.batched_nmf(classes, 3, tol=1e-3, error_mode=error_mode)
    refs = check_against_reference(classes, 3, r, rtol=1e-8, atol=1e-10, tol=1e-3)
    assert len({ref.n_iter for ref in refs}) >= 3, "fixture should make classes stop at different checks"
    assert r.B.shape == (5, 3, 16) and r.E.shape == (5, 40, 3)
    assert [e.shape[0] for e in r.encodings()] == [40, 23, 31, 7, 1]


def test_batched_padded_input_and_list_agree(nmf_backend):
    classes = ragged_classes()
    lengths = [a.shape[0] for a in classes]
    padded = torch.full((5, 45, 16), 7.0, dtype=torch.float64)   # junk in the padding must be ignored
    for k, a in enumerate(classes):
        padded[k, : a.shape[0]] = a
    r1 = protofast.batched_nmf(classes, 2, tol=1e-3)
    r2 = protofast.batched_nmf(padded, 2, tol=1e-3, lengths=torch.tensor(lengths))
    assert torch.equal(r1.n_iter, r2.n_iter)
    torch.testing.assert_close(r2.E[:, :40], r1.E, rtol=1e-12, atol=1e-14)
    assert bool((r2.E[:, 40:] == 0).all())
    torch.testing.assert_close(r2.B, r1.B, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape,rank", [((1, 5), 3), ((9, 1), 2), ((12, 7), 1), ((1, 1), 1)])
def test_batched_small_shapes(nmf_backend, shape, rank):
    a = lowrank(*shape, 1, 0.3, 21)
    r = protofast.batched_nmf([a, lowrank(4, shape[1], 1, 0.1, 22)], rank)
    check_against_reference([a, lowrank(4, shape[1], 1, 0.1, 22)], rank, r)


def test_all_zero_and_empty_class(nmf_backend):
    classes = [torch.zeros(6, 5, dtype=torch.float64), lowrank(8, 5, 2, 0.1, 3), torch.zeros(0, 5, dtype=torch.float64)]
    r = protofast.batched_nmf(classes, 2)
    check_against_reference(classes, 2, r)
    assert int(r.n_iter[0]) == 1 and float(r.err[0]) == 0.0 and bool((r.E[0] == 0).all())
    assert int(r.n_iter[2]) == 1 and float(r.err[2]) == 0.0


def test_negative_inputs_clipped(nmf_backend):
    a = lowrank(15, 8, 2, 0.2, 4) - 0.3
    r = protofast.batched_nmf([a], 2, tol=1e-3)
    check_against_reference([a.clamp(min=0)], 2, r, tol=1e-3)
    with pytest.raises(ValueError, match="clip_negative"):
        protofast.batched_nmf([a], 2, clip_negative=False)


def test_fro_squared_and_check_every(nmf_backend):
    classes = ragged_classes()
    for kw in (dict(stop_error="fro_squared", tol=1e-3), dict(check_every=1, tol=1e-3), dict(max_iter=13, tol=0),
               dict(init="clipped_gaussian", tol=1e-3)):
        check_against_reference(classes, 3, protofast.batched_nmf(classes, 3, **kw), rtol=1e-8, atol=1e-10, **kw)


def test_float32_close_to_float64_reference(nmf_backend):
    classes = ragged_classes()
    r = protofast.batched_nmf([a.float() for a in classes], 3, max_iter=50, tol=0)
    assert r.E.dtype == torch.float32
    check_against_reference(classes, 3, r, rtol=2e-3, atol=1e-4, max_iter=50, tol=0)


def test_nmf_single_matrix_and_seed(nmf_backend):
    a = lowrank(25, 9, 2, 0.2, 8)
    E, B, err, n_iter = protofast.nmf(a, 2, seed=3, tol=1e-3)
    ref = R.nmf(a, 2, seed=3, tol=1e-3)
    assert n_iter == ref.n_iter and math.isclose(err, ref.err, rel_tol=1e-9)
    torch.testing.assert_close(E, ref.E)
    torch.testing.assert_close(B, ref.B)
    # per-class seeds; the global RNG is untouched
    state = torch.get_rng_state()
    r = protofast.batched_nmf([a, a], 2, seed=[3, 4], max_iter=3, tol=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(r.B[0], R.nmf(a, 2, seed=3, max_iter=3, tol=0).B)
    torch.testing.assert_close(r.B[1], R.nmf(a, 2, seed=4, max_iter=3, tol=0).B)


def test_nmf_encode_fixed_basis(nmf_backend):
    classes = ragged_classes()[:3]
    basis = protofast.batched_nmf(classes, 3, max_iter=30, tol=0).B
    new = [lowrank(12, 16, 2, 0.2, 30 + k) for k in range(3)]
    r = protofast.nmf_encode(new, basis, tol=1e-3)
    assert torch.equal(r.B, basis)
    for k, a in enumerate(new):
        ref = R.nmf(a, 3, tol=1e-3, fixed_basis=basis[k])
        assert int(r.n_iter[k]) == ref.n_iter
        torch.testing.assert_close(r.E[k, :12], ref.E, rtol=1e-8, atol=1e-10)
        assert math.isclose(float(r.err[k]), ref.err, rel_tol=1e-9)
    # one shared basis [p, D]
    shared = protofast.nmf_encode(new, basis[0], max_iter=5, tol=0)
    torch.testing.assert_close(shared.E[1, :12], R.nmf(new[1], 3, max_iter=5, tol=0, fixed_basis=basis[0]).E)


def test_gram_error_close_to_streamed(nmf_backend):
    classes = ragged_classes()
    s = protofast.batched_nmf(classes, 3, max_iter=40, tol=0)
    g = protofast.batched_nmf(classes, 3, max_iter=40, tol=0, error_mode="gram")
    torch.testing.assert_close(g.err, s.err, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------- accelerated MU
def test_reference_inner_updates_by_hand():
    """inner_updates = m: the E rule m times with A Bᵀ, B Bᵀ fixed, then the B rule m times with Eᵀ A, Eᵀ E fixed;
    m = 1 is the plain update; the error never increases from one inner step to the next."""
    A = lowrank(25, 9, 3, 0.3, 12)
    E0, B0 = R.init_factors(A, 3)
    E1, B1 = R.multiplicative_update(A, E0, B0)
    Ep, Bp = R.multiplicative_update(A, E0, B0, inner_updates=1)
    assert torch.equal(E1, Ep) and torch.equal(B1, Bp)
    E, errs = E0, [R.approximation_error(A, E0, B0)]
    for _ in range(4):
        E = E * (A @ B0.t()) / (E @ (B0 @ B0.t()))
        errs.append(R.approximation_error(A, E, B0))
    B = B0
    for _ in range(4):
        B = B * (E.t() @ A) / ((E.t() @ E) @ B)
        errs.append(R.approximation_error(A, E, B))
    E4, B4 = R.multiplicative_update(A, E0, B0, inner_updates=4)
    torch.testing.assert_close(E4, E, rtol=1e-14, atol=0)
    torch.testing.assert_close(B4, B, rtol=1e-14, atol=0)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs
    # it reaches 200 plain updates' error in far fewer updates
    plain = R.nmf(A, 3, max_iter=200, tol=0, E0=E0, B0=B0)
    fast = R.nmf(A, 3, max_iter=40, tol=0, E0=E0, B0=B0, inner_updates=10)
    assert fast.err <= plain.err * (1 + 1e-9)


@pytest.mark.parametrize("kw", [dict(tol=1e-3), dict(tol=0, max_iter=25, error_mode="gram"),
                                dict(tol=1e-3, check_every=3, stop_error="fro_squared")])
def test_batched_inner_updates_match_reference(nmf_backend, kw):
    """Values and the stop iteration per class against the float64 reference with the same inner_updates."""
    classes = ragged_classes()
    r = protofast.batched_nmf(classes, 3, inner_updates=3, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "error_mode"}
    check_against_reference(classes, 3, r, rtol=1e-8, atol=1e-10, inner_updates=3, **ref_kw)
    plain = protofast.batched_nmf(classes, 3, inner_updates=1, **kw)
    assert not torch.equal(plain.B, r.B)


def test_inner_updates_encode_and_run_path(nmf_backend, monkeypatch):
    """Fixed basis (only the E rule repeats) and, on the C++ backend, the update-by-update loop equals the
    whole-loop-per-class path bitwise with inner_updates > 1."""
    classes = ragged_classes()[:3]
    basis = torch.rand(3, 16, dtype=torch.float64) + 0.1
    r = protofast.nmf_encode(classes, basis, tol=0, max_iter=6, inner_updates=4)
    for k, a in enumerate(classes):
        ref = R.nmf(a, 3, tol=0, max_iter=6, fixed_basis=basis, inner_updates=4)
        torch.testing.assert_close(r.E[k, :a.shape[0]], ref.E, rtol=1e-9, atol=1e-12)
    if nmf_backend == "cpp":
        monkeypatch.setattr(N, "_RUN_CLASSES_PER_THREAD", 10**9)
        step = protofast.batched_nmf(classes, 3, tol=1e-3, inner_updates=5)
        monkeypatch.setattr(N, "_RUN_CLASSES_PER_THREAD", 0)
        run = protofast.batched_nmf(classes, 3, tol=1e-3, inner_updates=5)
        assert torch.equal(step.E, run.E) and torch.equal(step.B, run.B) and torch.equal(step.n_iter, run.n_iter)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    a = lowrank(6, 4, 1, 0.1, 0)
    with pytest.raises(TypeError, match="rank"):
        protofast.batched_nmf([a], 2.0)
    with pytest.raises(ValueError, match="rank"):
        protofast.batched_nmf([a], 0)
    with pytest.raises(ValueError, match="tol"):
        protofast.batched_nmf([a], 1, tol=-1)
    with pytest.raises(ValueError, match="inner_updates"):
        protofast.batched_nmf([a], 1, inner_updates=0)
    with pytest.raises(TypeError, match="inner_updates"):
        protofast.batched_nmf([a], 1, inner_updates=2.0)
    with pytest.raises(ValueError, match="eps"):
        protofast.batched_nmf([a], 1, eps=0)
    with pytest.raises(ValueError, match="check_every"):
        protofast.batched_nmf([a], 1, check_every=0)
    with pytest.raises(ValueError, match="stop_error"):
        protofast.batched_nmf([a], 1, stop_error="l1")
    with pytest.raises(ValueError, match="init"):
        protofast.batched_nmf([a], 1, init="random")
    with pytest.raises(ValueError, match="error_mode"):
        protofast.batched_nmf([a], 1, error_mode="fast")
    with pytest.raises(ValueError, match=r"features\[1\] has D=5"):
        protofast.batched_nmf([a, torch.rand(3, 5, dtype=torch.float64)], 1)
    with pytest.raises(TypeError, match=r"features\[1\] has dtype"):
        protofast.batched_nmf([a, a.float()], 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        protofast.batched_nmf([a.half()], 1)
    with pytest.raises(TypeError, match="floating-point"):
        protofast.batched_nmf([torch.ones(3, 4, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match=r"features\[0\] must be \[n_k, D\]"):
        protofast.batched_nmf([torch.rand(3)], 1)
    with pytest.raises(ValueError, match="K >= 1"):
        protofast.batched_nmf([], 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        protofast.batched_nmf([torch.tensor([[1.0, float("nan")]])], 1)
    with pytest.raises(ValueError, match="lengths"):
        protofast.batched_nmf(a[None], 1, lengths=[7])
    with pytest.raises(ValueError, match="lengths must be"):
        protofast.batched_nmf(a[None], 1, lengths=[1, 2])
    with pytest.raises(ValueError, match="lengths is only"):
        protofast.batched_nmf([a], 1, lengths=[6])
    with pytest.raises(ValueError, match="fixed_basis must be"):
        protofast.nmf_encode([a], torch.rand(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        protofast.nmf_encode([a], -torch.rand(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="fixed_basis must have"):
        protofast.nmf_encode([a], torch.rand(2, 4))
    with pytest.raises(ValueError, match="A must be"):
        protofast.nmf(a[None], 1)
    with pytest.raises(ValueError, match="seed"):
        protofast.batched_nmf([a, a], 1, seed=[1])
    with pytest.raises(ValueError, match="E0 must be a tensor of shape"):
        protofast.batched_nmf([a], 2, E0=torch.rand(1, 5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="B0 must be finite and non-negative"):
        protofast.batched_nmf([a], 2, B0=-torch.rand(1, 2, 4, dtype=torch.float64))


# --------------------------------------------------------------------------------------------- the C++ kernel
@pytest.fixture
def cpp_nmf(monkeypatch):
    from conftest import _require_cpp

    _require_cpp("cpp")
    assert N._cpp_has_nmf()
    monkeypatch.setenv("PROTOFAST_BACKEND", "cpp")


def test_cpp_several_row_tiles_and_thread_count(cpp_nmf):
    """Classes longer than one row tile (256 rows), D not a multiple of the 16 lanes; bitwise the same result
    on 1 and 2 threads (fixed tiling and reduction order)."""
    classes = [lowrank(700, 37, 3, 0.2, 1), lowrank(300, 37, 2, 0.1, 2), lowrank(5, 37, 1, 0.1, 3)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = protofast.batched_nmf(classes, 4, tol=1e-3)
        torch.set_num_threads(2)
        two = protofast.batched_nmf(classes, 4, tol=1e-3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.E, two.E) and torch.equal(one.B, two.B) and torch.equal(one.err, two.err)
    check_against_reference(classes, 4, one, rtol=1e-8, atol=1e-10, tol=1e-3)


def test_cpp_matches_torch_float32(cpp_nmf, monkeypatch):
    classes = [a.float() for a in ragged_classes()] + [lowrank(300, 20, 2, 0.3, 9, torch.float32)[:, :16]]
    cpp = protofast.batched_nmf(classes, 3, max_iter=60, tol=0)
    monkeypatch.setenv("PROTOFAST_BACKEND", "torch")
    ref = protofast.batched_nmf(classes, 3, max_iter=60, tol=0)
    torch.testing.assert_close(cpp.E, ref.E, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cpp.B, ref.B, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cpp.err, ref.err, rtol=1e-5, atol=1e-6)


def test_class_blocks_and_run_path_do_not_change_results(nmf_backend, monkeypatch):
    """The update-by-update loop over cache-sized blocks of classes (PROTOFAST_NMF_BLOCK_BYTES; one class per
    block here), over all classes at once, and the C++ whole-loop-per-class path (nmf_run) give the same result
    (bitwise with the C++ kernel, whose tiles are fixed per class)."""
    classes = ragged_classes()
    monkeypatch.setattr(N, "_RUN_CLASSES_PER_THREAD", 10**9)        # update by update
    for kw in (dict(tol=1e-3), dict(tol=1e-3, error_mode="gram", stop_error="fro_squared"),
               dict(max_iter=7, tol=0, fixed_basis=torch.rand(3, 16, dtype=torch.float64))):
        monkeypatch.delenv("PROTOFAST_NMF_BLOCK_BYTES", raising=False)
        whole = protofast.batched_nmf(classes, 3, **kw)
        monkeypatch.setenv("PROTOFAST_NMF_BLOCK_BYTES", "1")
        runs = [protofast.batched_nmf(classes, 3, **kw)]
        if nmf_backend == "cpp":
            monkeypatch.setattr(N, "_RUN_CLASSES_PER_THREAD", 0)     # nmf_run: each class's loop on one thread
            runs.append(protofast.batched_nmf(classes, 3, **kw))
            monkeypatch.setattr(N, "_RUN_CLASSES_PER_THREAD", 10**9)
        for other in runs:
            assert torch.equal(whole.n_iter, other.n_iter)
            if nmf_backend == "cpp":
                assert torch.equal(whole.E, other.E) and torch.equal(whole.B, other.B)
                assert torch.equal(whole.err, other.err)
            torch.testing.assert_close(other.E, whole.E, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(other.B, whole.B, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(other.err, whole.err, rtol=1e-12, atol=1e-14)
    monkeypatch.setenv("PROTOFAST_NMF_BLOCK_BYTES", "lots")
    with pytest.raises(ValueError, match="PROTOFAST_NMF_BLOCK_BYTES"):
        protofast.batched_nmf(classes, 3)

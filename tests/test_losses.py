"""cluster_separation_costs, masked_l1 and mean_distance_loss against the float64 reference.

SEMANTICS.md §1.3 / §1.4 (multiply-then-max cluster and separation, first occurrence over the whole row, masked
zeros compete, saturation), §3.2 (quanproto's multi-label form) and §1.7 (the mean-distance loss).
"""
from __future__ import annotations

import pytest
import torch

import protofast
import protofast.reference as ref
from conftest import as_reference, assert_close, grads, identity_matrix, make_inputs

# --------------------------------------------------------------------------------------------- fixtures
B, M, K = 6, 12, 4          # 3 prototypes per class
MAX_DIST = 10.0


def _min_distances(dtype=torch.float64, seed=0, low=0.5, high=8.0, shape=(B, M)):
    """Distinct min distances in (low, high): tie-free for the max / min over prototypes, below max_dist."""
    g = torch.Generator().manual_seed(seed)
    d = low + (high - low) * torch.rand(shape, generator=g, dtype=torch.float64)
    return d.to(dtype).requires_grad_()


LABELS = torch.tensor([0, 3, 1, 1, 2, 0])


def _upstreams(dtype):
    return (torch.tensor(0.7, dtype=dtype), torch.tensor(-1.3, dtype=dtype), torch.tensor(0.4, dtype=dtype))


def check_costs(d, labels, identity, max_dist, exact, dtype):
    out = protofast.cluster_separation_costs(d, labels, identity, max_dist, exact=exact)
    assert len(out) == 3 and all(t.shape == () and t.dtype == d.dtype for t in out)
    (dr,) = as_reference(d)
    rout = ref.cluster_separation_costs(dr, labels, identity, max_dist, exact=exact)
    for name, a, b in zip(("cluster", "separation", "avg_separation"), out, rout):
        assert_close(a, b, dtype, name)
    ups = _upstreams(dtype)
    (gd,) = grads(out, (d,), ups)
    (rgd,) = grads(rout, (dr,), tuple(u.double() for u in ups))
    assert_close(gd, rgd, dtype, "grad min_distances")
    return out, gd


# --------------------------------------------------------------------------------------------- single label
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("exact", [False, True], ids=["masked_max", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cluster_separation_parity(dtype, exact):
    d = _min_distances(dtype)
    check_costs(d, LABELS, identity_matrix(M, K), MAX_DIST, exact, dtype)


@pytest.mark.usefixtures("backend")
def test_cluster_separation_pruned_identity():
    """After pruning, I is an arbitrary row subset: uneven classes, a shared prototype, unsorted rows."""
    identity = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]])
    d = _min_distances(shape=(4, 7), seed=3)
    for exact in (False, True):
        check_costs(d, torch.tensor([2, 0, 1, 2]), identity, MAX_DIST, exact, torch.float64)


@pytest.mark.usefixtures("backend")
def test_cluster_separation_values_by_hand():
    d = torch.tensor([[1.0, 4.0, 2.0, 3.0], [5.0, 0.5, 6.0, 7.0]], dtype=torch.float64)
    identity = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    cluster, separation, avg = protofast.cluster_separation_costs(d, torch.tensor([0, 1]), identity, 10.0)
    # own class min: 1 (sample 0), 6 (sample 1); other class min: 2, 0.5; other class mean: 2.5, 2.75
    assert cluster.item() == pytest.approx(3.5)
    assert separation.item() == pytest.approx(1.25)
    assert avg.item() == pytest.approx(2.625)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("exact", [False, True], ids=["masked_max", "exact"])
def test_saturation(exact):
    """All own-class distances above max_dist: the multiply-then-max cluster saturates at max_dist with zero
    gradient (masked zeros win); exact=True is the true masked minimum with gradient 1/B to it."""
    d = torch.tensor([[12.0, 11.0, 1.0, 2.0], [3.0, 4.0, 15.0, 13.0]], dtype=torch.float64, requires_grad=True)
    identity = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    labels = torch.tensor([0, 1])
    (cluster, separation, avg), gd = check_costs(d, labels, identity, 10.0, exact, torch.float64)
    gc = torch.autograd.grad(protofast.cluster_separation_costs(d, labels, identity, 10.0, exact=exact)[0], d)[0]
    if exact:
        assert cluster.item() == pytest.approx((11.0 + 13.0) / 2)
        expected = torch.zeros_like(d)
        expected[0, 1] = expected[1, 3] = 0.5
        torch.testing.assert_close(gc, expected, rtol=0, atol=0)
    else:
        assert cluster.item() == 10.0
        assert torch.count_nonzero(gc) == 0
    assert separation.item() == pytest.approx((1.0 + 3.0) / 2)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("masked_first", [True, False])
def test_masked_zero_ties_first_occurrence(masked_first):
    """A masked zero and an unmasked entry at exactly max_dist tie at 0 in the max: the first over the whole row
    wins; if it is the masked one the sample passes no gradient (SEMANTICS §1.4)."""
    if masked_first:   # prototype 0 is of class 1 (masked for label 0), prototype 1 of class 0 at d = max_dist
        identity = torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]])
    else:
        identity = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    d = torch.tensor([[3.0, 10.0, 14.0, 2.0]], dtype=torch.float64, requires_grad=True)
    if not masked_first:
        d = torch.tensor([[10.0, 3.0, 14.0, 2.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0])
    cluster = protofast.cluster_separation_costs(d, labels, identity, 10.0)[0]
    assert cluster.item() == 10.0
    (gc,) = torch.autograd.grad(cluster, d)
    (dr,) = as_reference(d)
    (rgc,) = torch.autograd.grad(ref.cluster_separation_costs(dr, labels, identity, 10.0)[0], dr)
    torch.testing.assert_close(gc, rgc, rtol=0, atol=0)
    if masked_first:
        assert torch.count_nonzero(gc) == 0
    else:
        assert gc.tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.usefixtures("backend")
def test_tied_minimum_distances_first_prototype_wins():
    d = torch.tensor([[2.0, 2.0, 1.0, 1.0, 5.0]], dtype=torch.float64, requires_grad=True)
    identity = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0]])
    for exact in (False, True):
        cluster, separation, _ = protofast.cluster_separation_costs(d, torch.tensor([0]), identity, 10.0, exact)
        gc, gs = (torch.autograd.grad(t, d, retain_graph=True)[0] for t in (cluster, separation))
        assert gc.tolist() == [[1.0, 0, 0, 0, 0]]
        assert gs.tolist() == [[0, 0, 1.0, 0, 0]]


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("identity_dtype", [torch.bool, torch.int64, torch.int32, torch.float64, torch.float32])
def test_identity_dtypes(identity_dtype):
    d = _min_distances(torch.float32)
    identity = identity_matrix(M, K)
    expected = protofast.cluster_separation_costs(d, LABELS, identity, MAX_DIST)
    got = protofast.cluster_separation_costs(d, LABELS, identity.to(identity_dtype), MAX_DIST)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ml = torch.nn.functional.one_hot(LABELS, K).float()
    ml[0, 2] = 1
    expected = protofast.cluster_separation_costs(d, ml, identity, MAX_DIST)
    got = protofast.cluster_separation_costs(d, ml, identity.to(identity_dtype), MAX_DIST)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_label_dtypes(label_dtype):
    d = _min_distances()
    expected = protofast.cluster_separation_costs(d, LABELS, identity_matrix(M, K), MAX_DIST)
    got = protofast.cluster_separation_costs(d, LABELS.to(label_dtype), identity_matrix(M, K), MAX_DIST)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.usefixtures("backend")
def test_max_dist_as_int():
    d = _min_distances()
    a = protofast.cluster_separation_costs(d, LABELS, identity_matrix(M, K), 10)
    b = protofast.cluster_separation_costs(d, LABELS, identity_matrix(M, K), 10.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.usefixtures("backend")
def test_costs_on_protopnet_defaults_shape():
    """ProtoPNet-like head: min distances from the fused op, identity in contiguous blocks, max_dist = C·h·w."""
    f, p = make_inputs((4, 8, 3, 3), (10, 8, 1, 1), torch.float64)
    d, _ = protofast.prototype_min_distances(f, p)
    identity = identity_matrix(10, 5)
    labels = torch.tensor([4, 0, 2, 2])
    out = protofast.cluster_separation_costs(d, labels, identity, 8.0)
    fr, pr = as_reference(f, p)
    rout = ref.cluster_separation_costs(ref.prototype_min_distances(fr, pr)[0], labels, identity, 8.0)
    loss = 0.8 * out[0] - 0.08 * out[1]
    rloss = 0.8 * rout[0] - 0.08 * rout[1]
    assert_close(loss, rloss)
    for a, b in zip(grads(loss, (f, p), None), grads(rloss, (fr, pr), None)):
        assert_close(a, b)


# --------------------------------------------------------------------------------------------- multi-label
def _multilabel_targets(dtype=torch.float64):
    t = torch.zeros(B, K, dtype=dtype)
    t[torch.arange(B), LABELS] = 1
    t[0, 2] = t[3, 3] = t[3, 0] = 1
    return t


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("exact", [False, True], ids=["masked_max", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "many_chunks"])
def test_multilabel_parity(request, dtype, exact, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    d = _min_distances(dtype)
    check_costs(d, _multilabel_targets(dtype), identity_matrix(M, K), MAX_DIST, exact, dtype)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("target_dtype", [torch.bool, torch.int64, torch.float32])
def test_multilabel_target_dtypes(target_dtype):
    d = _min_distances()
    t = _multilabel_targets()
    expected = protofast.cluster_separation_costs(d, t, identity_matrix(M, K), MAX_DIST)
    got = protofast.cluster_separation_costs(d, t.to(target_dtype), identity_matrix(M, K), MAX_DIST)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.usefixtures("backend")
def test_multilabel_one_hot_equals_single_label():
    """One positive label per sample: quanproto's average over positive classes is the single-label cluster."""
    d = _min_distances()
    identity = identity_matrix(M, K)
    single = protofast.cluster_separation_costs(d, LABELS, identity, MAX_DIST)
    multi = protofast.cluster_separation_costs(d, torch.nn.functional.one_hot(LABELS, K).double(), identity,
                                               MAX_DIST)
    torch.testing.assert_close(multi[0], single[0])
    torch.testing.assert_close(multi[2], single[2])


@pytest.mark.usefixtures("backend")
def test_multilabel_saturation_and_gradient():
    d = torch.tensor([[12.0, 11.0, 1.0, 2.0, 4.0, 3.0]], dtype=torch.float64, requires_grad=True)
    identity = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    t = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    cluster, separation, avg = protofast.cluster_separation_costs(d, t, identity, 10.0)
    # class 0 saturates (10), class 1 → 1; separation: class 2 → 3; avg: mean over the other class's prototypes
    assert cluster.item() == pytest.approx((10.0 + 1.0) / 2)
    assert separation.item() == pytest.approx(3.0)
    assert avg.item() == pytest.approx(3.5)
    (gc,) = torch.autograd.grad(cluster, d)
    assert gc.tolist() == [[0.0, 0.0, 0.5, 0.0, 0.0, 0.0]]


# --------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("exact", [False, True], ids=["masked_max", "exact"])
@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_gradcheck_cluster_separation(exact, multilabel):
    d = _min_distances(seed=4)
    labels = _multilabel_targets() if multilabel else LABELS
    identity = identity_matrix(M, K)
    assert torch.autograd.gradcheck(
        lambda x: protofast.cluster_separation_costs(x, labels, identity, MAX_DIST, exact=exact), (d,))


# --------------------------------------------------------------------------------------------- masked l1
@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_masked_l1_parity(dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(K, M, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    identity = identity_matrix(M, K)
    out = protofast.masked_l1(W, identity)
    assert out.shape == () and out.dtype == dtype
    (Wr,) = as_reference(W)
    rout = ref.masked_l1(Wr, identity)
    assert_close(out, rout, dtype)
    (gw,) = grads(out, (W,), torch.tensor(1.7, dtype=dtype))
    (rgw,) = grads(rout, (Wr,), torch.tensor(1.7, dtype=torch.float64))
    assert_close(gw, rgw, dtype)


@pytest.mark.usefixtures("backend")
def test_masked_l1_zero_weight_has_zero_gradient():
    W = torch.tensor([[0.0, -2.0], [3.0, 0.0], [0.0, 1.0]], requires_grad=True)   # [K=3, M=2]
    identity = torch.tensor([[1, 0, 0], [0, 0, 1]])                                # prototype 0 → class 0, 1 → 2
    out = protofast.masked_l1(W, identity)
    assert out.item() == 2.0 + 3.0 + 0.0
    (gw,) = torch.autograd.grad(out, W)
    assert gw.tolist() == [[0.0, -1.0], [1.0, 0.0], [0.0, 0.0]]


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("identity_dtype", [torch.bool, torch.int64, torch.float64])
def test_masked_l1_identity_dtypes(identity_dtype):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(K, M, generator=g)
    identity = identity_matrix(M, K)
    torch.testing.assert_close(protofast.masked_l1(W, identity.to(identity_dtype)), protofast.masked_l1(W, identity))


@pytest.mark.usefixtures("backend")
def test_gradcheck_masked_l1():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(K, M, generator=g, dtype=torch.float64)
    W = (W + 0.2 * torch.sign(W)).requires_grad_()            # away from 0
    identity = identity_matrix(M, K)
    assert torch.autograd.gradcheck(lambda w: protofast.masked_l1(w, identity), (W,))


# --------------------------------------------------------------------------------------------- mean distance
MD_SHAPES = [
    pytest.param((3, 5, 4, 5), (8, 5, 1, 1), id="1x1"),
    pytest.param((3, 5, 4, 5), (8, 5), id="flat"),
    pytest.param((3, 5, 4, 5), (8, 5, 2, 3), id="hw"),
    pytest.param((3, 6, 5), (8, 5), id="set"),
]
MD_LABELS = torch.tensor([1, 3, 1])
MD_SELECTIONS = [pytest.param(None, "own", id="all"), pytest.param(MD_LABELS, "own", id="own"),
                 pytest.param(MD_LABELS, "other", id="other")]


def _md_identity():
    """8 prototypes, 4 classes, uneven (class 2 owns 3, class 3 owns 1) and one shared prototype."""
    I = torch.zeros(8, 4)
    for m, k in enumerate([0, 0, 1, 1, 2, 2, 2, 3]):
        I[m, k] = 1
    I[4, 1] = 1
    return I


@pytest.mark.parametrize("mode", ["closed_form", "exact"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("labels, classes", MD_SELECTIONS)
@pytest.mark.parametrize("fs, ps", MD_SHAPES)
def test_mean_distance_parity(fs, ps, labels, classes, metric, mode):
    """Values and gradients equal the materialised reference mean in float64 to 1e-10 relative."""
    f, p = make_inputs(fs, ps, torch.float64, metric, min_separation=0, min_value=0.01)
    identity = None if labels is None else _md_identity()
    loss = protofast.mean_distance_loss(f, p, labels, identity, metric=metric, mode=mode, classes=classes)
    assert loss.shape == () and loss.dtype == torch.float64
    fr, pr = as_reference(f, p)
    rloss = ref.mean_distance_loss(fr, pr, labels, identity, metric=metric, classes=classes)
    torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=0)
    up = torch.tensor(-2.5, dtype=torch.float64)
    for name, a, b in zip(("features", "prototypes"), grads(loss, (f, p), up), grads(rloss, (fr, pr), up)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()),
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("mode", ["closed_form", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_mean_distance_low_precision(dtype, mode):
    f, p = make_inputs((3, 5, 4, 5), (8, 5, 1, 1), dtype, min_separation=0)
    loss = protofast.mean_distance_loss(f, p, MD_LABELS, _md_identity(), mode=mode)
    assert loss.dtype == dtype
    fr, pr = as_reference(f, p)
    rloss = ref.mean_distance_loss(fr, pr, MD_LABELS, _md_identity())
    assert_close(loss, rloss, dtype)
    for a, b in zip(grads(loss, (f, p), None), grads(rloss, (fr, pr), None)):
        assert a.dtype == dtype
        assert_close(a, b, dtype)


def test_mean_distance_many_chunks(small_chunks):
    f, p = make_inputs((3, 5, 4, 5), (8, 5, 2, 2), torch.float64, min_separation=0)
    for labels, classes in ((None, "own"), (MD_LABELS, "other")):
        identity = None if labels is None else _md_identity()
        loss = protofast.mean_distance_loss(f, p, labels, identity, mode="exact", classes=classes)
        fr, pr = as_reference(f, p)
        rloss = ref.mean_distance_loss(fr, pr, labels, identity, classes=classes)
        torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=0)
        for a, b in zip(grads(loss, (f, p), None), grads(rloss, (fr, pr), None)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _clamped_fixture():
    """One sample whose patches all equal one vector v, and prototypes equal to v: every distance is 0 in real
    arithmetic, and the expanded form rounds to tiny values of both signs. Returns a seed where the closed form
    (which skips the relu) comes out negative."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(7, generator=g, dtype=torch.float64) * 10
        f = v[None, :, None, None].expand(1, 7, 3, 3).contiguous().requires_grad_()
        p = v[None, :].expand(4, 7).contiguous().requires_grad_()
        if protofast.mean_distance_loss(f, p).item() < 0:
            return f, p
    raise AssertionError("no seed makes the expanded distance round below zero")


def test_mean_distance_exact_mode_clamps_like_the_reference():
    f, p = _clamped_fixture()
    closed = protofast.mean_distance_loss(f, p)
    exact = protofast.mean_distance_loss(f, p, mode="exact")
    rloss = ref.mean_distance_loss(f, p)
    assert closed.item() < 0, "the closed form skips the relu (documented quirk)"
    assert exact.item() >= 0 and rloss.item() >= 0
    scale = float((f.detach() ** 2).sum(1).mean())              # the energies whose rounding the clamp absorbs
    assert abs(exact.item() - rloss.item()) <= 1e-14 * scale
    for a, b in zip(grads(exact, (f, p), None), grads(rloss, (f, p), None)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_mean_distance_exact_mode_mixed_clamped_and_far():
    """Half the prototypes sit on patches (clamped distances), half are far: exact mode equals the reference
    to 1e-10 relative, values and gradients."""
    f, p = make_inputs((2, 4, 3, 3), (6, 4), torch.float64, min_separation=0)
    p = p.detach().clone()
    p[0] = f[0, :, 1, 1].detach()
    p[1] = f[1, :, 0, 2].detach()
    p[2] = f[1, :, 2, 2].detach()
    p.requires_grad_()
    for labels, classes in ((None, "own"), (MD_LABELS[:2], "own"), (MD_LABELS[:2], "other")):
        identity = None
        if labels is not None:
            identity = _md_identity()[:6].clone()
            identity[5, 3] = 1      # class 3 needs a prototype among the first 6
        loss = protofast.mean_distance_loss(f, p, labels, identity, mode="exact", classes=classes)
        rloss = ref.mean_distance_loss(f, p, labels, identity, classes=classes)
        torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=0)
        for a, b in zip(grads(loss, (f, p), None), grads(rloss, (f, p), None)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mean_distance_reading_b():
    """Reading (B) of the seed: the mean of the fused op's minima, gradient routed to the argmins."""
    f, p = make_inputs((3, 4, 3, 3), (5, 4), torch.float64)
    loss = protofast.prototype_min_distances(f, p)[0].mean()
    fr, pr = as_reference(f, p)
    rloss = ref.mean_min_distance_loss(ref.prototype_min_distances(fr, pr)[0])
    assert_close(loss, rloss)
    for a, b in zip(grads(loss, (f, p), None), grads(rloss, (fr, pr), None)):
        assert_close(a, b)


@pytest.mark.parametrize("mode", ["closed_form", "exact"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("labels, classes", MD_SELECTIONS)
def test_gradcheck_mean_distance(labels, classes, metric, mode):
    f, p = make_inputs((3, 3, 3, 3), (8, 3, 1, 2), torch.float64, metric, min_separation=0, min_value=0.05)
    identity = None if labels is None else _md_identity()
    assert torch.autograd.gradcheck(
        lambda a, b: protofast.mean_distance_loss(a, b, labels, identity, metric=metric, mode=mode,
                                                  classes=classes), (f, p))


@pytest.mark.parametrize("mode", ["closed_form", "exact"])
@pytest.mark.parametrize("labels, classes", [(torch.tensor([1, 1]), "own"), (torch.tensor([0, 0]), "other")],
                         ids=["own_class_without_prototypes", "no_other_class_prototypes"])
def test_mean_distance_empty_selection_raises(mode, labels, classes):
    """When the labels select no prototype the mean is 0/0: both modes must raise, not return NaN."""
    f, p = make_inputs((2, 3, 3, 3), (4, 3), torch.float64, min_separation=0)
    identity = torch.zeros(4, 2)
    identity[:, 0] = 1                  # every prototype belongs to class 0; class 1 has none
    with pytest.raises(ValueError, match="prototype"):
        protofast.mean_distance_loss(f, p, labels, identity, mode=mode, classes=classes)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M", [31, 32, 33, 100, 257])
def test_long_rows_ties_and_nan_match_reference(dtype, M):
    """Rows long enough for the C++ kernel's SIMD lanes (16 floats / 8 doubles, plus a scalar tail): integer-valued
    distances with many exact ties spread over lanes, chunks and the tail, masked zeros competing, and NaN rows;
    the winners (seen through the gradients) must be the first occurrences, as in the reference."""
    g = torch.Generator().manual_seed(M)
    B, K = 12, 5
    d = torch.randint(0, 6, (B, M), generator=g).to(dtype)
    d[3, :] = 10.0                       # all ties at max_dist: masked zeros tie with the unmasked
    d[4, M - 1] = 0.0                    # a unique minimum in the tail / last lane
    d[5, 7] = float("nan")               # NaN wins (first NaN), value NaN
    d[5, M - 2] = float("nan")
    identity = torch.zeros(M, K)
    identity[torch.arange(M), torch.randint(0, K, (M,), generator=g)] = 1
    identity[:K, :] = torch.eye(K)       # every class owns a prototype
    labels = torch.randint(0, K, (B,), generator=g)
    d.requires_grad_()
    dr = d.detach().double().requires_grad_()
    for exact in (False, True):
        got = protofast.cluster_separation_costs(d, labels, identity, 10.0, exact)
        want = ref.cluster_separation_costs(dr, labels, identity, 10.0, exact)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6, equal_nan=True)
        for t, r in zip(got[:2], want[:2]):
            (gd,) = torch.autograd.grad(t, d, retain_graph=True)
            (rgd,) = torch.autograd.grad(r, dr, retain_graph=True)
            assert torch.equal(gd != 0, rgd != 0), "a different prototype won"
            torch.testing.assert_close(gd.double(), rgd, rtol=1e-6, atol=1e-9, equal_nan=True)

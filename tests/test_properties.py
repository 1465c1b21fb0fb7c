"""Property tests: random shapes and layouts against the float64 reference (hypothesis)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protofast
import protofast.reference as ref
from conftest import as_reference, assert_close, grads, identity_matrix

SETTINGS = settings(max_examples=25, deadline=None, database=None,  # no .hypothesis/ written into the checkout
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def layouts(draw):
    """(features shape, prototypes shape, metric): NCHW maps with 1×1 / [M, D] / h×w prototypes, or sets."""
    B = draw(st.integers(1, 3))
    M = draw(st.integers(1, 6))
    D = draw(st.integers(1, 6))
    metric = draw(st.sampled_from(["l2", "cosine"]))
    if draw(st.booleans()):                                   # set [B, N, D]
        N = draw(st.integers(1, 9))
        proto = draw(st.sampled_from([(M, D), (M, D, 1, 1)]))
        return (B, N, D), proto, metric
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["flat", "1x1", "hw"]))
    if kind == "flat":
        return (B, D, H, W), (M, D), metric
    if kind == "1x1":
        return (B, D, H, W), (M, D, 1, 1), metric
    h, w = draw(st.integers(1, H)), draw(st.integers(1, W))
    return (B, D, H, W), (M, D, h, w), metric


def _random(shape, seed, integer):
    g = torch.Generator().manual_seed(seed)
    if integer:
        return torch.randint(-2, 3, shape, generator=g).double()
    return torch.randn(shape, generator=g, dtype=torch.float64)


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1))
def test_min_distances_match_reference(backend, layout, seed):
    """Values equal the reference; the op's argmin points at a minimum of the reference map; where the minimum
    is unique by a margin, the gradients equal the reference's."""
    fs, ps, metric = layout
    f = _random(fs, seed, False).requires_grad_()
    p = _random(ps, seed + 1, False).requires_grad_()
    values, argmin = protofast.prototype_min_distances(f, p, metric)
    fr, pr = as_reference(f, p)
    rmap = ref.prototype_distance_maps(fr, pr, metric).flatten(2)
    rv = rmap.min(2).values
    assert_close(values, rv)
    assert ((argmin >= 0) & (argmin < rmap.shape[2])).all()
    assert_close(rmap.gather(2, argmin[..., None]).squeeze(2), rv)
    gap = rmap.topk(min(2, rmap.shape[2]), dim=2, largest=False).values
    tie_free = rmap.shape[2] == 1 or bool(((gap[..., 1] - gap[..., 0]) > 1e-6).all())
    if tie_free:
        up = _random(values.shape, seed + 2, False)
        for a, b in zip(grads(values, (f, p), up), grads(rv, (fr, pr), up)):
            assert_close(a, b)


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1), fp32=st.booleans())
def test_integer_inputs_first_occurrence(backend, layout, seed, fp32):
    """Small integers are exact in float32 and full of exact ties: argmins are the reference's first occurrence
    and values and gradients are bitwise the reference's (squared L2)."""
    fs, ps, _ = layout
    dtype = torch.float32 if fp32 else torch.float64
    f = _random(fs, seed, True).to(dtype).requires_grad_()
    p = _random(ps, seed + 1, True).to(dtype).requires_grad_()
    values, argmin = protofast.prototype_min_distances(f, p)
    fr, pr = as_reference(f, p)
    rv, ra = ref.prototype_min_distances(fr, pr)
    torch.testing.assert_close(argmin, ra, rtol=0, atol=0)
    torch.testing.assert_close(values.double(), rv, rtol=0, atol=0)
    up = _random(values.shape, seed + 2, True)
    for a, b in zip(grads(values, (f, p), up.to(dtype)), grads(rv, (fr, pr), up)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=0)


@SETTINGS
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1))
def test_distance_maps_match_reference(layout, seed):
    fs, ps, metric = layout
    f = _random(fs, seed, False)
    p = _random(ps, seed + 1, False)
    maps = protofast.prototype_distance_maps(f, p, metric)
    rmaps = ref.prototype_distance_maps(f, p, metric)
    assert maps.shape == rmaps.shape
    assert_close(maps, rmaps)
    values = protofast.prototype_min_distances(f, p, metric)[0]
    assert_close(values, maps.flatten(2).min(2).values)


@SETTINGS
@given(B=st.integers(1, 5), M=st.integers(2, 8), K=st.integers(2, 4), seed=st.integers(0, 2**31 - 1),
       exact=st.booleans(), multilabel=st.booleans(), max_dist=st.sampled_from([1.0, 3.0, 10.0]))
def test_cluster_separation_match_reference(B, M, K, seed, exact, multilabel, max_dist):
    """Random distances (some above max_dist, so saturation happens) against the reference, values and
    gradients (distinct distances: no ties in the max)."""
    K = min(K, M)
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(B, M, generator=g, dtype=torch.float64) * 4).requires_grad_()
    identity = identity_matrix(M, K)
    if multilabel:
        t = (torch.rand(B, K, generator=g) < 0.5).double()
        t[:, 0], t[:, 1] = 1, 0                                   # at least one positive and one negative
        labels = t[:, torch.randperm(K, generator=g)]
    else:
        labels = torch.randint(0, K, (B,), generator=g)
    out = protofast.cluster_separation_costs(d, labels, identity, max_dist, exact=exact)
    (dr,) = as_reference(d)
    rout = ref.cluster_separation_costs(dr, labels, identity, max_dist, exact=exact)
    for a, b in zip(out, rout):
        assert_close(a, b)
    up = tuple(torch.randn((), generator=g, dtype=torch.float64) for _ in range(3))
    assert_close(grads(out, (d,), up)[0], grads(rout, (dr,), up)[0])

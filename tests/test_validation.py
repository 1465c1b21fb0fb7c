"""Bad input raises a clear TypeError / ValueError naming the argument (DESIGN.md §5), never a silent answer."""
from __future__ import annotations

import pytest
import torch

import protofast
from conftest import identity_matrix


def _f(*shape, dtype=torch.float32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _min(features, prototypes, metric="l2"):
    return protofast.prototype_min_distances(features, prototypes, metric)


def _maps(features, prototypes, metric="l2"):
    return protofast.prototype_distance_maps(features, prototypes, metric)


def _mean(features, prototypes, metric="l2"):
    return protofast.mean_distance_loss(features, prototypes, metric=metric)


DISTANCE_FUNCTIONS = [pytest.param(fn, id=fn.__name__.strip("_")) for fn in (_min, _maps, _mean)]

# (features, prototypes, error type, message pattern)
BAD_DISTANCE_INPUTS = [
    pytest.param(lambda: _f(2, 3), lambda: _f(4, 3), ValueError, "features", id="features_2d"),
    pytest.param(lambda: _f(1, 2, 3, 4, 4), lambda: _f(4, 3), ValueError, "features", id="features_5d"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4), ValueError, "prototypes", id="prototypes_1d"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4, 3, 1), ValueError, "prototypes", id="prototypes_3d"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4, 5), ValueError, "D=", id="D_mismatch_nchw"),
    pytest.param(lambda: _f(2, 6, 3), lambda: _f(4, 5, 1, 1), ValueError, "D=", id="D_mismatch_set"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4, 3, dtype=torch.float64), TypeError, "dtype",
                 id="dtype_mismatch"),
    pytest.param(lambda: torch.ones(2, 3, 4, 4, dtype=torch.int64), lambda: torch.ones(4, 3, dtype=torch.int64),
                 TypeError, "features", id="integer_features"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: torch.ones(4, 3, dtype=torch.int32), TypeError, "prototypes",
                 id="integer_prototypes"),
    pytest.param(lambda: [[1.0]], lambda: _f(4, 3), TypeError, "features", id="features_not_a_tensor"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4, 3, device="meta"), ValueError, "device",
                 id="device_mismatch"),
    pytest.param(lambda: _f(0, 3, 4, 4), lambda: _f(4, 3), ValueError, "B", id="empty_B"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(0, 3), ValueError, "M", id="empty_M"),
    pytest.param(lambda: _f(2, 0, 4, 4), lambda: _f(4, 0), ValueError, "D", id="empty_D"),
    pytest.param(lambda: _f(2, 3, 0, 4), lambda: _f(4, 3), ValueError, "N", id="empty_map"),
    pytest.param(lambda: _f(2, 0, 3), lambda: _f(4, 3), ValueError, "N", id="empty_set"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4, 3, 5, 1), ValueError, "smaller than the prototypes",
                 id="prototypes_taller_than_map"),
    pytest.param(lambda: _f(2, 3, 4, 2), lambda: _f(4, 3, 1, 3), ValueError, "smaller than the prototypes",
                 id="prototypes_wider_than_map"),
    pytest.param(lambda: _f(2, 5, 3), lambda: _f(4, 3, 2, 2), ValueError, "prototypes", id="hw_prototypes_on_set"),
    pytest.param(lambda: _f(2, 3, 4, 4), lambda: _f(4, 3, 0, 1), ValueError, "prototypes", id="empty_hw"),
]


@pytest.mark.parametrize("make_features, make_prototypes, error, pattern", BAD_DISTANCE_INPUTS)
@pytest.mark.parametrize("fn", DISTANCE_FUNCTIONS)
def test_bad_distance_inputs(fn, make_features, make_prototypes, error, pattern):
    with pytest.raises(error, match=pattern):
        fn(make_features(), make_prototypes())


@pytest.mark.parametrize("metric", ["L2", "euclidean", "", None, "cos"])
@pytest.mark.parametrize("fn", DISTANCE_FUNCTIONS)
def test_bad_metric(fn, metric):
    with pytest.raises(ValueError, match="metric"):
        fn(_f(2, 3, 4, 4), _f(4, 3), metric)


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="PROTOFAST_BACKEND"):
        protofast.prototype_min_distances(_f(2, 3, 4, 4), _f(4, 3))


# --------------------------------------------------------------------------------------------- log-similarity
@pytest.mark.parametrize("eps", [0, 0.0, -1e-4, float("nan"), "1e-4", None])
def test_log_similarity_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        protofast.log_similarity(_f(2, 3), eps)


def test_log_similarity_integer_distances():
    with pytest.raises(TypeError, match="distances"):
        protofast.log_similarity(torch.ones(2, 3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------- cluster / separation
B, M, K = 4, 6, 3
IDENTITY = identity_matrix(M, K)                    # 2 prototypes per class


def _costs(labels, identity=IDENTITY, d=None, max_dist=10.0, exact=False):
    d = _f(B, M) if d is None else d
    return protofast.cluster_separation_costs(d, labels, identity, max_dist, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("labels, error, pattern", [
    pytest.param(torch.tensor([0, -1, 2, 1]), ValueError, "labels", id="negative"),
    pytest.param(torch.tensor([0, 3, 2, 1]), ValueError, "labels", id="equal_K"),
    pytest.param(torch.tensor([0, 1, 2]), ValueError, "labels", id="too_short"),
    pytest.param(torch.tensor([0, 1, 2, 1, 0]), ValueError, "labels", id="too_long"),
    pytest.param(torch.tensor([0.0, 1.0, 2.0, 1.0]), TypeError, "labels", id="float_labels"),
    pytest.param(torch.tensor([True, False, True, True]), TypeError, "labels", id="bool_labels"),
    pytest.param([0, 1, 2, 1], TypeError, "labels", id="list_labels"),
    pytest.param(torch.zeros(B, K, 1, dtype=torch.long), ValueError, "labels", id="labels_3d"),
    pytest.param(torch.ones(B, K + 1), ValueError, "labels", id="multilabel_wrong_K"),
    pytest.param(torch.ones(B - 1, K), ValueError, "labels", id="multilabel_wrong_B"),
    pytest.param(torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 0, 0], [0, 0, 1]]), ValueError, "labels",
                 id="multilabel_not_0_1"),
    pytest.param(torch.tensor([[1.0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]]), ValueError, "positive",
                 id="multilabel_no_positive"),
    pytest.param(torch.tensor([[1.0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 1]]), ValueError, "negative",
                 id="multilabel_no_negative"),
])
def test_costs_bad_labels(labels, error, pattern, exact):
    with pytest.raises(error, match=pattern):
        _costs(labels, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("identity", [
    pytest.param(IDENTITY[:-1], id="too_few_rows"),
    pytest.param(IDENTITY.t(), id="transposed"),
    pytest.param(IDENTITY[:, :0], id="no_classes"),
    pytest.param(IDENTITY[None], id="3d"),
])
def test_costs_identity_wrong_shape(identity, exact):
    with pytest.raises(ValueError, match="prototype_class_identity"):
        _costs(torch.tensor([0, 1, 2, 1]), identity, exact=exact)


def test_costs_identity_not_a_tensor():
    with pytest.raises(TypeError, match="prototype_class_identity"):
        _costs(torch.tensor([0, 1, 2, 1]), IDENTITY.tolist())


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("multilabel", [False, True])
def test_costs_class_without_prototypes(multilabel, exact):
    identity = IDENTITY.clone()
    identity[:, 2] = 0
    identity[4:, 1] = 1                              # class 2's prototypes now belong to class 1
    labels = torch.tensor([0, 2, 1, 1])
    if multilabel:
        labels = torch.nn.functional.one_hot(labels, K).float()
    with pytest.raises(ValueError, match="class 2 has no prototypes"):
        _costs(labels, identity, exact=exact)


@pytest.mark.parametrize("exact", [False, True])
def test_costs_no_other_class_prototypes(exact):
    identity = torch.zeros(M, K)
    identity[:, 0] = 1
    with pytest.raises(ValueError, match="separation"):
        _costs(torch.tensor([0, 0, 0, 0]), identity, exact=exact)


@pytest.mark.parametrize("d, error, pattern", [
    pytest.param(lambda: _f(B), ValueError, "min_distances", id="1d"),
    pytest.param(lambda: _f(B, M, 1), ValueError, "min_distances", id="3d"),
    pytest.param(lambda: torch.ones(B, M, dtype=torch.long), TypeError, "min_distances", id="integer"),
    pytest.param(lambda: _f(0, M), ValueError, "min_distances", id="empty"),
    pytest.param(lambda: _f(B, M + 1), ValueError, "prototype_class_identity", id="M_mismatch"),
])
def test_costs_bad_min_distances(d, error, pattern):
    with pytest.raises(error, match=pattern):
        _costs(torch.tensor([0, 1, 2, 1]), d=d())


def test_costs_bad_max_dist():
    with pytest.raises(TypeError, match="max_dist"):
        _costs(torch.tensor([0, 1, 2, 1]), max_dist="128")


# --------------------------------------------------------------------------------------------- masked l1
@pytest.mark.parametrize("weight, identity, error, pattern", [
    pytest.param(lambda: _f(K, M), lambda: IDENTITY[:, :2], ValueError, "prototype_class_identity", id="K_mismatch"),
    pytest.param(lambda: _f(K, M), lambda: IDENTITY[:4], ValueError, "prototype_class_identity", id="M_mismatch"),
    pytest.param(lambda: _f(M, K), lambda: IDENTITY, ValueError, "prototype_class_identity", id="weight_transposed"),
    pytest.param(lambda: _f(K * M), lambda: IDENTITY, ValueError, "last_layer_weight", id="weight_1d"),
    pytest.param(lambda: torch.ones(K, M, dtype=torch.long), lambda: IDENTITY, TypeError, "last_layer_weight",
                 id="integer_weight"),
])
def test_masked_l1_bad_inputs(weight, identity, error, pattern):
    with pytest.raises(error, match=pattern):
        protofast.masked_l1(weight(), identity())


# --------------------------------------------------------------------------------------------- mean distance
@pytest.mark.parametrize("mode", ["closed_form", "exact"])
@pytest.mark.parametrize("kwargs, error, pattern", [
    pytest.param(dict(labels=torch.tensor([0, 1, 2, 1])), ValueError, "prototype_class_identity",
                 id="labels_without_identity"),
    pytest.param(dict(prototype_class_identity=IDENTITY), ValueError, "labels", id="identity_without_labels"),
    pytest.param(dict(labels=torch.tensor([0, 3, 2, 1]), prototype_class_identity=IDENTITY), ValueError, "labels",
                 id="label_equal_K"),
    pytest.param(dict(labels=torch.tensor([0, -2, 2, 1]), prototype_class_identity=IDENTITY), ValueError, "labels",
                 id="negative_label"),
    pytest.param(dict(labels=torch.tensor([0, 1, 2]), prototype_class_identity=IDENTITY), ValueError, "labels",
                 id="labels_too_short"),
    pytest.param(dict(labels=torch.tensor([0.0, 1, 2, 1]), prototype_class_identity=IDENTITY), TypeError, "labels",
                 id="float_labels"),
    pytest.param(dict(labels=torch.ones(B, K), prototype_class_identity=IDENTITY), ValueError, "labels",
                 id="multilabel"),
    pytest.param(dict(labels=torch.tensor([0, 1, 2, 1]), prototype_class_identity=IDENTITY[:5]), ValueError,
                 "prototype_class_identity", id="identity_wrong_shape"),
    pytest.param(dict(classes="mine"), ValueError, "classes", id="bad_classes"),
])
def test_mean_distance_bad_inputs(kwargs, error, pattern, mode):
    with pytest.raises(error, match=pattern):
        protofast.mean_distance_loss(_f(B, 3, 4, 4), _f(M, 3), mode=mode, **kwargs)


@pytest.mark.parametrize("mode", ["closed", "materialised", None])
def test_mean_distance_bad_mode(mode):
    with pytest.raises(ValueError, match="mode"):
        protofast.mean_distance_loss(_f(B, 3, 4, 4), _f(M, 3), mode=mode)

"""protofast.push_prototypes: the projection semantics of SEMANTICS.md §1.5 / §3.5.

The model's features are its input (``conv_features`` = identity), so exact ties can be built directly in feature
space. The oracle is the original host-side loop, ``protofast.reference.push_original``.
"""
from __future__ import annotations

import copy
import gc
import os
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn

import protofast
from protofast.reference.push_original import push_prototypes_original

from conftest import identity_matrix


class FeatureNet(nn.Module):
    """conv_features(x) = x; prototypes [M, D, h, w]; class identity [M, K]."""

    def __init__(self, M, D, K, hw=(1, 1), seed=0, dtype=torch.float32, per_class=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.prototype_vectors = nn.Parameter(torch.rand(M, D, *hw, generator=g, dtype=dtype))
        self.register_buffer("prototype_class_identity", identity_matrix(M, K, per_class))
        self.calls = 0

    def conv_features(self, x):
        self.calls += 1
        return x


def _data(N=40, D=6, H=4, W=4, K=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, D, H, W, generator=g, dtype=dtype), torch.randint(0, K, (N,), generator=g)


def _loader(x, y, batch=8):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]


def _push_both(model, loader, **kw):
    ref_model = copy.deepcopy(model)
    result = protofast.push_prototypes(model, loader, progress=False, **kw)
    ref_kw = {k: v for k, v in kw.items() if k in ("class_specific", "reset_per_batch", "multilabel")}
    ref = push_prototypes_original(ref_model, loader, **ref_kw)
    return result, ref, ref_model


def _assert_same(result, ref, model, ref_model):
    assert torch.equal(model.prototype_vectors, ref_model.prototype_vectors)
    np.testing.assert_array_equal(result.image_index.numpy(), ref.image_index)
    np.testing.assert_array_equal(result.position.numpy(), ref.position)
    found = ref.image_index >= 0
    np.testing.assert_allclose(result.distance.numpy()[found], ref.distance[found], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (1, 3)])
@pytest.mark.parametrize("class_specific", [True, False])
def test_matches_original_loop(hw, class_specific):
    x, y = _data()
    model = FeatureNet(12, 6, 4, hw)
    result, ref, ref_model = _push_both(model, _loader(x, y), class_specific=class_specific)
    _assert_same(result, ref, model, ref_model)
    assert result.found.all()
    assert result.prototype_size == hw and result.feature_size == (4, 4)


def test_ties_first_occurrence_and_strict_less_across_batches():
    x, y = _data(N=24)
    y[:] = 1
    x[3] = x[1]                       # duplicate inside batch 0 (images 1 and 3)
    x[13] = x[1]                      # duplicate in a later batch: strict "<" keeps image 1
    x[5] = 0.25                       # constant image: every position is the same patch
    model = FeatureNet(8, 6, 4, per_class=2)
    with torch.no_grad():
        model.prototype_vectors[2] = x[1, :, 2, 3, None, None] + 0.01     # nearest patch: image 1, (2, 3), d > 0
        model.prototype_vectors[3] = 0.25                                 # zero distance at all 16 positions
    result, ref, ref_model = _push_both(model, _loader(x, y))
    _assert_same(result, ref, model, ref_model)
    assert (int(result.image_index[2]), tuple(result.position[2].tolist())) == (1, (2, 3))
    assert float(result.distance[2]) > 0
    assert (int(result.image_index[3]), tuple(result.position[3].tolist())) == (5, (0, 0))
    # class 0 and classes 2, 3 never appear: zero prototypes
    assert torch.count_nonzero(model.prototype_vectors[[0, 1, 4, 5, 6, 7]]) == 0


def test_unseen_zero_and_keep():
    x, y = _data()
    y[y == 2] = 1
    for unseen in ("zero", "keep"):
        model = FeatureNet(8, 6, 4)
        before = model.prototype_vectors.detach().clone()
        result = protofast.push_prototypes(model, _loader(x, y), unseen=unseen, progress=False)
        unseen_rows = torch.arange(4, 6)
        assert (result.image_index[unseen_rows] == -1).all() and torch.isinf(result.distance[unseen_rows]).all()
        assert (result.position[unseen_rows] == -1).all()
        expected = torch.zeros_like(before[unseen_rows]) if unseen == "zero" else before[unseen_rows]
        assert torch.equal(model.prototype_vectors[unseen_rows], expected)
        assert result.found[[0, 1, 2, 3, 6, 7]].all()
    with pytest.raises(ValueError, match="unseen"):
        protofast.push_prototypes(model, _loader(x, y), unseen="drop", progress=False)


def test_reset_per_batch_last_batch_wins():
    x, y = _data(N=24)
    y[:] = 0
    model = FeatureNet(4, 6, 2)
    with torch.no_grad():
        x[2] = model.prototype_vectors[0, :, 0, 0][:, None, None]        # exact match in batch 0
    result, ref, ref_model = _push_both(model, _loader(x, y), reset_per_batch=True)
    _assert_same(result, ref, model, ref_model)
    assert int(result.image_index[0]) >= 16                            # from the last batch, not image 2
    fresh = FeatureNet(4, 6, 2)
    assert int(protofast.push_prototypes(fresh, _loader(x, y), progress=False).image_index[0]) == 2


# (10, 40): at most 2 positive classes of 4 prototypes per image -> gathered candidates;
# (3, 6): up to 4 candidate prototypes of 6 per image -> the fused all-pairs path
@pytest.mark.parametrize("K,M", [(10, 40), (3, 6)])
def test_multilabel(K, M):
    x, _ = _data(N=30, K=K)
    g = torch.Generator().manual_seed(3)
    targets = torch.zeros(30, K, dtype=torch.long)
    targets[torch.arange(30), torch.randint(0, K - 1, (30,), generator=g)] = 1
    targets[torch.arange(0, 30, 2), torch.randint(0, K - 1, (15,), generator=g)] = 1
    assert targets.sum(1).max() == 2 and targets[:, K - 1].sum() == 0   # multi-label; last class never positive
    model = FeatureNet(M, 6, K)
    result, ref, ref_model = _push_both(model, _loader(x, targets), multilabel=True)
    _assert_same(result, ref, model, ref_model)
    last = model.prototype_class_identity[:, K - 1].bool()
    assert (~result.found[last]).all() and result.found[~last].all()


def test_reported_patch_attains_reported_distance_and_is_minimal():
    x, y = _data(N=32, D=5, H=5, W=6)
    model = FeatureNet(8, 5, 4, hw=(2, 3))
    old = model.prototype_vectors.detach().clone()
    result = protofast.push_prototypes(model, _loader(x, y, batch=7), progress=False)
    maps = protofast.prototype_distance_maps(x.double(), old.double())            # [N, M, 4, 4]
    for m in range(8):
        k = int(result.prototype_class[m])
        assert k == m // 2
        b, (i, j) = int(result.image_index[m]), result.position[m].tolist()
        assert int(y[b]) == k
        assert abs(float(maps[b, m, i, j]) - float(result.distance[m])) < 1e-5
        assert float(maps[y == k, m].min()) >= float(result.distance[m]) - 1e-5
        assert torch.equal(model.prototype_vectors[m], x[b, :, i:i + 2, j:j + 3])
    boxes = result.receptive_field_boxes(image_size=(50, 60))
    m = 0
    i, j = result.position[m].tolist()
    assert boxes[m].tolist() == [i * 10, (i + 2) * 10, j * 10, (j + 3) * 10]
    rf = result.receptive_field_boxes(image_size=16, rf_info=(5, 4, 7, 1.5))
    assert rf[m].tolist() == [max(int(1.5 + 4 * i - 3.5), 0), min(int(1.5 + 4 * i + 3.5), 16),
                              max(int(1.5 + 4 * j - 3.5), 0), min(int(1.5 + 4 * j + 3.5), 16)]


def test_streams_with_bounded_memory_and_restores_mode():
    """Each batch's features are released before the next batch is read, nothing B×M×H'×W' is built."""
    x, y = _data(N=64)
    model = FeatureNet(8, 6, 4)
    model.train()
    refs, events = [], []
    calls = {"maps": 0}

    def loader():
        for t in range(0, 64, 8):
            gc.collect()
            events.append(sum(r() is not None for r in refs))          # live feature maps of earlier batches
            xb = x[t:t + 8].clone()
            refs.append(weakref.ref(xb))
            yield xb, y[t:t + 8]

    orig_maps = protofast.ops.distances.set_distance_maps

    def counting(*a, **k):
        calls["maps"] += 1
        return orig_maps(*a, **k)

    protofast.ops.distances.set_distance_maps = counting
    try:
        result = protofast.push_prototypes(model, loader(), progress=False)
    finally:
        protofast.ops.distances.set_distance_maps = orig_maps
    assert max(events[1:]) <= 1 and events[0] == 0                    # at most the batch being processed
    assert calls["maps"] == 0 and result.host_maps is None
    assert model.training and model.calls == 8
    assert result.found.all()


def test_return_host_maps_and_dtype_preserved():
    x, y = _data(N=10, dtype=torch.float64)
    model = FeatureNet(4, 6, 2, dtype=torch.float64)
    old = model.prototype_vectors.detach().clone()
    result = protofast.push_prototypes(model, _loader(x, y % 2, batch=4), return_host_maps=True, progress=True)
    assert model.prototype_vectors.dtype == torch.float64
    assert len(result.host_maps) == 3
    feats, maps = result.host_maps[0]
    assert feats.shape == (4, 6, 4, 4) and maps.shape == (4, 4, 4, 4)
    np.testing.assert_allclose(maps, protofast.prototype_distance_maps(x[:4], old).numpy(), rtol=1e-10)


def test_bad_inputs():
    x, y = _data(N=8)
    with pytest.raises(AttributeError, match="prototype_class_identity"):
        class NoIdentity(nn.Module):
            def __init__(self):
                super().__init__()
                self.prototype_vectors = nn.Parameter(torch.rand(2, 6, 1, 1))

            def conv_features(self, x):
                return x
        protofast.push_prototypes(NoIdentity(), _loader(x, y), progress=False)
    model = FeatureNet(8, 6, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        protofast.push_prototypes(model, [(x, y + 4)], progress=False)
    with pytest.raises(ValueError, match="multilabel"):
        protofast.push_prototypes(model, [(x, y[:, None].expand(8, 4))], progress=False)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        protofast.push_prototypes(model, [(x, y)], multilabel=True, progress=False)
    with pytest.raises(ValueError, match="conv_features must return"):
        protofast.push_prototypes(model, [(x[:, :3], y)], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        protofast.push_prototypes(model, [(bad, y)], progress=False)


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, path, x, y, state):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = FeatureNet(8, 6, 4)
        model.load_state_dict(state)
        dataset = torch.utils.data.TensorDataset(x, y)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
        result = protofast.push_prototypes(model, loader, progress=False)
        if rank == 0:
            torch.save({"prototypes": model.prototype_vectors.detach(), "index": result.image_index,
                        "position": result.position, "distance": result.distance}, path)
    finally:
        dist.destroy_process_group()


def test_distributed_push_equals_single_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    x, y = _data(N=23)                  # odd: the DistributedSampler pads rank 1 with image 0
    y[y == 3] = 2
    x[9], y[9] = x[4], y[4]             # ties across ranks (4 on rank 0, 9 on rank 1; 1 on rank 1, 6 on rank 0):
    x[6], y[6] = x[1], y[1]             # the lowest dataset index must win, as in loader order
    model = FeatureNet(8, 6, 4)
    state = copy.deepcopy(model.state_dict())
    single = protofast.push_prototypes(model, _loader(x, y, batch=5), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(tmp_path, "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, port, path, x, y, state), nprocs=2, join=True)
    merged = torch.load(path)
    assert torch.equal(merged["prototypes"], model.prototype_vectors.detach())
    assert torch.equal(merged["index"], single.image_index)
    assert torch.equal(merged["position"], single.position)
    torch.testing.assert_close(merged["distance"], single.distance)
    assert (single.image_index[6:] == -1).all()                      # class 3 unseen, zero in both


def test_protofast_protopnet_model_matches_original_loop():
    """protofast.models.ProtoPNet (a real backbone and add-on) through both push implementations."""
    models = pytest.importorskip("protofast.models")
    torch.manual_seed(0)
    model = models.ProtoPNet(models.SmallCNN(), num_classes=4, prototypes_per_class=2, prototype_shape=(8, 1, 1),
                             input_shape=(3, 16, 16))
    g = torch.Generator().manual_seed(2)
    images, labels = torch.rand(20, 3, 16, 16, generator=g), torch.randint(0, 3, (20,), generator=g)
    result, ref, ref_model = _push_both(model, _loader(images, labels, batch=6))
    _assert_same(result, ref, model, ref_model)
    assert (~result.found[6:]).all() and result.found[:6].all()

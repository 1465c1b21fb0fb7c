"""ProtoMask (SEMANTICS.md §3.3) against the plain float64 formulation: materialised dv [B, V, M], min over views,
log-similarity, quanproto's loss (multiply-then-max clst/sep, sep subtracted, diversity with explicit difference
vectors), for logits, losses and every gradient; view_valid; ragged classes; options; bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import protofast
import protofast.reference as ref
from conftest import assert_close
from protofast.models import ProtoMask, SmallCNN
from protofast.models.protomask import diversity_loss

S = 8      # view size


def _model(sizes=3, K=3, D=6, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    net = ProtoMask(SmallCNN(channels=(4,), convs_per_stage=1), K, prototypes_per_class=sizes, embedding_dim=D,
                    input_shape=(3, S, S), **kw)
    return net.to(dtype)


def _views(B=4, V=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, V, 3, S, S, generator=g, dtype=torch.float64).to(dtype)


def _reference_loss(e, P, W, identity, labels, D, eps, div_grad, phase="joint"):
    mind, arg, sim = ref.protomask.protomask_head(e, P, eps)
    logits = sim @ W.t()
    ce = F.cross_entropy(logits, labels)
    if phase == "fine_tune":
        return logits, mind, arg, ce + 1e-3 * ref.masked_l1(W, identity)
    clst, sep, _ = ref.cluster_separation_costs(mind, labels, identity, float(D))
    div = ref.protomask.diversity_loss(P, identity, labels)
    if not div_grad:
        div = div.detach()
    return logits, mind, arg, ce + 0.8 * clst - 0.2 * sep + 0.2 * div


@pytest.mark.parametrize("div_grad", [False, True])
@pytest.mark.parametrize("sizes", [3, [1, 4, 2]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_and_loss_match_plain_formulation(div_grad, sizes, dtype):
    net = _model(sizes=sizes, dtype=dtype, div_grad=div_grad)
    labels = torch.tensor([0, 2, 1, 1])
    e = net.embed(_views(dtype=dtype)).detach().requires_grad_()
    logits, mind, arg = net.head(e)
    total, terms = net.loss(logits, mind, labels)
    g_logits = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = total + (logits * g_logits.to(dtype)).sum()
    params = [e, net.prototype_vectors, net.last_layer.weight]
    got = torch.autograd.grad(out, params)

    er = e.detach().double().requires_grad_()
    Pr = net.prototype_vectors.detach().double().view(net.num_prototypes, -1).requires_grad_()
    Wr = net.last_layer.weight.detach().double().requires_grad_()
    rlogits, rmind, rarg, rtotal = _reference_loss(er, Pr, Wr, net.prototype_class_identity.double(), labels,
                                                   net.embedding_dim, 1e-14, div_grad)
    assert torch.equal(arg, rarg)
    assert_close(logits, rlogits, dtype, "logits")
    assert_close(mind, rmind, dtype, "min distances")
    assert_close(total, rtotal, dtype, "loss")
    expected = torch.autograd.grad(rtotal + (rlogits * g_logits).sum(), [er, Pr, Wr])
    for name, a, b in zip(("e", "prototypes", "last layer"), got, expected):
        assert_close(a.reshape(b.shape), b, dtype, f"grad {name}")


def test_forward_backbone_gradients_and_fine_tune_loss():
    net = _model()
    views, labels = _views(), torch.tensor([0, 1, 2, 0])
    logits, mind = net(views)
    total, terms = net.loss(logits, mind, labels, phase="fine_tune")
    assert set(terms) == {"cross_entropy", "l1", "total"}
    e = net.embed(views)
    P = net.prototype_vectors.view(net.num_prototypes, -1)
    rlogits, rmind, _, rtotal = _reference_loss(e, P, net.last_layer.weight, net.prototype_class_identity, labels,
                                                net.embedding_dim, 1e-14, False, phase="fine_tune")
    assert_close(total, rtotal, torch.float64)
    params = list(net.features.parameters()) + list(net.add_on_layers.parameters())
    a = torch.autograd.grad(total + mind.sum(), params)
    b = torch.autograd.grad(rtotal + rmind.sum(), params)
    for x, y in zip(a, b):
        assert_close(x, y, torch.float64, "backbone / add-on gradient")


def test_view_valid_excludes_views():
    net = _model()
    e = net.embed(_views()).detach().requires_grad_()
    valid = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    logits, mind, arg = net.head(e, view_valid=valid)
    rmind, rarg, rsim = ref.protomask.protomask_head(e.detach(), net.prototype_vectors.detach(), 1e-14, valid)
    assert torch.equal(arg, rarg)
    assert valid.gather(1, arg).all()
    assert_close(mind, rmind, torch.float64)
    (g,) = torch.autograd.grad(mind.sum(), e)
    assert torch.count_nonzero(g[~valid]) == 0 and torch.count_nonzero(g[valid]) > 0
    with pytest.raises(ValueError, match="view_valid"):
        net.head(e, view_valid=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="view_valid"):
        net.head(e, view_valid=valid[:, :3])


def test_view_valid_first_occurrence_with_duplicates():
    """Exact ties between views: the first valid view wins, also when an invalid view before it is a copy."""
    net = _model()
    e = torch.rand(1, 4, net.embedding_dim, dtype=torch.float64)
    e[0, 0] = e[0, 2]
    e[0, 3] = e[0, 2]
    valid = torch.tensor([[False, True, True, True]])
    _, mind, arg = net.head(e, view_valid=valid)
    _, rarg, _ = ref.protomask.protomask_head(e, net.prototype_vectors.detach(), 1e-14, valid)
    assert torch.equal(arg, rarg)


def test_diversity_original_value_and_no_gradient():
    net = _model(sizes=[2, 3, 1])
    P = net.prototype_vectors
    labels = torch.tensor([0, 1, 2, 1, 1])
    I = net.prototype_class_identity
    div = diversity_loss(P, I, labels, differentiable=False)
    assert not div.requires_grad
    literal = ref.protomask.diversity_loss(P.detach(), I, labels, exclude_diagonal=False)   # quanproto: i = j too
    assert_close(div, literal, torch.float64)
    d2 = diversity_loss(P, I, labels, differentiable=True)
    assert d2.requires_grad
    assert torch.autograd.gradcheck(lambda p: diversity_loss(p, I, labels, differentiable=True), (P.detach().clone()
                                    .requires_grad_(),))
    # identical prototypes of one class: defined (zero) gradient instead of NaN
    Q = P.detach().clone()
    Q[1] = Q[0]
    Q.requires_grad_()
    (g,) = torch.autograd.grad(diversity_loss(Q, I, torch.tensor([0]), differentiable=True), Q)
    assert torch.isfinite(g).all() and torch.count_nonzero(g) == 0


def test_singletons_b1_v1():
    net = _model(sizes=1, K=2)
    views = _views(B=1, V=1)
    logits, mind = net(views)
    assert logits.shape == (1, 2) and mind.shape == (1, 2)
    total, terms = net.loss(logits, mind, torch.tensor([1]))
    assert torch.isfinite(total) and terms["diversity"] == 1.0
    total.backward()


def test_init_options_and_optimizers():
    net = _model(sizes=[2, 1, 3])
    W = net.last_layer.weight
    assert torch.equal(W, net.prototype_class_identity.t())                  # 1 own class, 0 else
    assert net.prototype_class_identity.sum(0).tolist() == [2, 1, 3]
    opt = net.phase("joint")
    names = [g["name"] for g in opt.param_groups]
    assert names == ["features", "prototype_vectors"]                        # quanproto: add-on not trained
    assert not W.requires_grad
    assert _model(train_add_on=True).phase("joint").param_groups[-1]["name"] == "add_on_layers"
    opt = net.phase("fine_tune")
    assert [g["name"] for g in opt.param_groups] == ["last_layer"] and W.requires_grad
    assert not net.prototype_vectors.requires_grad
    # train_add_on=False: the add-on keeps its init through a joint step
    before = [p.detach().clone() for p in net.add_on_layers.parameters()]
    opt = net.phase("joint")
    logits, mind = net(_views())
    net.loss(logits, mind, torch.tensor([0, 1, 2, 0]))[0].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.add_on_layers.parameters()))
    clone = ProtoMask.from_config(net.config())
    assert clone.config() == net.config()


def test_epsilon_is_used():
    net = _model(epsilon=1e-4)
    e = net.embed(_views()).detach()
    _, mind, _ = net.head(e)
    logits, _, _ = net.head(e)
    sim = protofast.log_similarity(mind, 1e-4)
    assert_close(logits, net.last_layer(sim), torch.float64)


def test_bad_inputs():
    with pytest.raises(TypeError, match="backbone"):
        ProtoMask("resnet", 3)
    with pytest.raises(ValueError, match="num_classes"):
        ProtoMask(SmallCNN(), 0)
    with pytest.raises(ValueError, match="prototypes_per_class"):
        ProtoMask(SmallCNN(), 3, prototypes_per_class=[1, 2])
    with pytest.raises(ValueError, match="embedding_dim"):
        ProtoMask(SmallCNN(), 3, embedding_dim=0)
    with pytest.raises(ValueError, match="epsilon"):
        ProtoMask(SmallCNN(), 3, epsilon=0.0)
    with pytest.raises(ValueError, match="coefficients"):
        ProtoMask(SmallCNN(), 3, coefs={"mean": 1.0})
    net = _model()
    with pytest.raises(ValueError, match="views"):
        net(torch.rand(2, 3, S, S, dtype=torch.float64))
    logits, mind = net(_views())
    with pytest.raises(ValueError, match="labels"):
        net.loss(logits, mind, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="labels"):
        net.loss(logits, mind, torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        net.loss(logits, mind, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="phase"):
        net.loss(logits, mind, torch.tensor([0, 1, 2, 0]), phase="warm")
    with pytest.raises(ValueError, match="min_distances"):
        net.loss(logits, mind[:, :2], torch.tensor([0, 1, 2, 0]))


# --------------------------------------------------------------------------------------------- projection
def _push_batches(with_valid=False, seed=5):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for B, labels in ((4, [0, 1, 0, 2]), (3, [1, 1, 0]), (2, [0, 0])):   # class 2 only in the first batch
        views = torch.rand(B, 5, 3, S, S, generator=g, dtype=torch.float64)
        item = [views, torch.tensor(labels)]
        if with_valid:
            valid = torch.rand(B, 5, generator=g) > 0.4
            valid[:, 2] |= ~valid.any(1)
            item.append(valid)
        batches.append(tuple(item))
    return batches


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("reset_per_batch", [True, False])
def test_push_matches_quanproto_loop(reset_per_batch, with_valid):
    from protofast.models.protomask import push_protomask

    net = _model(K=4)                                       # class 3 never appears: its prototypes become zero
    batches = _push_batches(with_valid)
    expected, log = ref.protomask.push_original(net, batches, reset_per_batch=reset_per_batch)
    result = push_protomask(net, batches, reset_per_batch=reset_per_batch)
    torch.testing.assert_close(net.prototype_vectors.detach().view(net.num_prototypes, -1), expected)
    assert sorted(result.log()) == sorted(log)
    for m, (b, v, d) in log.items():
        assert (int(result.image_index[m]), int(result.view_index[m])) == (b, v)
        assert abs(float(result.distance[m]) - d) < 1e-9
    unseen = net.prototype_class_identity[:, 3].bool()
    assert not result.found[unseen].any() and torch.count_nonzero(net.prototype_vectors[unseen]) == 0
    if with_valid:
        for m, (b, v, _) in log.items():
            flat = [t for batch in batches for t in batch[2]]
            assert flat[b][v]


def test_push_reset_per_batch_differs_from_global_best():
    """The quirk is observable: with the reset, a prototype ends on the last batch holding its class."""
    from protofast.models.protomask import push_protomask

    batches = _push_batches()
    a, b = _model(K=4), _model(K=4)
    ra = push_protomask(a, batches, reset_per_batch=True)
    rb = push_protomask(b, batches, reset_per_batch=False)
    cls0 = a.prototype_class_identity[:, 0].bool()
    assert (ra.image_index[cls0] >= 7).all()               # class 0 appears in the last batch (images 7, 8)
    assert (rb.distance <= ra.distance).all()
    assert not torch.equal(ra.image_index, rb.image_index)


def test_push_duplicate_views_first_occurrence():
    from protofast.models.protomask import push_protomask

    net = _model(K=2, sizes=1)
    views = torch.rand(2, 3, 3, S, S, dtype=torch.float64)
    views[0, 2] = views[0, 1]
    views[1] = views[0]
    batches = [(views, torch.tensor([0, 0]))]
    _, log = ref.protomask.push_original(net, batches)
    result = push_protomask(net, batches)
    assert (int(result.image_index[0]), int(result.view_index[0])) == log[0][:2]
    assert int(result.image_index[0]) == 0
    with pytest.raises(TypeError, match="model"):
        push_protomask(torch.nn.Linear(2, 2), batches)


# --------------------------------------------------------------------------------------------- training
def test_synthetic_masks_and_views():
    from protofast.data import SyntheticParts
    from protofast.protomask_train import SyntheticPartsWithMasks

    base = SyntheticParts(6, num_classes=4, image_size=16, part_size=4, parts_per_class=2, distractors=1)
    ds = SyntheticPartsWithMasks(base, view_size=8)
    N, V = 6, 4
    assert ds.masks.shape == (N, V, 16, 16) and ds.views.shape == (N, V, 3, 8, 8)
    for i in range(N):
        boxes = base.part_locations(i)
        assert int(ds.valid[i].sum()) == 1 + len(boxes)          # background + each pasted part
        union = ds.masks[i, 1:].any(0)
        assert torch.equal(ds.masks[i, 0], ~union)
        for _, top, left, bottom, right in boxes.tolist():
            assert union[top:bottom, left:right].all()
    views, label, valid = ds[0]
    assert views.shape == (V, 3, 8, 8) and label == int(base.labels[0]) and valid.dtype == torch.bool
    ref_views, _ = ref.protomask.mask_views(base.images[:2], ds.masks[:2], 8)
    torch.testing.assert_close(ds.views[:2], ref_views)


def test_accumulation_equals_large_batch_step():
    from torch.utils.data import DataLoader, TensorDataset
    from protofast.protomask_train import train_protomask

    views, labels = _views(B=8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    runs = []
    for batch, steps in ((4, 2), (8, 1)):
        net = _model(div_grad=True, train_add_on=True)
        loader = DataLoader(TensorDataset(views, labels), batch_size=batch)
        train_protomask(net, loader, loader, joint_epochs=1, fine_tune_epochs=0, accumulation_steps=steps,
                        push=False, progress=False, log=None)
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-9, atol=1e-9)


def test_cli_smoke(tmp_path, capsys):
    import json
    from protofast.cli import main

    out = tmp_path / "run"
    rc = main(["train", "protomask", "--dataset", "synthetic", "--train-size", "48", "--test-size", "32",
               "--epochs", "1", "--fine-tune-epochs", "1", "--view-size", "8", "--embedding-dim", "8",
               "--accumulation", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final test accuracy" in text and "push" in text
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "protomask" and [r["phase"] for r in saved["history"]] == ["joint", "push", "fine_tune"]
    net = ProtoMask.from_config(saved["config"])
    net.load_state_dict(torch.load(out / "model.pt"))


def test_class_layout_cache_follows_identity():
    net = _model(sizes=[2, 2, 2])
    labels = torch.tensor([0, 1])
    a = net.loss(*net(_views(B=2)), labels)[1]["diversity"]
    with torch.no_grad():                        # move prototype 1 to class 1 (in place: the version changes)
        net.prototype_class_identity[1] = torch.tensor([0.0, 1.0, 0.0])
    b = net.loss(*net(_views(B=2)), labels)[1]["diversity"]
    expected = ref.protomask.diversity_loss(net.prototype_vectors.detach(), net.prototype_class_identity, labels)
    assert_close(b, expected, torch.float64)
    assert not torch.equal(a, b)

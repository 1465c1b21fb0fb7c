"""protofast.models.DProtoNet (SEMANTICS.md §4.1–4.3) against a plain float64 formulation that materialises
M_i ⊙ F and every (b, i, m) distance (protofast.reference.dprotonet), plus the multi-image prototype update
(§4.4) and the training entry points.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import protofast
from protofast.models import DProtoNet
from protofast.models.dprotonet import PushView
from protofast.reference import dprotonet as ref
from conftest import assert_close

K, PPC, I, C, D, H, W = 3, 2, 5, 4, 6, 3, 3


def _model(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = DProtoNet(nn.Identity(), K, prototypes_per_class=PPC, num_masks=I, prototype_dim=D,
                      input_shape=(C, H, W), **kwargs)
    return model.to(dtype)


def _batch(B=4, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g, dtype=dtype), torch.tensor([0, 2, 1, 2, 0, 1, 1][:B])


def _reference_step(model, x, labels, cluster_mode, sep_sign):
    """The whole forward + loss in float64, materialised, with autograd through the literal formulas."""
    params = {n: p.detach().clone().double().requires_grad_() for n, p in model.named_parameters()}
    masks = model.masks.detach().double()
    if "masks" in params:
        masks = params["masks"]
    a = model.add_on_layers
    f = torch.nn.functional.conv2d(x, params["add_on_layers.0.weight"], params["add_on_layers.0.bias"])
    f = torch.nn.functional.conv2d(torch.relu(f), params["add_on_layers.2.weight"], params["add_on_layers.2.bias"])
    assert isinstance(a[1], nn.ReLU)
    logits, mind, argmin, _ = ref.head(f, masks, params["prototype_vectors"], params["last_layer.weight"],
                                       eps=model.epsilon)
    total, ce, clst, sd, l1 = ref.losses(logits, mind, labels, model.prototype_class_identity.double(),
                                         params["last_layer.weight"], cluster_mode, sep_sign,
                                         max_dist=float(D))
    grads = dict(zip(params, torch.autograd.grad(total, list(params.values()))))
    return dict(logits=logits, mind=mind, argmin=argmin, total=total, cross_entropy=ce, cluster=clst,
                separation=sd, l1=l1), grads


@pytest.mark.parametrize("cluster_mode", ["masked_min", "masked_max"])
@pytest.mark.parametrize("sep_sign", ["protopnet", "literal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_forward_loss_gradients_match_reference(cluster_mode, sep_sign, dtype):
    model = _model(dtype, cluster_mode=cluster_mode, sep_sign=sep_sign)
    with torch.no_grad():      # move prototypes near the data so that minima are not all clamped
        model.prototype_vectors.mul_(0.1)
    x, y = _batch(dtype=dtype)
    logits, mind = model(x)
    total, terms = model.loss(logits, mind, y)
    expected, ref_grads = _reference_step(model, x.double(), y, cluster_mode, sep_sign)
    assert_close(logits, expected["logits"], dtype, "logits")
    assert_close(mind, expected["mind"], dtype, "min distances")
    _, _, argmin = model.prototype_activations(model.conv_features(x))
    assert torch.equal(argmin, expected["argmin"])
    for name in ("total", "cross_entropy", "cluster", "separation", "l1"):
        assert_close(terms[name], expected[name], dtype, name)
    model.zero_grad()
    total.backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_grads[name], dtype, f"grad {name}")


def test_sep_sign_flips_the_separation_term():
    x, y = _batch()
    out = {}
    for sign in ("protopnet", "literal"):
        model = _model(sep_sign=sign)
        total, terms = model.loss(*model(x), y)
        out[sign] = (total, terms)
    sd = out["protopnet"][1]["separation"]
    assert torch.allclose(out["literal"][0] - out["protopnet"][0], 2 * 0.08 * sd)


def test_trainable_masks_get_gradients_and_stay_in_unit_interval():
    model = _model(masks_trainable=True)
    x, y = _batch()
    expected, ref_grads = _reference_step(model, x, y, "masked_min", "protopnet")
    total, _ = model.loss(*model(x), y)
    total.backward()
    assert_close(model.masks.grad, ref_grads["masks"], torch.float64, "grad masks")
    opt = model.phase("joint", lrs={"masks": 10.0})
    model.zero_grad()
    model.loss(*model(x), y)[0].backward()
    opt.step()
    assert float(model.masks.detach().min()) >= 0 and float(model.masks.detach().max()) <= 1
    assert any(g["name"] == "masks" for g in opt.param_groups)
    model.phase("last_layer")
    assert not model.masks.requires_grad


def test_defaults_are_the_papers():
    model = DProtoNet(nn.Identity(), 2, feature_shape=(8, 7, 7))
    assert model.num_masks == 240 and model.prototype_shape == (20, 512, 1, 1) and model.epsilon == 1e-12
    assert model.coefs == {"crs_ent": 1.0, "clst": 0.8, "sep": -0.08, "l1": 1e-4}
    assert model.cluster_mode == "masked_min" and model.sep_sign == "protopnet"
    assert not model.masks.requires_grad and "masks" in dict(model.named_buffers())
    assert float(model.masks.min()) >= 0 and float(model.masks.max()) <= 1
    again = DProtoNet(nn.Identity(), 2, feature_shape=(8, 7, 7))
    assert torch.equal(model.masks, again.masks)                     # seeded, independent of the global RNG
    w = model.last_layer.weight
    assert set(w.unique().tolist()) == {1.0, -0.5}
    lrs = {g["name"]: g["lr"] for g in model.phase("joint").param_groups}
    assert lrs == {"features": 1e-4, "add_on_layers": 3e-3, "prototype_vectors": 3e-3}
    assert isinstance(model.add_on_layers[1], nn.ReLU) and len(model.add_on_layers) == 3


def test_epsilon_clamp_gives_finite_similarity_at_zero_distance():
    """A prototype equal to a masked vector: distance clamps to 0, similarity log(1/1e-12) ≈ 27.6, finite grads."""
    model = _model()
    x, y = _batch()
    with torch.no_grad():
        z = model.masked_vectors(model.conv_features(x))
        model.prototype_vectors[0, :, 0, 0] = z[0, 2]
    logits, mind = model(x)
    assert float(mind[0, 0].detach()) == pytest.approx(0.0, abs=1e-9)
    total, _ = model.loss(logits, mind, y)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_arguments():
    with pytest.raises(ValueError, match="cluster_mode"):
        _model(cluster_mode="max")
    with pytest.raises(ValueError, match="sep_sign"):
        _model(sep_sign="minus")
    with pytest.raises(ValueError, match="num_masks"):
        DProtoNet(nn.Identity(), 2, num_masks=0, feature_shape=(4, 3, 3))
    with pytest.raises(ValueError, match="mask_init"):
        DProtoNet(nn.Identity(), 2, num_masks=2, prototype_dim=3, feature_shape=(4, 3, 3), mask_init=torch.ones(2, 3, 3))
    model = _model()
    with pytest.raises(ValueError, match="feature map"):
        model(torch.randn(2, C, H + 1, W, dtype=torch.float64))


def test_config_round_trip():
    model = DProtoNet(protofast.models.SmallCNN(channels=(8,)), 2, prototypes_per_class=2, num_masks=4,
                      prototype_dim=5, input_shape=(3, 8, 8))
    again = DProtoNet.from_config(model.config())
    again.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(model(x)[0], again(x)[0])


def test_push_view_positions_are_mask_indices():
    model = _model()
    x, y = _batch(B=6)
    view = PushView(model)
    loader = [(x, y)]
    before = model.prototype_vectors.detach().clone()
    result = protofast.push_prototypes(view, loader, progress=False)
    assert torch.equal(model.prototype_vectors, before)                       # the model is untouched
    z, mind, argmin = model.prototype_activations(model.conv_features(x))
    for m in range(model.num_prototypes):
        b, i = int(result.image_index[m]), int(result.position[m, 0])
        assert int(y[b]) == m // PPC
        own = (y == m // PPC).nonzero().flatten()
        assert b == int(own[mind[own, m].argmin()])
        assert i == int(argmin[b, m])
        assert torch.equal(view.prototype_vectors[m, :, 0, 0], z[b, i])


# --------------------------------------------------------------------------------------------- multi-image update
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from protofast.dprotonet_train import RandomWarp, update_prototypes  # noqa: E402


def _image_model(seed=0):
    torch.manual_seed(seed)
    return DProtoNet(protofast.models.SmallCNN(channels=(4,), coords=False), K, prototypes_per_class=PPC,
                     num_masks=I, prototype_dim=D, input_shape=(3, 8, 8)).double()


def _image_set(n=9, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(n) % K
    return TensorDataset(x, y)


def test_update_R1_without_augmentation_is_plain_projection():
    model = _image_model()
    data = _image_set()
    loader = DataLoader(data, batch_size=4)
    view = PushView(model)
    push = protofast.push_prototypes(view, loader, progress=False, unseen="keep")
    result = update_prototypes(model, loader, R=1, augment=None, progress=False)
    assert torch.equal(result.image_index, push.image_index)
    assert torch.equal(result.mask_index[:, 0], push.position[:, 0])
    assert torch.equal(model.prototype_vectors, view.prototype_vectors)


def _shift(images, generator):
    """A deterministic 'augmentation': copy r of each image is rolled by r pixels (images arrive image-major)."""
    out = images.clone()
    for n in range(images.shape[0]):
        out[n] = torch.roll(images[n], shifts=n % 3, dims=2)
    return out


def test_update_is_the_mean_of_each_copys_nearest_masked_vector():
    model = _image_model(seed=1)
    data = _image_set()
    old = model.prototype_vectors.detach().clone()
    sources = torch.tensor([0, 3, 1, 4, 2, -1])                       # class(m) = m // 2; -1: unchanged
    result = update_prototypes(model, DataLoader(data, batch_size=4), R=3, augment=_shift, source="given",
                               source_indices=sources, batch_size=6, progress=False)
    for m in range(model.num_prototypes):
        if sources[m] < 0:
            assert torch.equal(model.prototype_vectors[m], old[m])
            continue
        x = data[int(sources[m])][0][None]
        vecs = []
        for r in range(3):
            xr = torch.roll(x, shifts=r, dims=3)
            z = ref.masked_gap(model.conv_features(xr), model.masks.double())[0]          # [I, D]
            e = int(((z - old[m, :, 0, 0]) ** 2).sum(1).argmin())
            assert e == int(result.mask_index[m, r])
            vecs.append(z[e])
        assert_close(model.prototype_vectors[m, :, 0, 0].detach(), torch.stack(vecs).mean(0), torch.float64)


def test_update_include_original_and_random_warp_seeded():
    model = _image_model()
    data = _image_set()
    loader = DataLoader(data, batch_size=4)
    a = update_prototypes(model, loader, R=4, include_original=True, seed=3, progress=False)
    pa = model.prototype_vectors.detach().clone()
    model2 = _image_model()
    update_prototypes(model2, loader, R=4, include_original=True, seed=3, progress=False)
    assert torch.equal(pa, model2.prototype_vectors)
    assert a.found.all() and (a.mask_index >= 0).all()
    # include_original: copy 0 of every source is the unaugmented image, so e_0 is the plain projection's mask
    model3 = _image_model()
    plain = update_prototypes(model3, loader, R=1, augment=None, progress=False)
    assert torch.equal(a.mask_index[:, 0], plain.mask_index[:, 0])


def test_random_warp():
    x = torch.rand(3, 3, 10, 10)
    identity = RandomWarp(rotation=0, shear=0, scale=(1, 1), perspective=0)
    torch.testing.assert_close(identity(x, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)
    warp = RandomWarp()
    a = warp(x, torch.Generator().manual_seed(0))
    b = warp(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, x, atol=1e-2)


def test_update_bad_arguments():
    model = _image_model()
    loader = DataLoader(_image_set(), batch_size=4)
    with pytest.raises(ValueError, match="R"):
        update_prototypes(model, loader, R=0, progress=False)
    with pytest.raises(ValueError, match="source_indices"):
        update_prototypes(model, loader, source="given", progress=False)
    with pytest.raises(ValueError, match="shuffle"):
        update_prototypes(model, DataLoader(_image_set(), batch_size=4, shuffle=True), progress=False)
    with pytest.raises(TypeError, match="DProtoNet"):
        update_prototypes(protofast.models.ProtoPNet(nn.Identity(), 2, backbone_channels=4), loader)


# --------------------------------------------------------------------------------------------- training, CLI
def test_cli_train_dprotonet_smoke(tmp_path, capsys):
    import json

    from protofast.cli import main
    from protofast.dprotonet_train import load_dprotonet

    out = tmp_path / "run"
    rc = main(["train", "dprotonet", "--epochs", "2", "--warm-epochs", "1", "--train-size", "60", "--test-size",
               "30", "--num-masks", "8", "--copies", "2", "--update-every", "1", "--last-layer-iters", "1",
               "--batch-size", "30", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final test accuracy" in text and "prototype update after epoch 1 (R=2)" in text
    config = json.loads((out / "config.json").read_text())
    phases = [row["phase"] for row in config["history"]]
    assert phases == ["warm", "update", "last 1", "joint", "update", "last 1"]
    assert len(config["prototype_source_index"]) == 20
    model = load_dprotonet(str(out))
    assert model.num_masks == 8 and model.feature_size == (4, 4)
    x = torch.rand(2, 3, 32, 32)
    assert model(x)[0].shape == (2, 10)


# --------------------------------------------------------------------------------------------- MDM decoder
from protofast import mdm  # noqa: E402


def test_mdm_batched_equals_one_problem_at_a_time():
    """All (image, size) mask-vector problems in one batch follow exactly their separate trajectories."""
    model = _image_model(seed=3)
    x = _image_set(n=3).tensors[0]
    j = torch.tensor([0, 3, 1])
    with torch.no_grad():
        t = mdm._masked_vector(model, x, j) + 0.05
    sizes = (2, 3, 5)
    batched = mdm.optimise_mask_vectors(model, x, j, t, sizes=sizes, iterations=6, lr=0.05, eta=0.5)
    assert [tuple(d.shape) for d in batched] == [(3, 2, 2), (3, 3, 3), (3, 5, 5)]
    for n in range(3):
        for k, a in enumerate(sizes):
            (alone,) = mdm.optimise_mask_vectors(model, x[n:n + 1], j[n:n + 1], t[n:n + 1], sizes=(a,),
                                                 iterations=6, lr=0.05, eta=0.5)
            torch.testing.assert_close(batched[k][n], alone[0], rtol=1e-9, atol=1e-9)
    assert not torch.equal(batched[0], torch.full_like(batched[0], 0.5))       # it moved
    assert all(float(d.min()) >= 0 and float(d.max()) <= 1 for d in batched)   # clamped
    assert all(p.grad is None for p in model.parameters())                      # network frozen


def test_mdm_generate_mask_threshold_normalise_and_constant_guard():
    d = [torch.tensor([[[1.0, 0.0], [1.0, 0.5]]]), torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]),
         torch.tensor([[[1.0, 1.0], [0.5, 1.0]]])]
    A = mdm.generate_mask(d, (2, 2), gamma=3.0)                                 # S = [[3, 2], [2.5, 2.5]]
    torch.testing.assert_close(A, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    A = mdm.generate_mask(d, (2, 2), gamma=2.0)                                 # all kept: (S − 2)/(3 − 2)
    torch.testing.assert_close(A, torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]))
    low = [torch.zeros(1, 2, 2)]
    assert torch.equal(mdm.generate_mask(low, (4, 4)), torch.zeros(1, 4, 4))   # constant map -> zeros
    assert torch.isnan(mdm.generate_mask(low, (4, 4), constant_map="nan")).all()
    with pytest.raises(ValueError, match="constant_map"):
        mdm.generate_mask(low, (4, 4), constant_map="one")
    B = mdm.binarise(torch.tensor([[[0.1, 0.9], [0.5, 0.3]]]), keep=0.5)
    assert B.tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    B = mdm.binarise(torch.tensor([[[0.0, 0.7], [0.0, 0.0]]]), keep=0.5)      # zeros (below γ) never kept
    assert B.tolist() == [[[0.0, 1.0], [0.0, 0.0]]]


def test_mdm_explain_and_figure(tmp_path):
    model = _image_model(seed=4)
    x = _image_set(n=2).tensors[0]
    predicted, proto, j_x = mdm.prototypes_for(model, x)
    own = model.prototype_class_identity[proto].argmax(1)
    assert torch.equal(own, predicted)
    result = mdm.explain(model, x, x.flip(0), sizes=(2, 3), iterations=3)
    assert result.mask.shape == (2, 8, 8) and result.heatmap.shape == (2, 3, 8, 8)
    assert float(result.mask.min()) >= 0 and float(result.mask.max()) <= 1
    torch.testing.assert_close(result.heatmap, 0.5 * x + 0.3 * result.mask[:, None])
    path = mdm.save_mdm_figure(result, x, x.flip(0), str(tmp_path / "mdm.png"))
    assert (tmp_path / "mdm.png").stat().st_size > 1000 and path.endswith("mdm.png")


def test_head_and_loss_compile_fullgraph():
    """masked_gap → channels-first fused min distances → log-similarity → last layer → losses in one graph."""
    model = _model(torch.float32)
    x, y = _batch(dtype=torch.float32)
    f = model.conv_features(x).detach().requires_grad_()

    def step(features):
        logits, mind = model.head(features)
        return model.loss(logits, mind, y)[0]

    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        eager = step(f)
        (g_eager,) = torch.autograd.grad(eager, (f,))
        out = compiled(f)
        (g_compiled,) = torch.autograd.grad(out, (f,))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_compiled, g_eager)

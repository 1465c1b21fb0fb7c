"""protofast.models.PIPNet and the dataset top-k against a faithful re-implementation of M-Nauta/PIPNet
(tests/pipnet_original_module.py): same weights → same presence scores, outputs, losses in every phase, gradients
of every parameter, shrink, abstention, explanation sizes, and the same top-k as the original's per-image loop."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn

from pipnet_original_module import (calculate_loss, construct_tiny_pipnet, eval_metrics, phase_weights,
                                    shrink_step, topk_loop, zero_unused)
from protofast.models import PIPNet, SmallCNN, dataset_topk, zero_unused_prototypes

K, C = 3, 12


def pair(num_features=0, bias=False, seed=0, dtype=torch.float64):
    """The original module and a protofast PIPNet holding the same weights."""
    orig = construct_tiny_pipnet(num_classes=K, channels=C, num_features=num_features, bias=bias, seed=seed)
    model = PIPNet(copy.deepcopy(orig._net), K, num_prototypes=num_features or None, bias=bias, backbone_channels=C)
    with torch.no_grad():
        if num_features:
            model.add_on.weight.copy_(orig._add_on[0].weight)
            model.add_on.bias.copy_(orig._add_on[0].bias)
        model.classification.weight.copy_(orig._classification.weight)
        if bias:
            orig._classification.bias.uniform_(0.0, 0.5)
            model.classification.bias.copy_(orig._classification.bias)
        model.classification.normalization_multiplier.copy_(orig._multiplier)
    return orig.to(dtype), model.to(dtype)


def images(n, seed=1, dtype=torch.float64, size=8):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _map_names(orig_grads):
    """Original parameter names → protofast names."""
    out = {}
    for n, g in orig_grads.items():
        n = n.replace("_net.", "backbone.").replace("_add_on.0.", "add_on.").replace("_classification.",
                                                                                      "classification.")
        out[n] = g
    return out


# ---------------------------------------------------------------------------------------------- construction
def test_init_matches_the_original_defaults():
    torch.manual_seed(0)
    model = PIPNet(SmallCNN(channels=(8,), coords=False), 200, num_prototypes=64, input_shape=(3, 16, 16))
    w = model.classification.weight.detach()
    assert w.shape == (200, 64) and abs(float(w.mean()) - 1.0) < 0.01 and abs(float(w.std()) - 0.1) < 0.01
    kappa = model.classification.normalization_multiplier
    assert kappa.shape == (1,) and float(kappa) == 2.0 and not kappa.requires_grad
    assert model.classification.bias is None
    bound = nn.init.calculate_gain("sigmoid") * (6 / (8 + 64)) ** 0.5                 # Xavier-uniform, sigmoid gain
    wmax = float(model.add_on.weight.detach().abs().max())
    assert 0.9 * bound < wmax <= bound
    assert model.add_on.bias is not None
    plain = PIPNet(SmallCNN(channels=(8,), coords=True), 5)
    assert plain.num_prototypes == 10 and isinstance(plain.add_on, nn.Identity)    # D = backbone channels


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=2.0), "num_classes"),
    (dict(num_prototypes=0), "num_prototypes"), (dict(inference_clamp=-1.0), "inference_clamp"),
    (dict(weight_shrink=-1e-3), "weight_shrink"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(num_classes=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PIPNet(SmallCNN(channels=(4,)), **args)
    with pytest.raises(TypeError, match="backbone"):
        PIPNet("resnet", 3)


def test_features_of_the_wrong_width_are_rejected():
    model = PIPNet(SmallCNN(channels=(4,), coords=False), 3, backbone_channels=4)
    model.backbone = nn.Conv2d(3, 5, 1)
    with pytest.raises(ValueError, match="features"):
        model(images(2, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("num_features, bias", [(0, False), (7, True)])
@pytest.mark.parametrize("inference", [False, True])
def test_forward_matches_the_original(num_features, bias, inference):
    orig, model = pair(num_features, bias)
    x = images(5)
    z, pooled_o, out_o = orig(x, inference=inference)
    pooled, out = model(x, inference=inference)
    torch.testing.assert_close(pooled, pooled_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, out_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.softmax_maps(x), z, rtol=1e-12, atol=1e-12)
    _, argmax = model.presence(x)
    flat = z.flatten(2)
    assert torch.equal(flat.gather(2, argmax[..., None])[..., 0], flat.amax(2))
    if inference:
        assert bool(((pooled == 0) | (pooled >= 0.1)).all())
        assert bool((pooled == 0).any()) == (num_features == 0)      # D = 7: every score ≥ 1/7 > 0.1


def test_forward_float32_matches_the_float64_original():
    orig, model = pair(7, True)
    x = images(4)
    _, pooled_o, out_o = orig(x)
    pooled, out = model.float()(x.float())
    torch.testing.assert_close(pooled.double(), pooled_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), out_o, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("phase", ["pretrain", "train", "finetune"])
@pytest.mark.parametrize("num_features, bias", [(0, False), (7, True)])
def test_losses_and_gradients_match_the_original(phase, num_features, bias):
    orig, model = pair(num_features, bias)
    x = images(6, seed=3)                                    # [2B] = view 1 (3 images) then view 2
    y = torch.tensor([0, 2, 1])
    epoch, epochs = 2, 4
    align_w, t_w, u_w, cl_w = phase_weights(phase == "pretrain", epoch, epochs)
    z, pooled, out = orig(x)
    loss_o, acc = calculate_loss(z, pooled, out, y, align_w, t_w, u_w, cl_w, orig._multiplier,
                                 phase == "pretrain", phase == "finetune", nn.NLLLoss(), None, print=False, EPS=1e-8)
    loss_o.backward()
    res = model.losses(x, None if phase == "pretrain" else y, phase=phase,
                       align_weight=epoch / epochs if phase == "pretrain" else None)
    res.loss.backward()
    torch.testing.assert_close(res.loss, loss_o.reshape(()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.pooled, pooled, rtol=1e-12, atol=1e-12)
    if phase != "pretrain":
        torch.testing.assert_close(res.out, out, rtol=1e-12, atol=1e-12)
    expected = _map_names(grads(orig))
    actual = grads(model)
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-11, msg=name)
    assert not model.classification.normalization_multiplier.requires_grad


def test_classifier_weights_at_zero_get_no_gradient_and_stay_zero():
    orig, model = pair(0, False)
    with torch.no_grad():
        model.classification.weight[:, :4] = 0.0
        model.classification.weight[1, 5] = -0.3
    x, y = images(4), torch.tensor([0, 1])
    model.losses(x, y).loss.backward()
    g = model.classification.weight.grad
    assert torch.equal(g[:, :4], torch.zeros_like(g[:, :4])) and float(g[1, 5]) == 0.0
    assert float(g[:, 4:].abs().sum()) > 0
    opt = torch.optim.AdamW(model.param_groups(), lr=0.05)
    opt.step()
    model.shrink_weights_()
    assert torch.equal(model.classification.weight[:, :4], torch.zeros(K, 4, dtype=torch.float64))


def test_shrink_matches_the_original():
    orig, model = pair(0, True)
    with torch.no_grad():
        for net_w, b, k in ((orig._classification.weight, orig._classification.bias, orig._multiplier),
                            (model.classification.weight, model.classification.bias,
                             model.classification.normalization_multiplier)):
            net_w.copy_(torch.linspace(-0.01, 0.01, net_w.numel(), dtype=torch.float64).view_as(net_w))
            b.copy_(torch.tensor([-0.5, 0.0, 0.25], dtype=torch.float64))
            k.fill_(0.5)
    shrink_step(orig)
    model.shrink_weights_()
    torch.testing.assert_close(model.classification.weight, orig._classification.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.classification.bias, orig._classification.bias, rtol=0, atol=0)
    assert float(model.classification.normalization_multiplier) == 1.0 == float(orig._multiplier)
    assert float(model.classification.weight.detach().min()) == 0.0


# ---------------------------------------------------------------------------------------------- predict and sizes
def test_predict_abstains_on_all_zero_output_and_uses_first_occurrence():
    _, model = pair(0, False)
    x = images(4)
    with torch.no_grad():
        pooled, _ = model(x, inference=True)
        w = model.classification.weight
        w.zero_()
        d = int(pooled[0].argmax())                  # image 0 has prototype d present
        w[1, d] = w[2, d] = 1.0                       # tie between class 1 and 2 → class 1
    pred, out, pooled2 = model.predict(x)
    assert int(pred[0]) == 1
    absent = (pooled2[:, d] == 0)
    assert torch.equal(pred[absent], torch.full((int(absent.sum()),), -1))
    assert torch.equal(out[absent], torch.zeros(int(absent.sum()), K, dtype=out.dtype))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_explanation_sizes_match_the_original_evaluation(seed):
    orig, model = pair(0, False, seed=seed)
    with torch.no_grad():      # a sparse scoring sheet: some weights zero, some just above/below 1e-3
        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(K, C, generator=g, dtype=torch.float64) < 0.5
        w = torch.where(mask, torch.zeros((), dtype=torch.float64), orig._classification.weight)
        w[0, 0], w[1, 1] = 5e-4, 2e-3
        w[:, 2] = 0
        orig._classification.weight.copy_(w)
        model.classification.weight.copy_(w)
    x = images(16, seed=seed + 5)
    ref = eval_metrics(orig, x)
    pred, out, pooled = model.predict(x)
    sizes = model.local_size(pooled, pred)
    assert model.global_size() == ref["global_size"] and model.global_size() < C
    assert model.sparsity() == pytest.approx(ref["sparsity"])
    assert torch.equal(sizes.all_classes, ref["local_size_all"])
    not_abstained = pred >= 0
    assert torch.equal(sizes.predicted[not_abstained], ref["local_size_predicted"][not_abstained].long())
    assert torch.equal(sizes.predicted[~not_abstained], torch.zeros_like(sizes.predicted[~not_abstained]))
    assert int((pred < 0).sum()) == ref["abstained"]
    assert torch.equal(model.used_prototypes(), torch.nonzero((w > 1e-3).any(0)).flatten())


# ---------------------------------------------------------------------------------------------- top-k
def _tied_images():
    """Images with exact duplicates (within and across batches) and an all-constant image, so presence scores
    tie exactly (and the inference clamp makes many scores exactly 0)."""
    x = images(11, seed=9)
    x[4] = x[1]
    x[9] = x[1]
    x[7] = x[2]
    x[10] = 0.5
    return x


@pytest.mark.parametrize("k, batch", [(3, 4), (10, 3), (15, 11)])
def test_dataset_topk_matches_the_original_loop(k, batch):
    orig, model = pair(0, False, seed=4)
    with torch.no_grad():
        orig._classification.weight[:, 3] = 5e-4      # not relevant: the original skips it
        model.classification.weight[:, 3] = 5e-4
    x = _tied_images()
    ref = topk_loop(orig, x, k=k, tie="stable")
    loader = [x[i:i + batch] for i in range(0, len(x), batch)]
    topk = dataset_topk(model, loader, k=k)
    assert topk.feature_shape == (4, 4)
    assert torch.equal(topk.relevant, torch.tensor([p in ref for p in range(C)]))
    for p, entries in ref.items():
        expected = sorted(entries, key=lambda t: (-t[1], t[0]))
        n = len(expected)
        assert topk.image_index[p, :n].tolist() == [i for i, _ in expected], p
        torch.testing.assert_close(topk.scores[p, :n], torch.tensor([s for _, s in expected], dtype=topk.scores.dtype),
                                   rtol=1e-12, atol=1e-12)
        assert torch.equal(topk.image_index[p, n:], torch.full((k - n,), -1))
        assert bool(torch.isinf(topk.scores[p, n:]).all())
        # locations: the first-occurrence maximum of the softmax map in that image
        for c in range(n):
            z = orig(x[expected[c][0]:expected[c][0] + 1])[0][0, p].flatten()
            assert int(topk.location[p, c]) == int(torch.argmax(z))


def test_dataset_topk_random_ties_pick_among_tied_images():
    _, model = pair(0, False, seed=4)
    x = torch.cat([_tied_images()] * 2)
    stable = dataset_topk(model, [x[:8], x[8:15], x[15:]], k=4)
    choices = set()
    for s in range(6):
        rnd = dataset_topk(model, [x[:8], x[8:15], x[15:]], k=4, tie="random",
                           generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(rnd.scores, stable.scores, rtol=0, atol=0)   # same scores, maybe other images
        for p in range(C):
            for c in range(4):
                i = int(rnd.image_index[p, c])
                score = model(x[i:i + 1], inference=True)[0][0, p].detach()
                assert float(score) == float(rnd.scores[p, c])
        choices.add(tuple(rnd.image_index.flatten().tolist()))
    assert len(choices) > 1


def test_dataset_topk_with_the_original_random_loop_scores():
    orig, model = pair(0, False, seed=4)
    x = _tied_images()
    ref = topk_loop(orig, x, k=3, tie="random", rng=random.Random(3))
    topk = dataset_topk(model, [x], k=3, tie="random", generator=torch.Generator().manual_seed(0))
    for p, entries in ref.items():        # random tie-breaks may pick other images, never other scores
        assert sorted((s for _, s in entries), reverse=True) == pytest.approx(topk.scores[p].tolist(), abs=1e-12)


def test_zero_unused_prototypes_matches_the_original():
    orig, model = pair(0, False, seed=6)
    x = images(6, seed=2)
    ref = topk_loop(orig, x, k=2)
    topk = dataset_topk(model, [x[:4], x[4:]], k=2)
    # make the decision non-trivial: a threshold between the top scores of the prototypes
    tops = sorted(max(s for _, s in e) for e in ref.values())
    threshold = (tops[len(tops) // 2] + tops[len(tops) // 2 - 1]) / 2
    zeroed_ref = sorted(zero_unused(orig, ref, threshold))
    zeroed = zero_unused_prototypes(model, topk, threshold)
    assert zeroed.tolist() == zeroed_ref and 0 < len(zeroed_ref) < C
    torch.testing.assert_close(model.classification.weight, orig._classification.weight, rtol=0, atol=0)


def test_dataset_topk_bad_arguments():
    _, model = pair()
    with pytest.raises(ValueError, match="k"):
        dataset_topk(model, [images(2)], k=0)
    with pytest.raises(ValueError, match="tie"):
        dataset_topk(model, [images(2)], tie="first")

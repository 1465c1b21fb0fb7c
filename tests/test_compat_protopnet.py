"""protofast.compat.protopnet against a faithful re-implementation of the original PPNet (tests/protopnet_original_module.py).

Same weights in the original module and in a patched copy: identical logits, min distances, cost terms and
gradients (fp32 tolerance), ``ones`` and the state dict untouched, pickling / deepcopy, and the same pushed
prototypes, image indices and receptive-field boxes as the original push loop on a dataset with deliberate ties
(duplicate images across and within batches, duplicate patches) and a class absent from the data.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import protofast.compat.protopnet as pf
from protopnet_original_module import PPNet, construct_tiny_ppnet, push_prototypes as original_push, train_costs

RTOL, ATOL = 1e-5, 1e-5


def _pair(**kwargs):
    original = construct_tiny_ppnet(**kwargs)
    patched = pf.patch(copy.deepcopy(original))
    return original, patched


def _batch(seed=1, B=6, K=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 16, 16, generator=g), torch.randint(0, K, (B,), generator=g)


def _loss(terms, logits, y):
    return F.cross_entropy(logits, y) + 0.8 * terms["cluster"] - 0.08 * terms["separation"] + 1e-4 * terms["l1"]


@pytest.mark.parametrize("proto_hw", [(1, 1), (2, 2)])
def test_forward_costs_and_gradients_match_original(proto_hw):
    original, patched = _pair(proto_hw=proto_hw)
    assert type(patched) is not PPNet and isinstance(patched, PPNet) and pf.is_patched(patched)
    x, y = _batch()
    logits_o, mind_o = original(x)
    logits_p, mind_p = patched(x)
    torch.testing.assert_close(mind_p, mind_o, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(logits_p, logits_o, rtol=RTOL, atol=ATOL)

    terms_o = train_costs(nn.DataParallel(original), mind_o, y)
    terms_p = pf.costs(patched, mind_p, y)
    assert set(terms_o) == set(terms_p)
    for k in terms_o:
        torch.testing.assert_close(terms_p[k], terms_o[k], rtol=RTOL, atol=ATOL, msg=k)

    _loss(terms_o, logits_o, y).backward()
    _loss(terms_p, logits_p, y).backward()
    grads_o = dict(original.named_parameters())
    for name, p in patched.named_parameters():
        g_o = grads_o[name].grad
        if g_o is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, g_o, rtol=1e-4, atol=1e-5, msg=name)
    assert patched.ones.grad is None and not patched.ones.requires_grad
    assert patched.prototype_vectors.grad.abs().sum() > 0          # the comparison is not vacuous


@pytest.mark.parametrize("activation", ["linear", lambda d: 1.0 / (d + 1.0)])
def test_other_activations_and_unmasked_costs(activation):
    original, patched = _pair(prototype_activation_function=activation)
    x, y = _batch(seed=2)
    logits_o, mind_o = original(x)
    logits_p, mind_p = patched(x)
    torch.testing.assert_close(logits_p, logits_o, rtol=RTOL, atol=ATOL)
    for class_specific, use_l1_mask in [(True, False), (False, True)]:
        t_o = train_costs(nn.DataParallel(original), mind_o, y, class_specific, use_l1_mask)
        t_p = pf.costs(patched, mind_p, y, class_specific, use_l1_mask)
        assert set(t_o) == set(t_p)
        for k in t_o:
            torch.testing.assert_close(t_p[k], t_o[k], rtol=RTOL, atol=ATOL)


def test_full_maps_push_forward_and_state_untouched():
    original, patched = _pair(proto_hw=(2, 2))
    x, _ = _batch(seed=3)
    torch.testing.assert_close(patched.prototype_distances(x), original.prototype_distances(x), rtol=RTOL, atol=ATOL)
    fo, do = original.push_forward(x)
    fp, dp = patched.push_forward(x)
    torch.testing.assert_close(fp, fo)
    assert dp.shape == do.shape == (6, 12, 3, 3)
    torch.testing.assert_close(dp, do, rtol=RTOL, atol=ATOL)
    assert isinstance(patched.ones, nn.Parameter) and torch.equal(patched.ones, original.ones)
    assert list(patched.state_dict()) == list(original.state_dict())
    # the epsilon attribute is honoured
    patched.epsilon = original.epsilon = 1e-2
    torch.testing.assert_close(patched(x)[0], original(x)[0], rtol=RTOL, atol=ATOL)


def test_pickle_deepcopy_patch_twice_and_unpatch(tmp_path):
    original, patched = _pair()
    x, _ = _batch(seed=4)
    expected = original(x)[0]
    cls = type(patched)
    assert pf.patch(patched) is patched and type(patched) is cls and cls.__bases__[1] is PPNet   # idempotent
    path = os.path.join(tmp_path, "ppnet.pth")
    torch.save(patched, path)
    loaded = torch.load(path, weights_only=False)
    assert pf.is_patched(loaded) and isinstance(loaded, PPNet) and isinstance(loaded.ones, nn.Parameter)
    torch.testing.assert_close(loaded(x)[0], expected, rtol=RTOL, atol=ATOL)
    clone = copy.deepcopy(patched)
    assert pf.is_patched(clone) and clone.prototype_vectors is not patched.prototype_vectors
    torch.testing.assert_close(clone(x)[0], expected, rtol=RTOL, atol=ATOL)
    pf.unpatch(loaded)
    assert type(loaded) is PPNet and not pf.is_patched(loaded)
    torch.save(loaded, path)                                       # plain class again: loads without protofast
    assert type(torch.load(path, weights_only=False)) is PPNet
    wrapped = nn.DataParallel(copy.deepcopy(original))
    assert pf.patch(wrapped) is wrapped and pf.is_patched(wrapped.module)


def test_patch_rejects_non_ppnet():
    with pytest.raises(AttributeError, match="prototype_vectors"):
        pf.patch(nn.Linear(3, 4))


# ------------------------------------------------------------------------------------------------ push
def _tie_dataset(model, K=4, absent=3, seed=5):
    """22 images of 3 classes (class ``absent`` never appears), batch size 5, with deliberate exact ties:

    * image 4 is constant (its interior feature patches are identical) and image 12 is a copy of it;
    * image 7 copies image 2 (other batch), image 3 copies image 1 (same batch);
    * prototype 0 (class 0) is set to an interior patch of the constant image and prototype 3 (class 1) to a
      patch of image 2, so their minimum distance is attained at several positions and images.
    """
    g = torch.Generator().manual_seed(seed)
    N = 22
    images = torch.rand(N, 3, 16, 16, generator=g)
    labels = torch.randint(0, K - 1, (N,), generator=g)
    labels[labels == absent] = 0
    images[4] = 0.5
    labels[4] = 0
    images[12], labels[12] = images[4], 0
    labels[2] = 1
    images[7], labels[7] = images[2], 1
    images[3], labels[3] = images[1], labels[1]
    with torch.no_grad():
        feats = model.conv_features(images)
        h, w = model.prototype_shape[2:]
        model.prototype_vectors[0] = feats[4, :, 1:1 + h, 1:1 + w]
        model.prototype_vectors[3] = feats[2, :, 1:1 + h, 2:2 + w]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=5, shuffle=False)
    return loader


@pytest.mark.parametrize("proto_hw,class_specific", [((1, 1), True), ((2, 2), True), ((1, 1), False)])
def test_push_matches_original_push_loop(tmp_path, proto_hw, class_specific):
    original = construct_tiny_ppnet(proto_hw=proto_hw, seed=7)
    loader = _tie_dataset(original)
    patched = pf.patch(copy.deepcopy(original))
    before = patched.prototype_vectors.detach().clone()

    dist_o, rf_o = original_push(loader, nn.DataParallel(original), class_specific=class_specific)
    logs = []
    pf.push_prototypes(loader, nn.DataParallel(patched), class_specific=class_specific,
                       root_dir_for_saving_prototypes=str(tmp_path), epoch_number=3,
                       proto_bound_boxes_filename_prefix="bb", prototype_self_act_filename_prefix="act",
                       log=logs.append)
    result = pf.push_prototypes.last_result

    assert torch.equal(patched.prototype_vectors, original.prototype_vectors)
    assert not torch.equal(patched.prototype_vectors, before)
    np.testing.assert_array_equal(result.image_index.numpy(), rf_o[:, 0])
    seen = rf_o[:, 0] >= 0
    np.testing.assert_allclose(result.distance.numpy()[seen], dist_o[seen], rtol=1e-5, atol=1e-5)
    saved_rf = np.load(os.path.join(tmp_path, "epoch-3", "bb-receptive_field3.npy"))
    np.testing.assert_array_equal(saved_rf, rf_o)
    bound = np.load(os.path.join(tmp_path, "epoch-3", "bb3.npy"))
    np.testing.assert_array_equal(bound[:, 0], rf_o[:, 0])
    assert ((bound[seen, 1] < bound[seen, 2]) & (bound[seen, 3] < bound[seen, 4])).all()
    assert os.path.exists(os.path.join(tmp_path, "epoch-3", "act0.npy"))
    assert any("push time" in line for line in logs)
    # the deliberate ties: earliest image, then earliest position
    assert int(result.image_index[0]) == 4 and tuple(result.position[0].tolist()) == (1, 1)
    if class_specific:
        assert int(result.image_index[3]) == 2 and tuple(result.position[3].tolist()) == (1, 2)
        # class 3 never appears: its prototypes are zero, in both
        assert (~result.found[9:]).all() and torch.count_nonzero(patched.prototype_vectors[9:]) == 0
    else:
        assert result.found.all()


def test_push_matches_reference_push_loop():
    """protofast.reference.push_original (the benchmark baseline) agrees with the test oracle."""
    from protofast.reference.push_original import push_prototypes_original

    a = construct_tiny_ppnet(proto_hw=(2, 2), seed=8)
    loader = _tie_dataset(a)
    b = copy.deepcopy(a)
    dist_o, rf_o = original_push(loader, nn.DataParallel(a))
    ref = push_prototypes_original(b, loader)
    assert torch.equal(a.prototype_vectors, b.prototype_vectors)
    np.testing.assert_array_equal(ref.image_index, rf_o[:, 0])
    np.testing.assert_array_equal(ref.distance, dist_o)

"""protofast.compat.pipnet against the faithful re-implementation of M-Nauta/PIPNet
(tests/pipnet_original_module.py): a patched copy of the original module gives the same forward outputs, and the
drop-in ``calculate_loss`` the same loss, accuracy and gradients of every parameter in every phase, for patched
and unpatched models; patch/unpatch, DataParallel, pickling."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import protofast.compat.pipnet as pf
from pipnet_original_module import PIPNet, calculate_loss, construct_tiny_pipnet, phase_weights

K, C = 3, 12


def _pair(num_features=0, bias=False, seed=0):
    original = construct_tiny_pipnet(num_classes=K, channels=C, num_features=num_features, bias=bias,
                                     seed=seed).double()
    if bias:
        with torch.no_grad():
            original._classification.bias.uniform_(0.0, 0.3)
    return original, pf.patch(copy.deepcopy(original))


def _x(n, seed=1):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class _Postfix:
    def __init__(self):
        self.text = None

    def set_postfix_str(self, text, refresh=True):
        self.text = text


@pytest.mark.parametrize("num_features, bias", [(0, False), (5, True)])
@pytest.mark.parametrize("inference", [False, True])
def test_patched_forward_matches_the_original(num_features, bias, inference):
    original, patched = _pair(num_features, bias)
    x = _x(4)
    for a, b in zip(original(x, inference=inference), patched(x, inference=inference)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert isinstance(patched, PIPNet) and pf.is_patched(patched) and not pf.is_patched(original)
    assert patched.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("phase", ["pretrain", "train", "finetune"])
@pytest.mark.parametrize("num_features, bias", [(0, False), (5, True)])
@pytest.mark.parametrize("eps", [1e-8, 1e-10])
@pytest.mark.parametrize("use_patched", [True, False])
def test_calculate_loss_matches_the_original(phase, num_features, bias, eps, use_patched):
    original, patched = _pair(num_features, bias)
    if not use_patched:
        pf.unpatch(patched)
    x, y = _x(6, seed=4), torch.tensor([2, 0, 1])
    pretrain, finetune = phase == "pretrain", phase == "finetune"
    weights = phase_weights(pretrain, epoch=3, nr_epochs=5)
    criterion = nn.NLLLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    results = []
    for net, fn in ((original, calculate_loss), (patched, pf.calculate_loss)):
        z, pooled, out = net(x)
        assert hasattr(z, "_protofast_pre_softmax") == (net is patched and use_patched)    # the fused path
        bar = _Postfix()
        loss, acc = fn(z, pooled, out, y, *weights, net._multiplier, pretrain, finetune, criterion, bar,
                       print=True, EPS=eps)
        loss.backward()
        results.append((loss, acc, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
                        bar.text))
    (l0, a0, g0, t0), (l1, a1, g1, t1) = results
    torch.testing.assert_close(l1.reshape(()), l0.reshape(()), rtol=1e-10, atol=1e-12)
    assert a1 == a0
    assert g1.keys() == g0.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-11, msg=name)
    assert t1 is not None and t1.startswith(f"L: {l0.item():.3f}")


def test_calculate_loss_float32_patched_matches_float64_original():
    original, patched = _pair(5, True)
    patched.float()
    x, y = _x(8, seed=7), torch.tensor([0, 1, 2, 1])
    z, pooled, out = original(x)
    ref, _ = calculate_loss(z, pooled, out, y, 5.0, 2.0, 0.0, 2.0, original._multiplier, False, False,
                            nn.NLLLoss(), None, print=False, EPS=1e-8)
    z, pooled, out = patched(x.float())
    loss, _ = pf.calculate_loss(z, pooled, out, y, 5.0, 2.0, 0.0, 2.0, patched._multiplier, False, False,
                                nn.NLLLoss(), None, print=False, EPS=1e-8)
    torch.testing.assert_close(loss.double().reshape(()), ref.reshape(()), rtol=1e-5, atol=1e-5)


def test_patch_unpatch_dataparallel_and_pickle():
    original, patched = _pair(5, False)
    assert pf.patch(patched) is patched                      # idempotent
    wrapped = nn.DataParallel(copy.deepcopy(original))
    assert pf.patch(wrapped) is wrapped and pf.is_patched(wrapped)
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert pf.is_patched(loaded)
    x = _x(2)
    torch.testing.assert_close(loaded(x)[2], original(x)[2], rtol=1e-12, atol=1e-12)
    assert pf.is_patched(copy.deepcopy(patched))
    pf.unpatch(patched)
    assert type(patched) is PIPNet and not pf.is_patched(patched)


def test_patch_rejects_non_pipnet_modules():
    with pytest.raises(AttributeError, match="_classification"):
        pf.patch(nn.Linear(2, 2))
    original, _ = _pair()
    original._add_on = nn.Sequential(nn.Identity())
    with pytest.raises(ValueError, match="Softmax"):
        pf.patch(original)


def test_calculate_loss_rejects_an_odd_batch():
    original, patched = _pair()
    z, pooled, out = patched(_x(3))
    with pytest.raises(ValueError, match="proto_features"):
        pf.calculate_loss(z, pooled, out, torch.tensor([0]), 5.0, 2.0, 0.0, 2.0, patched._multiplier, False, False,
                          nn.NLLLoss(), None, print=False)

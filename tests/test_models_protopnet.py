"""protofast.models.ProtoPNet against plain-torch formulas (SEMANTICS.md §1.1–1.3, 1.6, 1.7)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from protofast.models import ProtoPNet, SmallCNN, build_backbone


def make_model(loss="minmax", ppc=3, K=4, D=8, hw=(1, 1), seed=0, **kw):
    torch.manual_seed(seed)
    return ProtoPNet(SmallCNN(channels=(8, 8)), K, prototypes_per_class=ppc, prototype_shape=(D, *hw), loss=loss,
                     **kw).double()


def plain_head(model, z):
    """cdist-style head in float64: every h×w window against every prototype, min, log-similarity, linear."""
    M, D, h, w = model.prototype_shape
    B, _, H, W = z.shape
    patches = F.unfold(z, (h, w)).transpose(1, 2)                          # [B, L, D·h·w]
    protos = model.prototype_vectors.reshape(M, -1)
    d = ((patches[:, :, None, :] - protos[None, None]) ** 2).sum(-1)        # [B, L, M]
    mind = d.min(1).values                                                  # [B, M]
    sim = torch.log((mind + 1) / (mind + model.epsilon))
    return sim @ model.last_layer.weight.t(), mind, d


@pytest.mark.parametrize("hw", [(1, 1), (2, 2)])
def test_forward_and_gradients_match_plain_torch(hw):
    model = make_model(hw=hw)
    x = torch.rand(5, 3, 16, 16, dtype=torch.float64)
    logits, mind = model(x)
    z = model.conv_features(x)
    ref_logits, ref_mind, _ = plain_head(model, z)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mind, ref_mind, rtol=1e-9, atol=1e-9)
    assert logits.shape == (5, 4) and mind.shape == (5, model.num_prototypes)

    g = torch.randn_like(logits)
    params = [model.prototype_vectors, model.last_layer.weight, model.add_on_layers[0].weight,
              model.features.stages[0][0].weight]
    ours = torch.autograd.grad((logits * g).sum(), params)
    theirs = torch.autograd.grad((plain_head(model, model.conv_features(x))[0] * g).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_init_matches_the_original():
    model = make_model(ppc=3, K=4)
    M, K = 12, 4
    assert model.num_prototypes == M and model.num_classes == K and model.prototype_shape == (M, 8, 1, 1)
    identity = model.prototype_class_identity
    assert identity.shape == (M, K) and torch.equal(identity.argmax(1), torch.arange(M) // 3)
    assert torch.equal(identity.sum(1), torch.ones(M, dtype=identity.dtype))
    expected = torch.where(identity.t() > 0, 1.0, -0.5).double()
    assert torch.equal(model.last_layer.weight, expected) and model.last_layer.bias is None
    p = model.prototype_vectors.detach()
    assert isinstance(model.prototype_vectors, nn.Parameter) and float(p.min()) >= 0 and float(p.max()) < 1
    assert [type(m) for m in model.add_on_layers] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Sigmoid]
    assert model.epsilon == 1e-4
    z = model.conv_features(torch.rand(2, 3, 16, 16, dtype=torch.float64))
    z = z.detach()
    assert z.shape == (2, 8, 4, 4) and float(z.min()) > 0 and float(z.max()) < 1


def test_minmax_loss_terms_match_the_formulas():
    model = make_model(ppc=3, K=4)
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    logits, mind = model(x)
    total, terms = model.loss(logits, mind, y)
    I = model.prototype_class_identity
    T = I[:, y].t()                                                # [B, M]
    max_dist = 8 * 1 * 1
    clst = (max_dist - ((max_dist - mind) * T).max(1).values).mean()
    sep = (max_dist - ((max_dist - mind) * (1 - T)).max(1).values).mean()
    avg_sep = ((mind * (1 - T)).sum(1) / (1 - T).sum(1)).mean()
    l1 = (model.last_layer.weight.abs() * (1 - I.t())).sum()
    ce = F.cross_entropy(logits, y)
    expected = ce + 0.8 * clst - 0.08 * sep + 1e-4 * l1
    for name, value in dict(cross_entropy=ce, cluster=clst, separation=sep, avg_separation=avg_sep, l1=l1,
                            total=expected).items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(total, expected, rtol=1e-9, atol=1e-9)
    # gradients of the whole loss equal the plain formula's
    params = [model.prototype_vectors, model.last_layer.weight, model.add_on_layers[2].weight]
    ours = torch.autograd.grad(total, params, retain_graph=True)
    theirs = torch.autograd.grad(expected, params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_mean_loss_readings():
    model = make_model(loss="mean", ppc=2, K=3)
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    logits, mind, z = model(x, return_features=True)
    total, terms = model.loss(logits, mind, y, z)
    _, _, d = plain_head(model, z)
    l1 = (model.last_layer.weight.abs() * (1 - model.prototype_class_identity.t())).sum()
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(terms["mean_distance"], d.mean().detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(total, ce + 0.8 * d.mean() + 1e-4 * l1, rtol=1e-9, atol=1e-9)
    assert "cluster" not in terms
    with pytest.raises(ValueError, match="needs the add-on output"):
        model.loss(logits, mind, y)

    model.mean_reading = "min_distances"
    total, terms = model.loss(logits, mind, y)
    torch.testing.assert_close(terms["mean_distance"], mind.mean().detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, ce + 0.8 * mind.mean() + 1e-4 * l1, rtol=1e-9, atol=1e-9)


def test_loss_rejects_bad_input():
    model = make_model(ppc=2, K=3)
    logits, mind = model(torch.rand(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        model.loss(logits, mind, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be in"):
        model.loss(logits, mind, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="integer"):
        model.loss(logits, mind, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must be a"):
        model.loss(logits, mind, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="logits must be"):
        model.loss(logits[:, :2], mind, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="min_distances must be"):
        model.loss(logits, mind[:, :3], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="loss must be"):
        make_model(loss="median")
    with pytest.raises(ValueError, match="prototype_shape"):
        ProtoPNet(SmallCNN(), 3, prototype_shape=(8, 1))
    with pytest.raises(ValueError, match="add_on='none'"):
        ProtoPNet(SmallCNN(channels=(8,), coords=False), 3, prototype_shape=(16, 1, 1), add_on="none")
    with pytest.raises(TypeError, match="nn.Module"):
        ProtoPNet(lambda x: x, 3)
    with pytest.raises(ValueError, match="SmallCNN expects"):
        make_model()(torch.rand(2, 1, 16, 16, dtype=torch.float64))


def test_phases_set_requires_grad_and_groups():
    model = make_model()
    groups = {g["name"]: g for g in model.phase("warm").param_groups}
    assert set(groups) == {"add_on_layers", "prototype_vectors"}
    assert (groups["add_on_layers"]["lr"], groups["add_on_layers"]["weight_decay"]) == (3e-3, 1e-3)
    assert (groups["prototype_vectors"]["lr"], groups["prototype_vectors"]["weight_decay"]) == (3e-3, 0.0)
    assert not any(p.requires_grad for p in model.features.parameters())
    assert all(p.requires_grad for p in model.add_on_layers.parameters())
    assert model.prototype_vectors.requires_grad and model.last_layer.weight.requires_grad   # computed, not stepped

    opt = model.joint_optimizer(lr_scale=2.0)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"features", "add_on_layers", "prototype_vectors"}
    assert (groups["features"]["lr"], groups["features"]["weight_decay"]) == (2e-4, 1e-3)
    assert groups["add_on_layers"]["lr"] == 6e-3 and groups["prototype_vectors"]["lr"] == 6e-3
    assert all(p.requires_grad for p in model.parameters())
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters())) - 1                 # everything but the last layer

    opt = model.last_layer_optimizer(lrs={"last_layer": 5e-3})
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("last_layer", 5e-3, 0.0)]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["last_layer.weight"]
    with pytest.raises(ValueError, match="phase must be"):
        model.phase("push")
    with pytest.raises(ValueError, match="unknown learning-rate groups"):
        model.phase("joint", lrs={"backbone": 1.0})


def test_push_forward_and_any_backbone():
    class Plain(nn.Module):            # no out_channels attribute: channels inferred by a dummy forward
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    torch.manual_seed(0)
    model = ProtoPNet(Plain(), 3, prototypes_per_class=2, prototype_shape=(5, 2, 2))
    assert model.backbone_channels == 6
    x = torch.rand(2, 3, 12, 12)
    z, maps = model.push_forward(x)
    assert z.shape == (2, 5, 6, 6) and maps.shape == (2, 6, 5, 5)
    _, mind = model(x)
    torch.testing.assert_close(maps.flatten(2).min(2).values, mind, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no JSON config|unknown backbone"):
        build_backbone(model.config()["backbone"])


def test_config_round_trip():
    model = make_model(loss="mean", hw=(2, 2), coefs={"clst": 0.5})
    clone = ProtoPNet.from_config(model.config()).double()
    clone.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(clone(x)[0], model(x)[0])
    assert clone.loss_mode == "mean" and clone.coefs["clst"] == 0.5 and clone.prototype_shape == model.prototype_shape

"""A faithful re-implementation of M-Nauta/PIPNet's model, loss, shrink, evaluation metrics and top-k loop
(test oracle for protofast.models.pipnet and protofast.compat.pipnet).

Written from SEMANTICS.md §2, independently of protofast, with the structure of the original:

- ``PIPNet``: ``_net`` (backbone) → ``_add_on`` (``nn.Softmax(dim=1)``, or a 1×1 conv with bias then the
  softmax when ``num_features > 0``) → ``_pool`` (``AdaptiveMaxPool2d(1)`` + ``Flatten``) → ``_classification``
  (``NonNegLinear``: ``F.linear(x, relu(W), bias)`` with a ``normalization_multiplier`` Parameter).
  ``forward(x, inference)`` returns ``(proto_features, pooled, out)``; with ``inference`` the pooled scores below
  0.1 are set to 0 before the classifier and returned.
- ``initialise``: the original main's init: Xavier-uniform (sigmoid gain) add-on conv, classifier weight
  N(1.0, 0.1), bias 0, multiplier 2.0 with requires_grad False.
- ``calculate_loss``: the original train loop's loss function, same signature and return ``(loss, acc)``
  (the ``train_iter`` progress bar is only used when ``print`` is true).
- ``shrink_step``: what the train loop does after every step outside pretraining.
- ``eval_metrics``: the per-batch explanation-size counts of the original evaluation.
- ``topk_loop``: the original projection top-k: batch size 1, a Python loop over prototypes, k kept by
  sorting and replacing the last entry (ties: ``"stable"`` keeps the earlier image, ``"random"`` flips a coin as
  the original does).

The backbone is a tiny CNN so tests run in milliseconds.
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F


class NonNegLinear(nn.Module):
    """``out = input · relu(W)ᵀ + bias``; ``normalization_multiplier`` is the κ exponent of the training loss."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.normalization_multiplier = nn.Parameter(torch.ones((1,), requires_grad=True))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)

    def forward(self, input):
        return F.linear(input, torch.relu(self.weight), self.bias)


class PIPNet(nn.Module):
    def __init__(self, num_classes, num_prototypes, feature_net, add_on_layers, pool_layer, classification_layer):
        super().__init__()
        self._num_classes = num_classes
        self._num_prototypes = num_prototypes
        self._net = feature_net
        self._add_on = add_on_layers
        self._pool = pool_layer
        self._classification = classification_layer
        self._multiplier = classification_layer.normalization_multiplier

    def forward(self, xs, inference=False):
        features = self._net(xs)
        proto_features = self._add_on(features)
        pooled = self._pool(proto_features)
        if inference:
            clamped = torch.where(pooled < 0.1, 0.0, pooled)
            return proto_features, clamped, self._classification(clamped)
        return proto_features, pooled, self._classification(pooled)


def tiny_backbone(channels=12, in_channels=3):
    """Two 3×3 convs with ReLU and one 2×2 max-pool: [B, 3, S, S] → [B, channels, S/2, S/2]."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, channels, 3, padding=1))


def get_network(feature_net, num_classes, num_features=0, bias=False):
    """The original's get_network with the backbone given: returns the PIPNet parts and num_prototypes."""
    in_channels = [m for m in feature_net.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    if num_features == 0:
        num_prototypes = in_channels
        add_on = nn.Sequential(nn.Softmax(dim=1))
    else:
        num_prototypes = num_features
        add_on = nn.Sequential(nn.Conv2d(in_channels, num_prototypes, kernel_size=1, stride=1, padding=0, bias=True),
                               nn.Softmax(dim=1))
    pool = nn.Sequential(nn.AdaptiveMaxPool2d(output_size=(1, 1)), nn.Flatten())
    classifier = NonNegLinear(num_prototypes, num_classes, bias=bias)
    return add_on, pool, classifier, num_prototypes


def _init_weights_xavier(m):
    if type(m) == nn.Conv2d:
        nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain("sigmoid"))


def initialise(net, bias=False):
    """The original main's initialisation of a fresh model (no checkpoint)."""
    with torch.no_grad():
        net._add_on.apply(_init_weights_xavier)
        nn.init.normal_(net._classification.weight, mean=1.0, std=0.1)
        if bias:
            nn.init.constant_(net._classification.bias, val=0.0)
        nn.init.constant_(net._multiplier, val=2.0)
        net._multiplier.requires_grad = False


def construct_tiny_pipnet(num_classes=3, channels=12, num_features=0, bias=False, seed=0):
    torch.manual_seed(seed)
    feature_net = tiny_backbone(channels)
    add_on, pool, classifier, num_prototypes = get_network(feature_net, num_classes, num_features, bias)
    net = PIPNet(num_classes, num_prototypes, feature_net, add_on, pool, classifier)
    initialise(net, bias)
    return net


# ------------------------------------------------------------------------------------------------ loss
def align_loss(inputs, targets, EPS=1e-12):
    assert inputs.shape == targets.shape
    assert targets.requires_grad is False
    dots = torch.einsum("nc,nc->n", [inputs, targets])
    return -torch.log(dots + EPS).mean()


def calculate_loss(proto_features, pooled, out, ys1, align_pf_weight, t_weight, unif_weight, cl_weight,
                   net_normalization_multiplier, pretrain, finetune, criterion, train_iter, print=True, EPS=1e-10):
    """The original loss function (the train loop passes ``EPS=1e-8``): returns ``(loss, acc)``."""
    ys = torch.cat([ys1, ys1])
    pooled1, pooled2 = pooled.chunk(2)
    pf1, pf2 = proto_features.chunk(2)
    # rows n = (b·H + i)·W + j of each view: [B·H·W, D]
    emb1 = pf1.flatten(start_dim=2).permute(0, 2, 1).flatten(end_dim=1)
    emb2 = pf2.flatten(start_dim=2).permute(0, 2, 1).flatten(end_dim=1)
    a_loss = (align_loss(emb1, emb2.detach()) + align_loss(emb2, emb1.detach())) / 2.0
    tanh_loss = -(torch.log(torch.tanh(torch.sum(pooled1, dim=0)) + EPS).mean()
                  + torch.log(torch.tanh(torch.sum(pooled2, dim=0)) + EPS).mean()) / 2.0
    if not finetune:
        loss = align_pf_weight * a_loss
        loss = loss + t_weight * tanh_loss
    if not pretrain:
        softmax_inputs = torch.log1p(out ** net_normalization_multiplier)
        class_loss = criterion(F.log_softmax(softmax_inputs, dim=1), ys)
        if finetune:
            loss = cl_weight * class_loss
        else:
            loss = loss + cl_weight * class_loss
    acc = 0.0
    if not pretrain:
        acc = torch.sum(torch.eq(torch.argmax(out, dim=1), ys)).item() / float(len(ys))
    if print and train_iter is not None:
        train_iter.set_postfix_str(f"L: {loss.item():.3f}", refresh=False)
    return loss, acc


def phase_weights(pretrain, epoch=1, nr_epochs=1):
    """(align_pf_weight, t_weight, unif_weight, cl_weight) as the original train loop sets them."""
    if pretrain:
        return epoch / nr_epochs * 1.0, 5.0, 0.5, 0.0
    return 5.0, 2.0, 0.0, 2.0


@torch.no_grad()
def shrink_step(net):
    """After every optimizer step outside pretraining."""
    c = net._classification
    c.weight.copy_(torch.clamp(c.weight.data - 1e-3, min=0.0))
    c.normalization_multiplier.copy_(torch.clamp(c.normalization_multiplier.data, min=1.0))
    if c.bias is not None:
        c.bias.copy_(torch.clamp(c.bias.data, min=0.0))


@torch.no_grad()
def eval_metrics(net, xs):
    """One evaluation batch as the original (weights used as they are; the original also shrinks them first,
    which callers do with ``shrink_step``): predictions, abstentions, local sizes, and the model-level global
    size and sparsity ratio."""
    _, pooled, out = net(xs, inference=True)
    max_out, ys_pred = torch.max(out, dim=1)
    abstained = int(max_out.shape[0] - torch.count_nonzero(max_out))
    weight = net._classification.weight
    rep = weight.unsqueeze(1).repeat(1, pooled.shape[0], 1)                      # [K, B, D]
    sim_anz = torch.count_nonzero(torch.gt(torch.abs(pooled * rep), 1e-3).float(), dim=2).float()   # [K, B]
    # the original's "local_size_all_classes" sums over dim 1 = the BATCH: per class, the prototypes present in
    # any image of the batch, summed over classes (batch-dependent; kept here as written)
    local_size_original = torch.count_nonzero(torch.gt(torch.relu(pooled * rep - 1e-3).sum(dim=1), 0.0).float(),
                                              dim=1)
    # the paper's per-image local size for all classes: prototypes with pooled·w > 1e-3 for some class
    local_size_all = torch.count_nonzero(torch.gt(torch.relu(pooled * rep - 1e-3).sum(dim=0), 0.0).float(), dim=1)
    predicted_class_size = torch.diagonal(torch.index_select(sim_anz, dim=0, index=ys_pred), 0)
    global_size = int(torch.gt(weight, 1e-3).any(dim=0).sum())
    sparsity = (weight.numel() - int(torch.count_nonzero(torch.relu(weight - 1e-3)))) / weight.numel()
    return dict(pooled=pooled, out=out, ys_pred=ys_pred, abstained=abstained, local_size_original=local_size_original, local_size_all=local_size_all,
                local_size_predicted=predicted_class_size, global_size=global_size, sparsity=sparsity)


@torch.no_grad()
def topk_loop(net, images, k=10, tie="stable", rng=None):
    """The original projection top-k over ``images`` [N, 3, S, S] in order, one image at a time, with
    inference=True scores, only for prototypes with a classifier weight > 1e-3 to some class. Returns
    ``{prototype: [(image index, score), ...]}`` (lists of at most k, in the loop's final order)."""
    rng = rng or random.Random(0)
    weights = net._classification.weight
    topks = {}
    for i in range(images.shape[0]):
        _, pooled, _ = net(images[i:i + 1], inference=True)
        pooled = pooled.squeeze(0)
        for p in range(pooled.shape[0]):
            if torch.max(weights[:, p]) > 1e-3:
                entries = topks.setdefault(p, [])
                score = pooled[p].item()
                if len(entries) < k:
                    entries.append((i, score))
                else:
                    entries.sort(key=lambda t: t[1], reverse=True)
                    if entries[-1][1] < score:
                        entries[-1] = (i, score)
                    if tie == "random" and entries[-1][1] == score and rng.choice([0, 1]) > 0:
                        entries[-1] = (i, score)
    return topks


def zero_unused(net, topks, threshold=0.1):
    """The original main after training: zero the classifier column of every prototype in ``topks`` whose
    scores never exceed ``threshold``; returns those prototypes."""
    set_to_zero = []
    for p, entries in topks.items():
        if not any(score > threshold for _, score in entries):
            with torch.no_grad():
                net._classification.weight[:, p] = 0
            set_to_zero.append(p)
    return set_to_zero

"""Speed up an existing M-Nauta/PIPNet model and training loop in place.

::

    import protofast.compat.pipnet as pf
    net = pf.patch(net)                           # PIPNet (or nn.DataParallel(PIPNet)): fused forward
    proto_features, pooled, out = net(torch.cat([xs1, xs2]))                     # as before
    loss, acc = pf.calculate_loss(proto_features, pooled, out, ys, align_pf_weight, t_weight, unif_weight,
                                  cl_weight, net.module._classification.normalization_multiplier, pretrain,
                                  finetune, criterion, train_iter, print=True, EPS=1e-8)   # the original signature

What :func:`patch` changes. The object's class is swapped to a generated subclass of its own class
(``isinstance(net, PIPNet)`` stays true; survives ``nn.DataParallel`` replication; pickles with a protofast
rebuild hook; :func:`unpatch` restores it) whose ``forward(xs, inference=False)``:

* computes the pre-softmax features ``a = _add_on[:-1](_net(xs))`` (the add-on without its final
  ``nn.Softmax(dim=1)``), the presence scores with :func:`protofast.pipnet_presence` (no softmax map needed),
  the inference clamp (< 0.1 → 0) and ``out = _classification(pooled)`` as the original;
* still returns ``proto_features`` = the softmax map ``z`` (materialised here only because the original train
  loop passes it to the loss and the visualisation code reads it), tagged with ``a`` so that
  :func:`calculate_loss` can run the fused loss on ``a`` instead of copying rows of ``z``.

:func:`calculate_loss` is the original loss function of ``pipnet/train.py`` with the same signature and return
value ``(loss, acc)`` (SEMANTICS.md §2.3). On a patched model's ``proto_features`` the align and tanh terms come
from :func:`protofast.pipnet_losses` on ``a`` (the backward recomputes the softmax; no ``[B·H·W, D]`` row copies,
no stored align intermediates); on any other tensor (an unpatched model) they are computed from ``z`` the
original way. The classification term is the original's (``criterion(log_softmax(log1p(out^κ)), [y; y])``) on the
``out`` passed in. With ``finetune`` the align and tanh terms are not in the loss (as the original) and are
computed without gradient only when ``print`` needs them. ``unif_weight`` is ignored (as the original).

Note: the fused path takes the tanh term's presence scores from ``a`` (the same values as the ``pooled`` a patched
forward returns, to rounding); pass ``pooled`` unchanged, as the original loop does.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _class_swap
from ._class_swap import PatchedMixin
from ..ops.pipnet import pipnet_losses, pipnet_presence

__all__ = ["patch", "unpatch", "is_patched", "calculate_loss", "align_loss"]

_REQUIRED = ("_net", "_add_on", "_pool", "_classification")
_TAG = "_protofast_pre_softmax"
EPS_T_OP = 1e-8


class _FastPIPNet(PatchedMixin):
    """Mixin placed in front of the user's PIPNet class by :func:`patch`."""


    def forward(self, xs, inference=False):
        """``(proto_features z [B, D, H, W], pooled [B, D], out [B, K])`` as the original."""
        features = self._net(xs)
        a = _pre_softmax(self._add_on, features)
        pooled, _ = pipnet_presence(a)
        if inference:
            pooled = torch.where(pooled < 0.1, torch.zeros((), dtype=pooled.dtype, device=pooled.device), pooled)
        out = self._classification(pooled)
        proto_features = torch.softmax(a, dim=1)
        setattr(proto_features, _TAG, a)
        return proto_features, pooled, out



def _pre_softmax(add_on: nn.Module, features):
    """The add-on Sequential without its final channel softmax."""
    if not isinstance(add_on, nn.Sequential) or len(add_on) == 0 or not isinstance(add_on[-1], nn.Softmax) \
            or add_on[-1].dim not in (1, -3):
        raise ValueError("patch() needs _add_on = nn.Sequential(..., nn.Softmax(dim=1)) as M-Nauta/PIPNet builds it, "
                         f"got {add_on}")
    for layer in list(add_on)[:-1]:
        features = layer(features)
    return features


def _unwrap(model):
    return _class_swap.unwrap(model, "_classification")


def is_patched(model) -> bool:
    return _class_swap.is_patched(_unwrap(model))


def patch(net):
    """Make ``net`` (an M-Nauta/PIPNet ``PIPNet``, possibly inside ``nn.DataParallel``/DDP) use protofast, in
    place; returns the object passed in. Patching twice is a no-op. ``AttributeError`` names missing attributes
    (``_net``, ``_add_on``, ``_pool``, ``_classification``); ``ValueError`` if ``_add_on`` does not end with
    ``nn.Softmax(dim=1)``."""
    inner = _unwrap(net)
    missing = [a for a in _REQUIRED if not hasattr(inner, a)]
    if missing:
        raise AttributeError(f"patch() needs an M-Nauta/PIPNet PIPNet-like module; {type(inner).__name__} has no "
                             f"{', '.join(missing)}")
    if not isinstance(inner._add_on, nn.Sequential) or not len(inner._add_on) or \
            not isinstance(inner._add_on[-1], nn.Softmax):
        raise ValueError("patch() needs _add_on = nn.Sequential(..., nn.Softmax(dim=1)) as M-Nauta/PIPNet builds it")
    _class_swap.swap_in(inner, _FastPIPNet)
    return net


def unpatch(net):
    """Undo :func:`patch` in place; returns the object passed in."""
    inner = _unwrap(net)
    _class_swap.swap_out(inner)
    return net


# ------------------------------------------------------------------------------------------------ loss
def align_loss(inputs, targets, EPS=1e-12):
    """The original ``align_loss`` on rows ``[n, D]``: ``−mean_n log(⟨inputs_n, targets_n⟩ + EPS)``."""
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must have the same shape, got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    return -torch.log(torch.einsum("nc,nc->n", inputs, targets) + EPS).mean()


def _tanh_term(pooled, EPS):
    p1, p2 = pooled.chunk(2)
    return -(torch.log(torch.tanh(p1.sum(0)) + EPS).mean() + torch.log(torch.tanh(p2.sum(0)) + EPS).mean()) / 2.0


def _align_tanh_from_z(z, pooled, EPS):
    """The original way, from the materialised softmax map (unpatched models)."""
    pf1, pf2 = z.chunk(2)
    e1 = pf1.flatten(start_dim=2).permute(0, 2, 1).flatten(end_dim=1)
    e2 = pf2.flatten(start_dim=2).permute(0, 2, 1).flatten(end_dim=1)
    a_loss = (align_loss(e1, e2.detach()) + align_loss(e2, e1.detach())) / 2.0
    return a_loss, _tanh_term(pooled, EPS)


def _align_tanh(proto_features, pooled, align_w, t_w, EPS):
    """(weighted align + tanh, align, tanh)."""
    a = getattr(proto_features, _TAG, None)
    if a is None or a.shape != proto_features.shape:
        a_loss, t_loss = _align_tanh_from_z(proto_features, pooled, EPS)
        return align_w * a_loss + t_w * t_loss, a_loss, t_loss
    if EPS == EPS_T_OP:
        res = pipnet_losses(a, align_weight=align_w, tanh_weight=t_w)
        return res.loss, res.align, res.tanh
    res = pipnet_losses(a, align_weight=align_w, tanh_weight=0.0)       # the op's tanh eps is 1e-8
    t_loss = _tanh_term(res.pooled, EPS)
    return res.loss + t_w * t_loss, res.align, t_loss


def calculate_loss(proto_features, pooled, out, ys1, align_pf_weight, t_weight, unif_weight, cl_weight,
                   net_normalization_multiplier, pretrain, finetune, criterion, train_iter, print=True, EPS=1e-10):
    """Drop-in for M-Nauta/PIPNet ``pipnet/train.py::calculate_loss`` (same arguments, same ``(loss, acc)``).

    ``proto_features`` [2B, D, H, W] (view 1 first), ``pooled`` [2B, D], ``out`` [2B, K], ``ys1`` [B] (one
    view's labels); ``EPS`` is the tanh-loss epsilon (the original loop passes 1e-8; the default 1e-10 is the
    original function's). Loss = ``align_pf_weight·L_A + t_weight·L_T`` (not with ``finetune``) ``+
    cl_weight·criterion(log_softmax(log1p(out^κ)), [y; y])`` (not with ``pretrain``); ``acc`` is the top-1
    accuracy of ``out`` on ``[y; y]`` (0 in pretraining). ``train_iter``'s postfix is set when ``print``.
    """
    if proto_features.dim() != 4 or proto_features.shape[0] % 2:
        raise ValueError(f"proto_features must be [2B, D, H, W] (two views), got {tuple(proto_features.shape)}")
    ys = torch.cat([ys1, ys1])
    a_loss = t_loss = class_loss = None
    if not finetune:
        loss, a_loss, t_loss = _align_tanh(proto_features, pooled, align_pf_weight, t_weight, EPS)
    elif print and train_iter is not None:
        with torch.no_grad():
            _, a_loss, t_loss = _align_tanh(proto_features.detach(), pooled.detach(), 0.0, 0.0, EPS)
    if not pretrain:
        class_loss = criterion(F.log_softmax(torch.log1p(out ** net_normalization_multiplier), dim=1), ys)
        loss = cl_weight * class_loss if finetune else loss + cl_weight * class_loss
    acc = 0.0
    if not pretrain:
        acc = torch.sum(torch.eq(torch.argmax(out, dim=1), ys)).item() / float(len(ys))
    if print and train_iter is not None:
        with torch.no_grad():
            present = torch.count_nonzero(torch.relu(pooled - 0.1), dim=1).float().mean().item()
            text = f"L: {loss.item():.3f}"
            if class_loss is not None:
                text += f", LC:{class_loss.item():.3f}"
            if a_loss is not None:
                text += f", LA:{a_loss.item():.2f}, LT:{t_loss.item():.3f}"
            text += f", num_scores>0.1:{present:.1f}"
            if not pretrain:
                text += f", Ac:{acc:.3f}"
            train_iter.set_postfix_str(text, refresh=False)
    return loss, acc

"""Prototype projection ("push") computed the way cfchen-duke/ProtoPNet's ``push.py`` does it.

This is a faithful re-implementation of the host-side loop of ``push_prototypes`` /
``update_prototypes_on_batch`` (SEMANTICS.md §1.5, quirks §1.8 and §3.5), without the image saving:

* every batch goes through ``push_forward`` (features ``x`` and the *full* distance map ``d (B, P, H', W')``,
  the original's conv-of-``x²``-with-``ones`` way when the model has no ``push_forward``), and both are copied
  to host numpy arrays;
* for every prototype ``j``, in a Python loop: its class ``k = argmax I[j, :]`` (first occurrence), the
  candidate images of the batch (label ``k``, in batch order), ``proto_dist_[candidates][:, j]`` (the original's
  fancy indexing copies the candidates' maps of *all* prototypes before slicing ``j``), ``np.amin`` and, if it
  is strictly smaller than the running best, ``np.argmin`` (first occurrence over (candidate, i, j)) and a copy
  of the patch ``x[b*, :, i*·s : i*·s + h, j*·s : j*·s + w]``;
* at the end the float64 patches are cast to float32 and written into ``prototype_vectors``; prototypes whose
  class never appeared are therefore **zero**.

Two options reproduce uos-sis/quanproto's push (§3.5): ``reset_per_batch`` (best distance reset to +inf at the
start of every batch, "last batch wins") and ``multilabel`` (an image is a candidate for every positive class).

It is the baseline of the push benchmark and the oracle of the push tests; it is deliberately unoptimised.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .protopnet_original import _l2_convolution

__all__ = ["OriginalPushResult", "push_forward_original", "push_prototypes_original"]


class OriginalPushResult(NamedTuple):
    """Per prototype: ``distance`` (float64, +inf if its class never appeared), ``image_index`` (index in loader
    order, −1 if never updated), ``position`` (``(i, j)`` in the distance map, −1 if never updated)."""

    distance: np.ndarray
    image_index: np.ndarray
    position: np.ndarray


def _module(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "prototype_vectors") else model


def push_forward_original(model, images: torch.Tensor):
    """``(x, d)``: the model's ``push_forward`` if it has one, else ``conv_features`` followed by the original
    ``_l2_convolution`` (``x²`` convolved with an all-ones ``(P, C, h, w)`` tensor, ``conv2d(x, p)``)."""
    if hasattr(model, "push_forward"):
        return model.push_forward(images)
    x = model.conv_features(images)
    p = model.prototype_vectors
    return x, _l2_convolution(x, p, torch.ones_like(p))


def push_prototypes_original(model, loader, *, class_specific: bool = True, preprocess=None,
                             prototype_layer_stride: int = 1, reset_per_batch: bool = False,
                             multilabel: bool = False, write: bool = True) -> OriginalPushResult:
    """Runs the original push loop over ``loader`` (yielding ``(images, labels)``) and, with ``write``, writes
    the projected prototypes into ``model.prototype_vectors`` (float32 as the original, then the parameter's
    dtype). ``model`` may be wrapped in ``nn.DataParallel`` (``.module`` is used, as the original does)."""
    net = _module(model)
    net.eval()
    prototype_shape = tuple(net.prototype_vectors.shape)
    n_prototypes, _, proto_h, proto_w = prototype_shape
    identity = net.prototype_class_identity
    global_min_proto_dist = np.full(n_prototypes, np.inf)
    global_min_fmap_patches = np.zeros(prototype_shape)
    image_index = np.full(n_prototypes, -1, dtype=np.int64)
    position = np.full((n_prototypes, 2), -1, dtype=np.int64)
    num_classes = identity.shape[1]
    start_index_of_search_batch = 0
    for search_batch_input, search_y in loader:
        search_batch = preprocess(search_batch_input) if preprocess is not None else search_batch_input
        with torch.no_grad():
            search_batch = search_batch.to(net.prototype_vectors.device)
            protoL_input_torch, proto_dist_torch = push_forward_original(net, search_batch)
        protoL_input_ = np.copy(protoL_input_torch.detach().cpu().numpy())
        proto_dist_ = np.copy(proto_dist_torch.detach().cpu().numpy())
        del protoL_input_torch, proto_dist_torch

        if reset_per_batch:
            global_min_proto_dist[:] = np.inf
        if class_specific:
            class_to_img_index_dict = {key: [] for key in range(num_classes)}
            for img_index, img_y in enumerate(search_y):
                if multilabel:
                    for k in torch.nonzero(img_y).flatten().tolist():
                        class_to_img_index_dict[k].append(img_index)
                else:
                    class_to_img_index_dict[img_y.item()].append(img_index)

        for j in range(n_prototypes):
            if class_specific:
                target_class = torch.argmax(identity[j]).item()
                if len(class_to_img_index_dict[target_class]) == 0:
                    continue
                proto_dist_j = proto_dist_[class_to_img_index_dict[target_class]][:, j, :, :]
            else:
                proto_dist_j = proto_dist_[:, j, :, :]

            batch_min_proto_dist_j = np.amin(proto_dist_j)
            if batch_min_proto_dist_j < global_min_proto_dist[j]:
                batch_argmin_proto_dist_j = list(np.unravel_index(np.argmin(proto_dist_j, axis=None),
                                                                  proto_dist_j.shape))
                if class_specific:
                    batch_argmin_proto_dist_j[0] = class_to_img_index_dict[target_class][batch_argmin_proto_dist_j[0]]
                img_index_in_batch = batch_argmin_proto_dist_j[0]
                fmap_height_start_index = batch_argmin_proto_dist_j[1] * prototype_layer_stride
                fmap_height_end_index = fmap_height_start_index + proto_h
                fmap_width_start_index = batch_argmin_proto_dist_j[2] * prototype_layer_stride
                fmap_width_end_index = fmap_width_start_index + proto_w
                batch_min_fmap_patch_j = protoL_input_[img_index_in_batch, :,
                                                       fmap_height_start_index:fmap_height_end_index,
                                                       fmap_width_start_index:fmap_width_end_index]
                global_min_proto_dist[j] = batch_min_proto_dist_j
                global_min_fmap_patches[j] = batch_min_fmap_patch_j
                image_index[j] = start_index_of_search_batch + img_index_in_batch
                position[j] = batch_argmin_proto_dist_j[1:]
        start_index_of_search_batch += len(search_y)

    if write:
        prototype_update = np.reshape(global_min_fmap_patches, prototype_shape)
        with torch.no_grad():
            net.prototype_vectors.data.copy_(torch.tensor(prototype_update, dtype=torch.float32))
    return OriginalPushResult(global_min_proto_dist, image_index, position)

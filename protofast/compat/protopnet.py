"""Speed up an existing cfchen-duke/ProtoPNet model in place.

::

    import protofast.compat.protopnet as pf
    ppnet = pf.patch(ppnet)                       # PPNet (or nn.DataParallel(PPNet)): fused forward
    ...                                           # train as before; the cost terms can come from pf.costs(...)
    pf.push_prototypes(train_push_loader, ppnet_multi, class_specific=True, ...)   # same arguments as push.py

What ``patch`` changes (SEMANTICS.md §1.2, §1.8). The object's class is swapped to a subclass of its own class
(``type(ppnet)`` becomes a generated ``<Class>`` subclass; ``isinstance(ppnet, PPNet)`` stays true) that overrides:

* ``forward(x) -> (logits, min_distances)``: ``conv_features`` → :func:`protofast.prototype_min_distances`
  (fused distance + min over positions, nothing of size B×P×H'×W') → ``distance_2_similarity`` →
  ``last_layer``. Same values as the original to fp32 rounding, gradient to the first-occurrence argmin patch.
* ``distance_2_similarity(d)``: ``'log'`` → :func:`protofast.log_similarity` with ``ε = self.epsilon``; ``'linear'``
  → ``−d``; a callable ``f`` → ``f(d)`` (as the original).
* ``_l2_convolution(x)`` → :func:`protofast.prototype_distance_maps` (full ``(B, P, H', W')`` maps, differentiable),
  so ``prototype_distances`` and ``push_forward`` (and the original visualisation / local-analysis code) still
  get full maps; ``push_forward(x)`` returns ``(conv_features(x), maps)`` as the original.

Nothing else is touched: parameters, buffers, ``state_dict``, the ``ones`` Parameter (kept for checkpoints and
``prune``, no longer read), ``features``, ``add_on_layers``, ``last_layer``. A class swap, unlike instance
attributes, survives ``nn.DataParallel`` replication (replicas are created from ``type(module)``).

Pickling: ``torch.save(ppnet)`` of a patched model stores the original class plus a protofast rebuild hook, so
``torch.load(..., weights_only=False)`` returns a patched model (protofast must be importable); ``copy.deepcopy``
returns a patched copy. For a checkpoint that loads without protofast, save ``unpatch(ppnet)`` or the
``state_dict`` (identical either way).
"""
from __future__ import annotations

import os
import time
from typing import Dict

import numpy as np
import torch
import torch.nn.functional as F

from . import _class_swap
from ._class_swap import PatchedMixin
from ..ops.distances import log_similarity, prototype_distance_maps, prototype_min_distances
from ..ops.losses import cluster_separation_costs, masked_l1
from ..push import push_prototypes as _push

__all__ = ["patch", "unpatch", "is_patched", "costs", "push_prototypes", "find_high_activation_crop"]

_REQUIRED = ("conv_features", "prototype_vectors", "last_layer", "prototype_class_identity", "epsilon",
             "prototype_activation_function")


class _FastPPNet(PatchedMixin):
    """Mixin placed in front of the user's PPNet class by :func:`patch`."""


    def forward(self, x):
        """``(logits [B, K], min_distances [B, P])`` through the fused distance + min kernel."""
        conv_output = self.conv_features(x)
        min_distances, _ = prototype_min_distances(conv_output, self.prototype_vectors)
        prototype_activations = self.distance_2_similarity(min_distances)
        logits = self.last_layer(prototype_activations)
        return logits, min_distances

    def distance_2_similarity(self, distances):
        if self.prototype_activation_function == "log":
            return log_similarity(distances, float(self.epsilon))
        if self.prototype_activation_function == "linear":
            return -distances
        return self.prototype_activation_function(distances)

    def _l2_convolution(self, x):
        """Full squared-L2 maps ``(B, P, H', W')`` = relu(S − 2G + Q) (SEMANTICS §1.2), without ``ones``."""
        return prototype_distance_maps(x, self.prototype_vectors)

    def push_forward(self, x):
        conv_output = self.conv_features(x)
        return conv_output, self._l2_convolution(conv_output)



def _rebuild_patched(base: type, *args):
    """Unpickling hook of files saved before the class swap moved to ``_class_swap`` (kept for those files)."""
    return _class_swap.rebuild(_FastPPNet, base, *args)


def _unwrap(model):
    return _class_swap.unwrap(model, "prototype_vectors")


def is_patched(model) -> bool:
    return _class_swap.is_patched(_unwrap(model))


def patch(ppnet):
    """Make ``ppnet`` (a cfchen-duke ``PPNet``, possibly inside ``nn.DataParallel``/DDP) use protofast, in place.

    Returns the object passed in (so ``ppnet = patch(ppnet)`` and ``patch(ppnet)`` are the same). Patching twice
    is a no-op. Raises ``AttributeError`` naming the missing attributes when the object is not PPNet-like
    (needs ``conv_features``, ``prototype_vectors``, ``last_layer``, ``prototype_class_identity``, ``epsilon``,
    ``prototype_activation_function``).
    """
    net = _unwrap(ppnet)
    missing = [a for a in _REQUIRED if not hasattr(net, a)]
    if missing:
        raise AttributeError(f"patch() needs a cfchen-duke PPNet-like module; {type(net).__name__} has no "
                             f"{', '.join(missing)}")
    _class_swap.swap_in(net, _FastPPNet)
    return ppnet


def unpatch(ppnet):
    """Undo :func:`patch` in place (the original class again); returns the object passed in."""
    net = _unwrap(ppnet)
    _class_swap.swap_out(net)
    return ppnet


# ------------------------------------------------------------------------------------------------ costs
def _max_dist(net) -> float:
    shape = getattr(net, "prototype_shape", None) or tuple(net.prototype_vectors.shape)
    return float(shape[1] * shape[2] * shape[3])


def costs(ppnet, min_distances: torch.Tensor, labels: torch.Tensor, class_specific: bool = True,
          use_l1_mask: bool = True) -> Dict[str, torch.Tensor]:
    """The cross-entropy-free terms of the original ``train_and_test._train_or_test`` (SEMANTICS.md §1.3).

    With ``max_dist = C·h·w`` and ``T[b, m] = I[m, y_b]``:

    * ``class_specific=True``: ``cluster = mean_b [max_dist − max_m ((max_dist − mind)·T)]``,
      ``separation`` the same with ``1 − T``, ``avg_separation = mean_b [Σ_m mind·(1−T) / Σ_m (1−T)]``
      (:func:`protofast.cluster_separation_costs`, masked zeros compete as in the original), and
      ``l1 = Σ |Wc|·(1 − Iᵀ)`` (:func:`protofast.masked_l1`) or ``‖Wc‖₁`` with ``use_l1_mask=False``;
    * ``class_specific=False``: ``cluster = mean_b min_m mind`` and ``l1 = ‖Wc‖₁`` only (the original then
      never defines separation).

    The original loss is ``CE + 0.8·cluster − 0.08·separation + 1e-4·l1``.

    Args:
        ppnet: the (patched or not) PPNet, or its DataParallel wrapper.
        min_distances: ``[B, P]`` from ``ppnet(x)[1]``; labels: ``[B]`` class indices.

    Returns:
        dict with ``cluster``, ``separation``, ``avg_separation``, ``l1`` (class-specific) or ``cluster``, ``l1``.
    """
    net = _unwrap(ppnet)
    weight = net.last_layer.weight
    if not class_specific:
        return {"cluster": torch.min(min_distances, dim=1).values.mean(), "l1": weight.norm(p=1)}
    cluster, separation, avg_separation = cluster_separation_costs(
        min_distances, labels, net.prototype_class_identity, _max_dist(net))
    l1 = masked_l1(weight, net.prototype_class_identity) if use_l1_mask else weight.norm(p=1)
    return {"cluster": cluster, "separation": separation, "avg_separation": avg_separation, "l1": l1}


# ------------------------------------------------------------------------------------------------ push
def find_high_activation_crop(activation_map: np.ndarray, percentile: float = 95):
    """The original ``find_high_activation_crop``: bounding box ``(y0, y1, x0, x1)`` (end exclusive) of the
    pixels at or above the ``percentile``-th percentile of the map."""
    threshold = np.percentile(activation_map, percentile)
    mask = activation_map >= threshold
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size == 0:
        return 0, 1, 0, 1
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _upsample(act: np.ndarray, size: int) -> np.ndarray:
    """Bicubic upsampling to ``size × size``: ``cv2.resize(..., INTER_CUBIC)`` as the original when OpenCV is
    installed, else ``torch`` bicubic (``align_corners=False``), which may differ from OpenCV by rounding."""
    try:
        import cv2

        return cv2.resize(act, dsize=(size, size), interpolation=cv2.INTER_CUBIC)
    except ImportError:
        t = torch.from_numpy(np.ascontiguousarray(act, dtype=np.float32))[None, None]
        return F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()


def _rf_box(img_size: int, i: int, j: int, rf_info, feature_size, proto_hw):
    """Receptive-field box ``[y0, y1, x0, x1]``: the original ``compute_rf_protoL_at_spatial_location`` when the
    model has ``proto_layer_rf_info = (n, j, r, start)``, else the proportional mapping of
    :meth:`protofast.PushResult.receptive_field_boxes`."""
    if rf_info is not None:
        _, step, r, start = rf_info
        ch, cw = start + i * step, start + j * step
        return [max(int(ch - r / 2), 0), min(int(ch + r / 2), img_size),
                max(int(cw - r / 2), 0), min(int(cw + r / 2), img_size)]
    (H, W), (h, w) = feature_size, proto_hw
    return [(i * img_size) // H, -((-(i + h) * img_size) // H), (j * img_size) // W, -((-(j + w) * img_size) // W)]


def push_prototypes(dataloader, prototype_network_parallel, class_specific=True, preprocess_input_function=None,
                    prototype_layer_stride=1, root_dir_for_saving_prototypes=None, epoch_number=None,
                    prototype_img_filename_prefix=None, prototype_self_act_filename_prefix=None,
                    proto_bound_boxes_filename_prefix=None, save_prototype_class_identity=True, log=print,
                    prototype_activation_function_in_numpy=None):
    """cfchen-duke ``push.push_prototypes`` with the same arguments, running :func:`protofast.push_prototypes`.

    The projected prototypes (and which image / position each comes from) are those of the original loop
    (SEMANTICS.md §1.5: class-specific search, first occurrence on ties, strict ``<`` across batches, zero
    prototypes for classes absent from the data); the distances are computed on the device without copying any
    distance map to the host. ``dataloader`` must yield unnormalised images (``preprocess_input_function``
    normalises them, as in the original) and must not shuffle.

    Saving (only when ``root_dir_for_saving_prototypes`` is given; into ``epoch-<epoch_number>/`` when
    ``epoch_number`` is given), after the push, from a second pass that loads only the batches holding a winning
    image and evaluates the old prototypes' distance map on that image:

    * ``<proto_bound_boxes_filename_prefix>-receptive_field<epoch>.npy`` and ``<prefix><epoch>.npy``: the
      ``[P, 6]`` (``[P, 5]`` without class identity) int arrays of the original (image index, y0, y1, x0, x1,
      class; −1 rows for unseen prototypes). Receptive fields use ``proto_layer_rf_info`` when the model has it
      (the original formula), else a proportional mapping; the high-activation box is the original
      ``find_high_activation_crop`` of the bicubic-upsampled activation (OpenCV when installed, else torch
      bicubic, which can move a box edge by a pixel);
    * ``<prototype_self_act_filename_prefix><j>.npy``: the activation map of prototype j on its image;
    * ``<prototype_img_filename_prefix>-original<j>.png``, ``...-receptive_field<j>.png`` and ``...<j>.png``
      (the high-activation crop), written with matplotlib when it is installed.

    Not reproduced: the heat-map overlay PNGs (``-original_with_self_act``, ``-receptive_field_with_self_act``,
    which need OpenCV's colormap), and the original's requirement of a CUDA device. Returns ``None`` as the
    original (the :class:`protofast.PushResult` is available as ``push_prototypes.last_result``).
    """
    net = _unwrap(prototype_network_parallel)
    net.eval()
    log("\tpush")
    start = time.time()
    old_prototypes = net.prototype_vectors.detach().clone()
    result = _push(net, dataloader, class_specific=class_specific, preprocess=preprocess_input_function,
                   prototype_layer_stride=prototype_layer_stride, progress=False)
    push_prototypes.last_result = result

    if root_dir_for_saving_prototypes is not None:
        proto_epoch_dir = root_dir_for_saving_prototypes
        if epoch_number is not None:
            proto_epoch_dir = os.path.join(root_dir_for_saving_prototypes, "epoch-" + str(epoch_number))
        os.makedirs(proto_epoch_dir, exist_ok=True)
        _save_prototype_artifacts(net, dataloader, result, old_prototypes, proto_epoch_dir, epoch_number,
                                  preprocess_input_function, prototype_img_filename_prefix,
                                  prototype_self_act_filename_prefix, proto_bound_boxes_filename_prefix,
                                  save_prototype_class_identity, prototype_activation_function_in_numpy)
    log("\tExecuting push ...")
    log("\tpush time: \t{0}".format(time.time() - start))


push_prototypes.last_result = None


def _save_prototype_artifacts(net, dataloader, result, old_prototypes, out_dir, epoch_number, preprocess,
                              img_prefix, act_prefix, boxes_prefix, save_class_identity, act_fn_numpy):
    P = len(result.image_index)
    cols = 6 if save_class_identity else 5
    proto_rf_boxes = np.full((P, cols), -1)
    proto_bound_boxes = np.full((P, cols), -1)
    rf_info = getattr(net, "proto_layer_rf_info", None)
    max_dist = _max_dist(net)
    by_image: Dict[int, list] = {}
    for m in torch.nonzero(result.found).flatten().tolist():
        by_image.setdefault(int(result.image_index[m]), []).append(m)
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        plt = None

    seen = 0
    with torch.no_grad():
        for images, labels in dataloader:
            B = images.shape[0]
            hits = [g for g in range(seen, seen + B) if g in by_image]
            for g in hits:
                b = g - seen
                img = images[b:b + 1]
                x = preprocess(img) if preprocess is not None else img
                x = net.conv_features(x.to(old_prototypes.device))
                original_img = np.transpose(images[b].cpu().numpy(), (1, 2, 0))
                img_size = original_img.shape[0]
                ms = by_image[g]
                maps = prototype_distance_maps(x, old_prototypes[ms].to(x.dtype))[0].cpu().numpy()   # [n, H', W']
                for row, m in enumerate(ms):
                    i, j = (int(v) for v in result.position[m])
                    y0, y1, x0, x1 = _rf_box(img_size, i, j, rf_info, result.feature_size, result.prototype_size)
                    proto_rf_boxes[m, :5] = [g, y0, y1, x0, x1]
                    d = maps[row]
                    if net.prototype_activation_function == "log":
                        act = np.log((d + 1) / (d + net.epsilon))
                    elif net.prototype_activation_function == "linear":
                        act = max_dist - d
                    else:
                        act = act_fn_numpy(d)
                    by0, by1, bx0, bx1 = find_high_activation_crop(_upsample(act, img_size))
                    proto_bound_boxes[m, :5] = [g, by0, by1, bx0, bx1]
                    if cols == 6:
                        label = labels[b]
                        proto_rf_boxes[m, 5] = proto_bound_boxes[m, 5] = int(
                            label.item() if label.dim() == 0 else torch.argmax(label).item())
                    if act_prefix is not None:
                        np.save(os.path.join(out_dir, act_prefix + str(m) + ".npy"), act)
                    if img_prefix is not None and plt is not None:
                        plt.imsave(os.path.join(out_dir, img_prefix + "-original" + str(m) + ".png"),
                                   original_img, vmin=0.0, vmax=1.0)
                        rf_img = original_img[y0:y1, x0:x1]
                        if rf_img.shape[:2] != original_img.shape[:2]:
                            plt.imsave(os.path.join(out_dir, img_prefix + "-receptive_field" + str(m) + ".png"),
                                       rf_img, vmin=0.0, vmax=1.0)
                        plt.imsave(os.path.join(out_dir, img_prefix + str(m) + ".png"),
                                   original_img[by0:by1, bx0:bx1], vmin=0.0, vmax=1.0)
            seen += B
    if boxes_prefix is not None:
        np.save(os.path.join(out_dir, boxes_prefix + "-receptive_field" + str(epoch_number) + ".npy"), proto_rf_boxes)
        np.save(os.path.join(out_dir, boxes_prefix + str(epoch_number) + ".npy"), proto_bound_boxes)

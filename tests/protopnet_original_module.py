"""A faithful re-implementation of cfchen-duke/ProtoPNet's ``PPNet`` module and push loop (test oracle).

Written from SEMANTICS.md §1 and the structure of the original ``model.py`` / ``push.py`` /
``train_and_test.py``, independently of protofast: ``_l2_convolution`` convolves ``x²`` with the all-ones
``ones`` Parameter (requires_grad False) and ``x`` with the prototypes, relu; the min over positions is
``-max_pool2d(-d)``; log activation with ``self.epsilon``; last layer initialised 1 / −0.5; the push loop copies
``push_forward``'s features and full distance maps to numpy and loops over the prototypes in Python.

The backbone is a tiny CNN (``features``), so tests run in milliseconds; everything from ``add_on_layers`` on is
the original's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class PPNet(nn.Module):
    def __init__(self, features, img_size, prototype_shape, proto_layer_rf_info, num_classes, init_weights=True,
                 prototype_activation_function="log", add_on_layers_type="regular"):
        super().__init__()
        self.img_size = img_size
        self.prototype_shape = prototype_shape
        self.num_prototypes = prototype_shape[0]
        self.num_classes = num_classes
        self.epsilon = 1e-4
        self.prototype_activation_function = prototype_activation_function
        assert self.num_prototypes % self.num_classes == 0
        self.prototype_class_identity = torch.zeros(self.num_prototypes, self.num_classes)
        num_prototypes_per_class = self.num_prototypes // self.num_classes
        for j in range(self.num_prototypes):
            self.prototype_class_identity[j, j // num_prototypes_per_class] = 1
        self.proto_layer_rf_info = proto_layer_rf_info
        self.features = features
        first_add_on_layer_in_channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.add_on_layers = nn.Sequential(
            nn.Conv2d(first_add_on_layer_in_channels, self.prototype_shape[1], kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(self.prototype_shape[1], self.prototype_shape[1], kernel_size=1),
            nn.Sigmoid())
        self.prototype_vectors = nn.Parameter(torch.rand(self.prototype_shape), requires_grad=True)
        self.ones = nn.Parameter(torch.ones(self.prototype_shape), requires_grad=False)
        self.last_layer = nn.Linear(self.num_prototypes, self.num_classes, bias=False)
        if init_weights:
            self._initialize_weights()

    def conv_features(self, x):
        x = self.features(x)
        x = self.add_on_layers(x)
        return x

    def _l2_convolution(self, x):
        x2 = x ** 2
        x2_patch_sum = F.conv2d(input=x2, weight=self.ones)
        p2 = self.prototype_vectors ** 2
        p2 = torch.sum(p2, dim=(1, 2, 3))
        p2_reshape = p2.view(-1, 1, 1)
        xp = F.conv2d(input=x, weight=self.prototype_vectors)
        intermediate_result = - 2 * xp + p2_reshape
        distances = F.relu(x2_patch_sum + intermediate_result)
        return distances

    def prototype_distances(self, x):
        conv_features = self.conv_features(x)
        distances = self._l2_convolution(conv_features)
        return distances

    def distance_2_similarity(self, distances):
        if self.prototype_activation_function == "log":
            return torch.log((distances + 1) / (distances + self.epsilon))
        elif self.prototype_activation_function == "linear":
            return -distances
        else:
            return self.prototype_activation_function(distances)

    def forward(self, x):
        distances = self.prototype_distances(x)
        min_distances = -F.max_pool2d(-distances, kernel_size=(distances.size()[2], distances.size()[3]))
        min_distances = min_distances.view(-1, self.num_prototypes)
        prototype_activations = self.distance_2_similarity(min_distances)
        logits = self.last_layer(prototype_activations)
        return logits, min_distances

    def push_forward(self, x):
        conv_output = self.conv_features(x)
        distances = self._l2_convolution(conv_output)
        return conv_output, distances

    def set_last_layer_incorrect_connection(self, incorrect_strength):
        positive_one_weights_locations = torch.t(self.prototype_class_identity)
        negative_one_weights_locations = 1 - positive_one_weights_locations
        correct_class_connection = 1
        incorrect_class_connection = incorrect_strength
        self.last_layer.weight.data.copy_(correct_class_connection * positive_one_weights_locations
                                          + incorrect_class_connection * negative_one_weights_locations)

    def _initialize_weights(self):
        for m in self.add_on_layers.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.set_last_layer_incorrect_connection(incorrect_strength=-0.5)


def tiny_features(in_channels=3, channels=8):
    """A two-conv backbone: 3×16×16 images -> channels×4×4 (two stride-2 convs)."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())


def construct_tiny_ppnet(num_classes=4, prototypes_per_class=3, channels=16, proto_hw=(1, 1), seed=0,
                         prototype_activation_function="log"):
    torch.manual_seed(seed)
    shape = (num_classes * prototypes_per_class, channels, *proto_hw)
    return PPNet(tiny_features(), img_size=16, prototype_shape=shape, proto_layer_rf_info=(4, 4, 7, 1.5),
                 num_classes=num_classes, prototype_activation_function=prototype_activation_function)


def train_costs(model, min_distances, label, class_specific=True, use_l1_mask=True):
    """The cost terms of ``train_and_test._train_or_test`` (``model`` is the DataParallel-wrapped network)."""
    if class_specific:
        max_dist = (model.module.prototype_shape[1] * model.module.prototype_shape[2]
                    * model.module.prototype_shape[3])
        prototypes_of_correct_class = torch.t(model.module.prototype_class_identity[:, label])
        inverted_distances, _ = torch.max((max_dist - min_distances) * prototypes_of_correct_class, dim=1)
        cluster_cost = torch.mean(max_dist - inverted_distances)
        prototypes_of_wrong_class = 1 - prototypes_of_correct_class
        inverted_distances_to_nontarget_prototypes, _ = \
            torch.max((max_dist - min_distances) * prototypes_of_wrong_class, dim=1)
        separation_cost = torch.mean(max_dist - inverted_distances_to_nontarget_prototypes)
        avg_separation_cost = \
            torch.sum(min_distances * prototypes_of_wrong_class, dim=1) / torch.sum(prototypes_of_wrong_class, dim=1)
        avg_separation_cost = torch.mean(avg_separation_cost)
        if use_l1_mask:
            l1_mask = 1 - torch.t(model.module.prototype_class_identity)
            l1 = (model.module.last_layer.weight * l1_mask).norm(p=1)
        else:
            l1 = model.module.last_layer.weight.norm(p=1)
        return {"cluster": cluster_cost, "separation": separation_cost, "avg_separation": avg_separation_cost,
                "l1": l1}
    min_distance, _ = torch.min(min_distances, dim=1)
    cluster_cost = torch.mean(min_distance)
    l1 = model.module.last_layer.weight.norm(p=1)
    return {"cluster": cluster_cost, "l1": l1}


def push_prototypes(dataloader, prototype_network_parallel, class_specific=True, preprocess_input_function=None,
                    prototype_layer_stride=1):
    """The original ``push.push_prototypes`` / ``update_prototypes_on_batch`` without image saving.

    Returns ``(global_min_proto_dist, proto_rf_boxes)``; ``proto_rf_boxes[:, 0]`` is the image index in the
    dataset, ``[:, 1:5]`` the receptive-field box, ``[:, 5]`` the label (−1 rows: never updated).
    """
    prototype_network_parallel.eval()
    prototype_shape = prototype_network_parallel.module.prototype_shape
    n_prototypes = prototype_network_parallel.module.num_prototypes
    global_min_proto_dist = np.full(n_prototypes, np.inf)
    global_min_fmap_patches = np.zeros([n_prototypes, prototype_shape[1], prototype_shape[2], prototype_shape[3]])
    proto_rf_boxes = np.full(shape=[n_prototypes, 6], fill_value=-1)
    search_batch_size = dataloader.batch_size
    num_classes = prototype_network_parallel.module.num_classes
    for push_iter, (search_batch_input, search_y) in enumerate(dataloader):
        start_index_of_search_batch = push_iter * search_batch_size
        _update_prototypes_on_batch(search_batch_input, start_index_of_search_batch, prototype_network_parallel,
                                    global_min_proto_dist, global_min_fmap_patches, proto_rf_boxes,
                                    class_specific=class_specific, search_y=search_y, num_classes=num_classes,
                                    preprocess_input_function=preprocess_input_function,
                                    prototype_layer_stride=prototype_layer_stride)
    prototype_update = np.reshape(global_min_fmap_patches, tuple(prototype_shape))
    prototype_network_parallel.module.prototype_vectors.data.copy_(torch.tensor(prototype_update,
                                                                                dtype=torch.float32))
    return global_min_proto_dist, proto_rf_boxes


def _compute_rf_prototype(img_size, prototype_patch_index, protoL_rf_info):
    img_index, height_index, width_index = prototype_patch_index
    n, j, r, start = protoL_rf_info
    center_h = start + (height_index * j)
    center_w = start + (width_index * j)
    return [img_index, max(int(center_h - (r / 2)), 0), min(int(center_h + (r / 2)), img_size),
            max(int(center_w - (r / 2)), 0), min(int(center_w + (r / 2)), img_size)]


def _update_prototypes_on_batch(search_batch_input, start_index_of_search_batch, prototype_network_parallel,
                                global_min_proto_dist, global_min_fmap_patches, proto_rf_boxes, class_specific=True,
                                search_y=None, num_classes=None, preprocess_input_function=None,
                                prototype_layer_stride=1):
    prototype_network_parallel.eval()
    if preprocess_input_function is not None:
        search_batch = preprocess_input_function(search_batch_input)
    else:
        search_batch = search_batch_input
    with torch.no_grad():
        protoL_input_torch, proto_dist_torch = prototype_network_parallel.module.push_forward(search_batch)
    protoL_input_ = np.copy(protoL_input_torch.detach().cpu().numpy())
    proto_dist_ = np.copy(proto_dist_torch.detach().cpu().numpy())
    del protoL_input_torch, proto_dist_torch
    if class_specific:
        class_to_img_index_dict = {key: [] for key in range(num_classes)}
        for img_index, img_y in enumerate(search_y):
            img_label = img_y.item()
            class_to_img_index_dict[img_label].append(img_index)
    prototype_shape = prototype_network_parallel.module.prototype_shape
    n_prototypes = prototype_shape[0]
    proto_h = prototype_shape[2]
    proto_w = prototype_shape[3]
    for j in range(n_prototypes):
        if class_specific:
            target_class = torch.argmax(prototype_network_parallel.module.prototype_class_identity[j]).item()
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
            batch_min_fmap_patch_j = protoL_input_[img_index_in_batch, :, fmap_height_start_index:fmap_height_end_index,
                                                   fmap_width_start_index:fmap_width_end_index]
            global_min_proto_dist[j] = batch_min_proto_dist_j
            global_min_fmap_patches[j] = batch_min_fmap_patch_j
            protoL_rf_info = prototype_network_parallel.module.proto_layer_rf_info
            rf_prototype_j = _compute_rf_prototype(search_batch.size(2), batch_argmin_proto_dist_j, protoL_rf_info)
            proto_rf_boxes[j, 0] = rf_prototype_j[0] + start_index_of_search_batch
            proto_rf_boxes[j, 1:5] = rf_prototype_j[1:5]
            proto_rf_boxes[j, 5] = search_y[rf_prototype_j[0]].item()

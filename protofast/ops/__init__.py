"""The public operators, one module per op family (schema, fake kernel, autograd, per-device implementation)."""
from .distances import log_similarity, prototype_distance_maps, prototype_min_distances
from .losses import cluster_separation_costs, masked_l1, mean_distance_loss
from .views import mask_views
from .masked_gap import masked_gap
from .pipnet import PIPNetLosses, pipnet_losses, pipnet_presence
from .nmf import BatchedNMFResult, batched_nmf, nmf_encode  # protofast.ops.nmf stays the module; nmf() is protofast.nmf

__all__ = [
    "prototype_min_distances",
    "prototype_distance_maps",
    "log_similarity",
    "cluster_separation_costs",
    "masked_l1",
    "mean_distance_loss",
    "mask_views",
    "masked_gap",
    "pipnet_presence",
    "pipnet_losses",
    "PIPNetLosses",
    "batched_nmf",
    "nmf_encode",
    "BatchedNMFResult",
]

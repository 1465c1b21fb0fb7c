"""protofast: fused kernels for prototype-based interpretable vision models.

Importing protofast does no work: the C++ CPU kernels are compiled on first use (once, cached), and nothing
initialises CUDA. ``protofast.info()`` reports versions and the active backends.
"""
from ._backend import info
from ._version import __version__
from .ops import (
    cluster_separation_costs,
    log_similarity,
    mask_views,
    masked_gap,
    masked_l1,
    mean_distance_loss,
    pipnet_losses,
    pipnet_presence,
    PIPNetLosses,
    prototype_distance_maps,
    prototype_min_distances,
)
from .ops.nmf import BatchedNMFResult, batched_nmf, nmf, nmf_encode

from . import compat, data, metrics, models, train
from .push import PushResult, push_prototypes
from . import pipnet_train

__all__ = [
    "__version__",
    "info",
    # operators
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
    # ProtoNMF: batched NMF by multiplicative updates
    "batched_nmf",
    "nmf",
    "nmf_encode",
    "BatchedNMFResult",
    # ProtoPNet end to end: projection, models, datasets, training, the cfchen-duke drop-in
    "push_prototypes",
    "PushResult",
    "models",
    "data",
    "train",
    "metrics",
    "compat",
    # PIP-Net end to end (models.PIPNet, dataset top-k, compat.pipnet)
    "pipnet_train",
]

"""Plain, readable PyTorch implementations of every protofast op: the test oracle (run them in float64).

They materialise what the fused ops avoid (full B×M×N distance maps, B×K×M masks) and read like the papers;
``SEMANTICS.md`` in the design notes is the contract they implement. Autograd gives their gradients.
"""
from .distances import (
    log_similarity,
    prototype_distance_maps,
    prototype_min_distances,
)
from . import protomask
from .losses import (
    cluster_separation_costs,
    masked_l1,
    mean_distance_loss,
    mean_min_distance_loss,
)

__all__ = [
    "prototype_distance_maps",
    "prototype_min_distances",
    "log_similarity",
    "cluster_separation_costs",
    "masked_l1",
    "mean_distance_loss",
    "mean_min_distance_loss",
    "protomask",
]
from . import pipnet  # noqa: E402  (PIP-Net: protofast.reference.pipnet.pipnet_presence / pipnet_losses)

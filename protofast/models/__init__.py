"""Reference architectures built from protofast ops: :class:`ProtoPNet`, :class:`PIPNet` and small backbones."""
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone
from .pipnet import PIPNet, PrototypeTopK, dataset_topk, zero_unused_prototypes

__all__ = ["ProtoPNet", "SmallCNN", "build_backbone", "torchvision_backbone",
           "PIPNet", "PrototypeTopK", "dataset_topk", "zero_unused_prototypes"]

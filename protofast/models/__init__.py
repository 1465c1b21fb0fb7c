"""Reference architectures built from protofast ops: :class:`ProtoPNet`, :class:`PIPNet`, :class:`DProtoNet`,
:class:`ProtoMask`, :class:`ProtoNMF` and small backbones."""
from .dprotonet import DProtoNet
from .pipnet import PIPNet, PrototypeTopK, dataset_topk, zero_unused_prototypes
from .protomask import ProtoMask, push_protomask
from .protonmf import ProtoNMF, ProtoNMFOutput
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone

__all__ = ["ProtoPNet", "PIPNet", "PrototypeTopK", "dataset_topk", "zero_unused_prototypes", "DProtoNet",
           "ProtoMask", "push_protomask", "ProtoNMF", "ProtoNMFOutput", "SmallCNN", "build_backbone",
           "torchvision_backbone"]

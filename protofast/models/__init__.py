"""Reference architectures built from protofast ops: :class:`ProtoPNet`, :class:`DProtoNet`, :class:`ProtoMask` and
small backbones."""
from .dprotonet import DProtoNet
from .protomask import ProtoMask, push_protomask
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone

__all__ = ["ProtoPNet", "DProtoNet", "ProtoMask", "push_protomask", "SmallCNN", "build_backbone",
           "torchvision_backbone"]

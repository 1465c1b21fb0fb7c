"""Reference architectures built from protofast ops: :class:`ProtoPNet`, :class:`ProtoMask` and small backbones."""
from .protomask import ProtoMask, push_protomask
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone

__all__ = ["ProtoPNet", "ProtoMask", "push_protomask", "SmallCNN", "build_backbone", "torchvision_backbone"]

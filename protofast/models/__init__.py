"""Reference architectures built from protofast ops: :class:`ProtoPNet`, :class:`ProtoMask` and small backbones."""
from .protomask import ProtoMask
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone

__all__ = ["ProtoPNet", "ProtoMask", "SmallCNN", "build_backbone", "torchvision_backbone"]

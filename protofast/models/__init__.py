"""Reference architectures built from protofast ops: :class:`ProtoPNet`, :class:`ProtoNMF` and small backbones."""
from .protonmf import ProtoNMF, ProtoNMFOutput
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone

__all__ = ["ProtoPNet", "SmallCNN", "build_backbone", "torchvision_backbone", "ProtoNMF", "ProtoNMFOutput"]

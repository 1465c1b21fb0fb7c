"""Reference architectures built from protofast ops: :class:`ProtoPNet` and small backbones."""
from .protopnet import ProtoPNet, SmallCNN, build_backbone, torchvision_backbone

__all__ = ["ProtoPNet", "SmallCNN", "build_backbone", "torchvision_backbone"]

from .dprotonet import DProtoNet  # noqa: E402

__all__ += ["DProtoNet"]

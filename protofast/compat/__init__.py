"""Drop-ins that make existing prototype-network codebases use protofast without rewriting them.

* :mod:`protofast.compat.protopnet`: cfchen-duke/ProtoPNet ``PPNet`` objects (``patch``/``unpatch``), the
  training loop's cost terms (``costs``) and ``push_prototypes`` with the original call signature.
* :mod:`protofast.compat.pipnet`: M-Nauta/PIPNet ``PIPNet`` objects (``patch``/``unpatch``: fused presence
  scores) and the train loop's ``calculate_loss`` with the original signature (fused align and tanh terms).

Submodules are imported lazily (``import protofast.compat.protopnet``); importing this package does no work.
"""
import importlib

__all__ = ["protopnet", "pipnet"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

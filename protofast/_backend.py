"""Which implementation runs an op (DESIGN.md §2).

- CPU tensors: the fused C++ kernel (``csrc/``, built just in time on first use) when it builds, else the
  chunked torch fallback.
- Other devices: the chunked torch fallback (the Triton kernels are the CUDA path once they land).
- ``PROTOFAST_BACKEND=cpp|torch`` (or ``auto``, the default) forces a backend; it is read at every call, so
  tests and users can switch it at run time. ``cpp`` on a machine where the extension cannot be built raises.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

BACKENDS = ("auto", "cpp", "torch")


def requested_backend() -> str:
    name = os.environ.get("PROTOFAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PROTOFAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def backend_for(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``: ``"cpp"`` or ``"torch"``."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if device.type != "cpu":
        if name == "cpp":
            raise RuntimeError(f"PROTOFAST_BACKEND=cpp runs on CPU tensors only, got a tensor on {device}")
        return "torch"
    from . import _cpp

    if _cpp.load_library():
        return "cpp"
    if name == "cpp":
        raise RuntimeError(f"PROTOFAST_BACKEND=cpp but the C++ extension is unavailable: {_cpp.build_info()['error']}")
    return "torch"


def _dist_version(name: str):
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def info(build: bool = True) -> dict:
    """Versions and active backends (JSON-serialisable). ``build=True`` builds/loads the C++ kernel first."""
    from . import _cpp
    from ._version import __version__

    cpu_backend = None
    error = None
    if build:
        try:
            cpu_backend = backend_for(torch.device("cpu"))
        except RuntimeError as exc:  # forced cpp without a compiler
            error = str(exc)
    cuda = torch.cuda.is_available()
    return {
        "protofast": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": _dist_version("numpy"),
        "triton": _dist_version("triton"),
        "threads": torch.get_num_threads(),
        "requested_backend": os.environ.get("PROTOFAST_BACKEND", "auto"),
        "cpu_backend": cpu_backend,
        "cpu_backend_error": error,
        "cpp_extension": _cpp.build_info(),
        "cuda_available": cuda,
        "cuda_backend": "torch (Triton kernels not yet available)" if cuda else None,
    }

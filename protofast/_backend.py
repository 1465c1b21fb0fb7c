"""Which implementation runs an op (DESIGN.md §2).

- CPU tensors: the fused C++ kernel (``csrc/``, built just in time on first use) when it builds, else the
  chunked torch fallback.
- CUDA tensors: the Triton kernels (``kernels/``, installed as ``protofast.kernels``) for the min-distance
  operator and its backward, when Triton imports; the chunked torch fallback for everything else.
- Other devices: the chunked torch fallback.
- ``PROTOFAST_BACKEND=cpp|torch|triton`` (or ``auto``, the default) forces a backend; it is read at every call, so
  tests and users can switch it at run time. ``cpp`` on a machine where the extension cannot be built raises;
  ``triton`` on CPU tensors is accepted only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how
  the GPU path is tested end to end on machines without a GPU.
"""
from __future__ import annotations

import functools
import os
import platform
import sys

import torch

BACKENDS = ("auto", "cpp", "torch", "triton")


def requested_backend() -> str:
    name = os.environ.get("PROTOFAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PROTOFAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpreter() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``: CPU tensors, no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str | None]:
    """``(available, error)``: whether the Triton kernels import (Triton installed and its version supported)."""
    try:
        from .kernels import prototype_distances  # noqa: F401
    except Exception as exc:  # ImportError without triton, or an incompatible triton
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def backend_for(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device``: ``"cpp"``, ``"triton"`` or ``"torch"``.

    Ops without a kernel for the returned backend run the chunked torch code (only the min-distance operator
    and its backward have Triton kernels; the loss ops are O(B·M) and run as torch on the GPU)."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        if device.type == "cpu" and not triton_interpreter():
            raise RuntimeError("PROTOFAST_BACKEND=triton on CPU tensors needs the Triton interpreter "
                               "(TRITON_INTERPRET=1 set before the first import of triton)")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"PROTOFAST_BACKEND=triton runs on CUDA tensors, got a tensor on {device}")
        ok, error = triton_status()
        if not ok:
            raise RuntimeError(f"PROTOFAST_BACKEND=triton but the Triton kernels are unavailable: {error}")
        return "triton"
    if device.type != "cpu":
        if name == "cpp":
            raise RuntimeError(f"PROTOFAST_BACKEND=cpp runs on CPU tensors only, got a tensor on {device}")
        if device.type == "cuda" and triton_status()[0]:
            return "triton"
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
    triton_ok, triton_error = triton_status()
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
        "triton_kernels": triton_ok,
        "triton_error": triton_error,
        "gpu_path": ("triton" if triton_ok else "torch") if cuda else None,
        "gpu_path_note": None if cuda else "no CUDA device: the Triton kernels are not used on this machine",
    }

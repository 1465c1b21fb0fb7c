"""Triton kernels for CUDA GPUs (installed as ``protofast.kernels``).

Launchers here are plain functions of tensors, with no autograd; ``protofast.ops`` registers them as the CUDA
implementation of its operators (DESIGN.md §1). Importing this package does not import triton: the launchers are
loaded on first attribute access (``protofast.kernels.min_distances_forward``), or import
``protofast.kernels.prototype_distances`` directly.

    min_distances_forward(X, P, cosine, channels_first) -> (values [B, M] float32, argmin [B, M] int64)
    min_distances_backward(grad, X, P, values, argmin, cosine, channels_first) -> (grad_X, grad_P)
    distance_maps(X, P, cosine) -> d [B, M, N] float32

``protofast.kernels.aot`` compiles every selectable variant for sm_80/sm_90 and reports registers, shared memory
and spills (``python -m protofast.kernels.aot``); docs/kernels.md has the table and the roofline estimates.
"""
from __future__ import annotations

import importlib

_LAUNCHERS = ("min_distances_forward", "min_distances_backward", "distance_maps", "kernel_variants")
__all__ = list(_LAUNCHERS)


def __getattr__(name: str):
    if name in _LAUNCHERS:
        return getattr(importlib.import_module(".prototype_distances", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

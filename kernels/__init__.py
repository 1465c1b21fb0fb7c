"""Triton kernels for CUDA GPUs (installed as ``protofast.kernels``).

Launchers here are plain functions of tensors, with no autograd; ``protofast.ops`` registers them as the CUDA
implementation of its operators (DESIGN.md §1). Until they land, CUDA tensors run the chunked torch fallback.
"""

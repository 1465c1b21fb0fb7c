"""DProtoNet's masked global average pooling (SEMANTICS.md §4.2, eq. 8) as one batched GEMM.

For a feature map F [B, D, H, W] and I feature masks M [I, D, H, W] (values in [0, 1] in DProtoNet; any real
values are accepted), with S = H·W:

    z[b, i, c] = (1/S) Σ_s M[i, c, s] · F[b, c, s]                                   (z_i = GAP(M_i ⊙ F))

For every channel c this is the product F_c [B, S] · M_cᵀ [S, I], so the whole op is one batched GEMM with the
channel as batch index: ``bmm(F viewed [D, B, S], M viewed [D, S, I]) -> [D, B, I]``, 2·D·B·I·S flops, and
nothing of size B×I×D×H×W (the literal M_i ⊙ F) is ever formed. The backward is two more batched GEMMs:

    ∂L/∂F[b, c, s] = (1/S) Σ_i G[b, i, c] · M[i, c, s]      bmm(G [D, B, I], M [D, I, S]) -> [D, B, S]
    ∂L/∂M[i, c, s] = (1/S) Σ_b G[b, i, c] · F[b, c, s]      bmm(Gᵀ [D, I, B], F [D, B, S]) -> [D, I, S]

each computed only when that input needs a gradient (the default DProtoNet masks are a fixed buffer).

Layout: every GEMM result [D, X, Y] is moved to a contiguous [X, D, Y] tensor in the same pass that applies 1/S
(rows of Y stay contiguous, so this is a cheap strided copy); the innermost dimension is never transposed (a
transposing copy of z costs about as much as the GEMM itself on the CPU). z is therefore returned as the
[B, I, D] view ``buffer.transpose(1, 2)`` of a contiguous [B, D, I] buffer: ``z.transpose(1, 2).unsqueeze(-1)``
is a contiguous [B, D, I, 1] "feature map" that :func:`protofast.prototype_min_distances` reads channels-first
with no copy (the mask index is the argmin), which is how DProtoNet uses it.

Why no C++ / Triton kernel: the op *is* a batched GEMM, so ``torch.bmm`` runs it on the best GEMM of each
device (MKL/oneDNN on CPU, cuBLAS strided-batched GEMM on CUDA, half inputs accumulated in float32 by cuBLAS);
``benchmarks/dprotonet_head.py`` measures it against the bare bmm of the same operands (the GEMM floor) on CPU.
No GPU timing is claimed.

Operators (namespace ``protofast``), on contiguous-or-not inputs of one dtype:

    masked_gap(F [B, D, H, W], M [I, D, H, W]) -> z [B, I, D]   (strides of a [B, D, I] buffer)
    masked_gap_grad_features(G [B, I, D], M [I, D, H, W], H, W) -> ∂L/∂F [B, D, H, W]
    masked_gap_grad_masks(G [B, I, D], F [B, D, H, W]) -> ∂L/∂M [I, D, H, W]

float16/bfloat16 run in float32 on the CPU (rounded once on the way out) and natively on CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_tensor

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: float32 for half inputs on the CPU (no fast half GEMM there), else the input's."""
    if t.dtype in _HALF_DTYPES and t.device.type != "cuda":
        return torch.float32
    return t.dtype


def _channel_batches(t: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, D, H, W] -> [D, N, S] (a strided view where possible; bmm reads the strides)."""
    return t.to(dtype).reshape(t.shape[0], t.shape[1], -1).transpose(0, 1)


def _scaled_bmm_into(a: Tensor, b: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``scale · bmm(a, b)`` for a [D, X, Y] GEMM result, returned as a contiguous ``[X, D, Y]`` tensor of
    ``dtype``. The GEMM writes a contiguous [D, X, Y]; one pass then scales, casts and moves it to [X, D, Y]
    (rows of Y stay contiguous: a plain strided copy, not a transpose of the innermost dimension). Writing the
    GEMM straight into the [X, D, Y] buffer (``out=`` a transposed view) was measured 10× slower with two
    threads."""
    r = torch.bmm(a, b)
    out = torch.empty(r.shape[1], r.shape[0], r.shape[2], dtype=dtype, device=r.device)
    return torch.mul(r.transpose(0, 1), scale, out=out)


# ----------------------------------------------------------------------------------------------- forward
@torch.library.custom_op("protofast::masked_gap", mutates_args=())
def _masked_gap(features: Tensor, masks: Tensor) -> Tensor:
    B, D, H, W = features.shape
    dtype = _compute_dtype(features)
    Fc = _channel_batches(features, dtype)                     # [D, B, S]
    Mc = _channel_batches(masks, dtype).transpose(1, 2)        # [D, S, I]
    z = _scaled_bmm_into(Fc, Mc, 1.0 / (H * W), features.dtype)   # [B, D, I] memory
    return z.transpose(1, 2)                                   # [B, I, D] view of it


@_masked_gap.register_fake
def _(features, masks):
    return features.new_empty(features.shape[0], features.shape[1], masks.shape[0]).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- backward
@torch.library.custom_op("protofast::masked_gap_grad_features", mutates_args=())
def masked_gap_grad_features(grad: Tensor, masks: Tensor, H: int, W: int) -> Tensor:
    """∂L/∂F [B, D, H, W] from G = ∂L/∂z [B, I, D] (any strides)."""
    B, I, D = grad.shape
    dtype = _compute_dtype(grad)
    G = grad.to(dtype).permute(2, 0, 1)                        # [D, B, I]
    Mc = _channel_batches(masks, dtype)                        # [D, I, S]
    out = _scaled_bmm_into(G, Mc, 1.0 / (H * W), grad.dtype)      # [B, D, S]
    return out.view(B, D, H, W)


@masked_gap_grad_features.register_fake
def _(grad, masks, H, W):
    return grad.new_empty(grad.shape[0], grad.shape[2], H, W)


@torch.library.custom_op("protofast::masked_gap_grad_masks", mutates_args=())
def masked_gap_grad_masks(grad: Tensor, features: Tensor) -> Tensor:
    """∂L/∂M [I, D, H, W] from G = ∂L/∂z [B, I, D] (any strides)."""
    B, I, D = grad.shape
    H, W = features.shape[2], features.shape[3]
    dtype = _compute_dtype(grad)
    Gt = grad.to(dtype).permute(2, 1, 0)                       # [D, I, B]
    Fc = _channel_batches(features, dtype)                     # [D, B, S]
    out = _scaled_bmm_into(Gt, Fc, 1.0 / (H * W), grad.dtype)     # [I, D, S]
    return out.view(I, D, H, W)


@masked_gap_grad_masks.register_fake
def _(grad, features):
    return grad.new_empty(grad.shape[1], *features.shape[1:])


def _setup(ctx, inputs, output):
    features, masks = inputs
    ctx.save_for_backward(features, masks)
    ctx.hw = (features.shape[2], features.shape[3])


def _backward(ctx, grad):
    features, masks = ctx.saved_tensors
    grad_features = grad_masks = None
    if ctx.needs_input_grad[0]:
        grad_features = masked_gap_grad_features(grad, masks, ctx.hw[0], ctx.hw[1])
    if ctx.needs_input_grad[1]:
        grad_masks = masked_gap_grad_masks(grad, features)
    return grad_features, grad_masks


_masked_gap.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------- public API
def check_masked_gap_inputs(features, masks) -> None:
    """Shapes, dtypes and devices accepted by :func:`masked_gap` (TypeError / ValueError naming the argument)."""
    check_tensor("features", features)
    check_tensor("masks", masks)
    if features.dim() != 4:
        raise ValueError(f"features must be a [B, D, H, W] feature map, got a {features.dim()}-d tensor of shape "
                         f"{tuple(features.shape)}")
    if masks.dim() != 4:
        raise ValueError(f"masks must be [I, D, H, W] (one D×H×W mask per masked vector), got a {masks.dim()}-d "
                         f"tensor of shape {tuple(masks.shape)}")
    if masks.dtype != features.dtype:
        raise TypeError(f"masks and features must have the same dtype, got {masks.dtype} and {features.dtype}")
    if masks.device != features.device:
        raise ValueError(f"masks and features must be on the same device, got {masks.device} and {features.device}")
    if tuple(masks.shape[1:]) != tuple(features.shape[1:]):
        raise ValueError(f"masks [I, D, H, W] must match the features' [D, H, W] = {tuple(features.shape[1:])}, "
                         f"got masks of shape {tuple(masks.shape)}")
    if features.numel() == 0:
        raise ValueError(f"features must be non-empty (B, D, H, W >= 1), got shape {tuple(features.shape)}")
    if masks.shape[0] == 0:
        raise ValueError("masks must hold at least one mask (I >= 1), got I=0")


def masked_gap(features: Tensor, masks: Tensor) -> Tensor:
    """DProtoNet's masked vectors z_i = GAP(M_i ⊙ F) (eq. 8) for all images and masks, as one batched GEMM.

    Args:
        features: ``F [B, D, H, W]``, the feature map (after DProtoNet's shaping net).
        masks: ``M [I, D, H, W]``, the feature masks (DProtoNet: values in [0, 1]; not checked, any values work).
            Same dtype and device as ``features``.

    Returns:
        ``z [B, I, D]`` with ``z[b, i, c] = (1/(H·W)) Σ_{h,w} M[i, c, h, w]·F[b, c, h, w]`` in the features' dtype
        (float16/bfloat16 accumulate in float32). Differentiable in both arguments:
        ``∂z[b,i,c]/∂F[b,c,h,w] = M[i,c,h,w]/(H·W)``, ``∂z[b,i,c]/∂M[i,c,h,w] = F[b,c,h,w]/(H·W)``.
        A NaN in ``F[b, c]`` (or ``M[i, c]``) makes exactly the entries ``z[b, :, c]`` (``z[:, i, c]``) NaN.

    Memory: the inputs and z only (plus contiguous copies of the operands when their strides need one); the
    ``[B, I, D, H, W]`` product is never formed. z is a transposed view of a contiguous ``[B, D, I]`` buffer
    (``z.transpose(1, 2)`` is contiguous; call ``.contiguous()`` for row-major [B, I, D]).
    """
    check_masked_gap_inputs(features, masks)
    return _masked_gap(features, masks)

"""Prototype distances reduced over patches, their full maps, and ProtoPNet's log-similarity.

The registered operators work on the canonical set layout (``protofast._layout``): patches X [B, N, K] and
prototypes P [M, K], both contiguous and of one dtype (float32 or float64; half inputs are upcast by the public
functions). ``metric`` is ``"l2"`` (squared, relu-clamped, SEMANTICS.md §1.2) or ``"cosine"``; for ``"cosine"``
the operators receive unit-normalised X and P and compute 1 − x·p, so the normalisation's gradient is ordinary
autograd around them.

Operators (namespace ``protofast``):

    set_min_distances(X, P, metric) -> (values [B, M], argmin [B, M] int64)
        values[b, m] = min_n d[b, m, n], argmin = first n attaining it; NaN in a row wins.
    set_min_distances_backward(grad, X, P, values, argmin, metric) -> (grad_X, grad_P)
        The gradient reaches one patch per (b, m): with G = grad · [values > 0] (l2) or grad (cosine), n* = argmin,
        l2:     grad_X[b, n*] += 2G(x − p_m),  grad_P[m] += 2G(p_m − x[b, n*])
        cosine: grad_X[b, n*] += −G p_m,      grad_P[m] += −G x[b, n*]
    set_distance_maps(X, P, metric) -> d [B, M, N]      (heatmaps; written in bounded-memory chunks)
    set_distance_maps_backward(grad, X, P, d, metric) -> (grad_X, grad_P)
    log_similarity(d, eps) -> log((d + 1) / (d + eps))

Backends (``protofast._backend``): the fused C++ kernel for CPU tensors, the Triton kernels (``kernels/``) for
CUDA tensors (min distances forward and backward, full maps forward), else the chunked torch code below. The
chunked code never holds more than ``_CHUNK_ELEMENTS`` distance entries at once. Only the Triton kernels read
float16/bfloat16 X and P directly (accumulating in float32; values come back as float32); the other backends
are handed float32 by the public functions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backend import backend_for
from .._layout import as_patch_sets, normalize_patches
from .._validation import check_features_prototypes, check_metric, check_tensor

_CHUNK_ELEMENTS = 1 << 22  # distance entries per chunk of the torch fallback (16 MB in float32)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _values_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the min-distance values: float32 for half inputs (accumulated in float32), else the input's."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def _chunks(B: int, N: int, M: int):
    """(b0, b1, m0, m1) tiles covering [B] × [M], each with at most max(N, _CHUNK_ELEMENTS) entries of d."""
    mc = min(M, max(1, _CHUNK_ELEMENTS // N))
    bc = max(1, _CHUNK_ELEMENTS // (N * mc))
    for b0 in range(0, B, bc):
        for m0 in range(0, M, mc):
            yield b0, min(B, b0 + bc), m0, min(M, m0 + mc)


def _distance_tile(X: Tensor, P: Tensor, Q: Tensor | None, metric: str) -> Tensor:
    """d for a tile: X [b, N, K], P [m, K] -> [b, N, m]; same expanded formula as the reference."""
    G = X @ P.t()
    if metric == "cosine":
        return 1 - G
    S = (X * X).sum(-1)
    return torch.clamp_min(S[:, :, None] - 2 * G + Q[None, None, :], 0)


def _accumulate_tile_grads(grad_X: Tensor, grad_P: Tensor, g: Tensor, X: Tensor, P: Tensor,
                           b0: int, b1: int, m0: int, m1: int, metric: str) -> None:
    """Adds the gradients of Σ g[b, m, n]·d[b, m, n] over one tile (g already zero where the relu clamps).

    l2:     ∂/∂x[b, n] = 2 (Σ_m g) x[b, n] − 2 Σ_m g p_m,   ∂/∂p_m = 2 (Σ_{b,n} g) p_m − 2 Σ_{b,n} g x[b, n]
    cosine: ∂/∂x[b, n] = −Σ_m g p_m,                       ∂/∂p_m = −Σ_{b,n} g x[b, n]
    """
    Xb, Pm = X[b0:b1], P[m0:m1]
    scale = -1.0 if metric == "cosine" else -2.0
    grad_X[b0:b1] += scale * (g.transpose(1, 2) @ Pm)
    grad_P[m0:m1] += scale * torch.einsum("bmn,bnk->mk", g, Xb)
    if metric == "l2":
        grad_X[b0:b1] += 2 * g.sum(1).unsqueeze(-1) * Xb
        grad_P[m0:m1] += 2 * g.sum((0, 2)).unsqueeze(-1) * Pm


# ----------------------------------------------------------------------------------------------- min distances
@torch.library.custom_op("protofast::set_min_distances", mutates_args=())
def set_min_distances(X: Tensor, P: Tensor, metric: str, channels_first: bool = False) -> tuple[Tensor, Tensor]:
    backend = backend_for(X.device)
    if backend == "triton" and X.dtype != torch.float64:  # (no float64 Triton kernels: chunked torch)
        from ..kernels import prototype_distances as triton_kernels

        return triton_kernels.min_distances_forward(X, P, metric == "cosine", channels_first)
    if X.dtype in _HALF_DTYPES:  # only the Triton kernels read half inputs; elsewhere accumulate in float32
        X, P = X.float(), P.float()
    if backend == "cpp":
        return torch.ops.protofast_cpu.min_distances_forward(X, P, metric == "cosine", channels_first)
    if channels_first:
        X = X.transpose(1, 2)  # a view: matmul reads the strides
    B, N, _ = X.shape
    M = P.shape[0]
    values = X.new_empty(B, M)
    argmin = torch.empty(B, M, dtype=torch.long, device=X.device)
    Q = (P * P).sum(-1)
    for b0, b1, m0, m1 in _chunks(B, N, M):
        v, i = torch.min(_distance_tile(X[b0:b1], P[m0:m1], Q[m0:m1], metric), dim=1)
        values[b0:b1, m0:m1] = v
        argmin[b0:b1, m0:m1] = i
    return values, argmin


@set_min_distances.register_fake
def _(X, P, metric, channels_first=False):
    B, M = X.shape[0], P.shape[0]
    return X.new_empty(B, M, dtype=_values_dtype(X.dtype)), X.new_empty(B, M, dtype=torch.long)


@torch.library.custom_op("protofast::set_min_distances_backward", mutates_args=())
def set_min_distances_backward(grad: Tensor, X: Tensor, P: Tensor, values: Tensor, argmin: Tensor,
                               metric: str, channels_first: bool = False) -> tuple[Tensor, Tensor]:
    grad = grad.contiguous()
    backend = backend_for(X.device)
    if backend == "triton" and X.dtype != torch.float64:  # (no float64 Triton kernels: chunked torch)
        from ..kernels import prototype_distances as triton_kernels

        return triton_kernels.min_distances_backward(grad, X, P, values, argmin, metric == "cosine", channels_first)
    if X.dtype in _HALF_DTYPES:  # as in the forward: float32 math, gradients returned in the inputs' dtype
        grad_X, grad_P = set_min_distances_backward(grad.float(), X.float(), P.float(), values.float(), argmin,
                                                    metric, channels_first)
        return grad_X.to(X.dtype), grad_P.to(P.dtype)
    if backend == "cpp":
        return torch.ops.protofast_cpu.min_distances_backward(grad, X, P, values, argmin, metric == "cosine",
                                                              channels_first)
    if channels_first:
        grad_X, grad_P = set_min_distances_backward(grad, X.transpose(1, 2).contiguous(), P, values, argmin, metric)
        return grad_X.transpose(1, 2).contiguous(), grad_P
    B, N, _ = X.shape
    M = P.shape[0]
    G = grad if metric == "cosine" else torch.where(values > 0, grad, torch.zeros_like(grad))
    grad_X = torch.zeros_like(X)
    grad_P = torch.zeros_like(P)
    # Rebuild the one-hot routing weights g[b, m, n] = G[b, m]·[n = argmin[b, m]] tile by tile.
    for b0, b1, m0, m1 in _chunks(B, N, M):
        g = X.new_zeros(b1 - b0, m1 - m0, N)
        g.scatter_(2, argmin[b0:b1, m0:m1].unsqueeze(2), G[b0:b1, m0:m1].unsqueeze(2))
        _accumulate_tile_grads(grad_X, grad_P, g, X, P, b0, b1, m0, m1, metric)
    return grad_X, grad_P


@set_min_distances_backward.register_fake
def _(grad, X, P, values, argmin, metric, channels_first=False):
    return torch.empty_like(X), torch.empty_like(P)


def _min_setup(ctx, inputs, output):
    X, P, metric, channels_first = inputs
    values, argmin = output
    ctx.save_for_backward(X, P, values, argmin)
    ctx.metric, ctx.channels_first = metric, channels_first
    ctx.mark_non_differentiable(argmin)


def _min_backward(ctx, grad_values, grad_argmin):
    X, P, values, argmin = ctx.saved_tensors
    grad_X, grad_P = set_min_distances_backward(grad_values, X, P, values, argmin, ctx.metric, ctx.channels_first)
    return grad_X, grad_P, None, None


set_min_distances.register_autograd(_min_backward, setup_context=_min_setup)


# ----------------------------------------------------------------------------------------------- full maps
@torch.library.custom_op("protofast::set_distance_maps", mutates_args=())
def set_distance_maps(X: Tensor, P: Tensor, metric: str) -> Tensor:
    if backend_for(X.device) == "triton" and X.dtype != torch.float64:
        from ..kernels import prototype_distances as triton_kernels

        return triton_kernels.distance_maps(X, P, metric == "cosine").to(X.dtype)
    B, N, _ = X.shape
    M = P.shape[0]
    out = X.new_empty(B, M, N)
    Q = (P * P).sum(-1)
    for b0, b1, m0, m1 in _chunks(B, N, M):
        out[b0:b1, m0:m1] = _distance_tile(X[b0:b1], P[m0:m1], Q[m0:m1], metric).transpose(1, 2)
    return out


@set_distance_maps.register_fake
def _(X, P, metric):
    return X.new_empty(X.shape[0], P.shape[0], X.shape[1])


@torch.library.custom_op("protofast::set_distance_maps_backward", mutates_args=())
def set_distance_maps_backward(grad: Tensor, X: Tensor, P: Tensor, maps: Tensor,
                               metric: str) -> tuple[Tensor, Tensor]:
    B, N, _ = X.shape
    M = P.shape[0]
    grad_X = torch.zeros_like(X)
    grad_P = torch.zeros_like(P)
    for b0, b1, m0, m1 in _chunks(B, N, M):
        g = grad[b0:b1, m0:m1]
        if metric == "l2":
            g = torch.where(maps[b0:b1, m0:m1] > 0, g, torch.zeros_like(g))   # relu: no gradient where clamped
        _accumulate_tile_grads(grad_X, grad_P, g, X, P, b0, b1, m0, m1, metric)
    return grad_X, grad_P


@set_distance_maps_backward.register_fake
def _(grad, X, P, maps, metric):
    return torch.empty_like(X), torch.empty_like(P)


def _maps_setup(ctx, inputs, output):
    X, P, metric = inputs
    ctx.save_for_backward(X, P, output)
    ctx.metric = metric


def _maps_backward(ctx, grad):
    X, P, maps = ctx.saved_tensors
    grad_X, grad_P = set_distance_maps_backward(grad.contiguous(), X, P, maps, ctx.metric)
    return grad_X, grad_P, None


set_distance_maps.register_autograd(_maps_backward, setup_context=_maps_setup)


# ----------------------------------------------------------------------------------------------- log-similarity
@torch.library.custom_op("protofast::log_similarity", mutates_args=())
def _log_similarity(distances: Tensor, eps: float) -> Tensor:
    if backend_for(distances.device) == "cpp":
        return torch.ops.protofast_cpu.log_similarity_forward(distances, eps)
    return torch.log((distances + 1) / (distances + eps))


@_log_similarity.register_fake
def _(distances, eps):
    return torch.empty_like(distances)


def _log_sim_setup(ctx, inputs, output):
    distances, eps = inputs
    ctx.save_for_backward(distances)
    ctx.eps = eps


@torch.library.custom_op("protofast::log_similarity_backward", mutates_args=())
def _log_similarity_backward(grad: Tensor, distances: Tensor, eps: float) -> Tensor:
    """grad · d/dd log((d + 1)/(d + eps)) = grad · (1/(d + 1) − 1/(d + eps))."""
    if backend_for(distances.device) == "cpp":
        return torch.ops.protofast_cpu.log_similarity_backward(grad, distances, eps)
    return grad * (1 / (distances + 1) - 1 / (distances + eps))


@_log_similarity_backward.register_fake
def _(grad, distances, eps):
    return torch.empty_like(distances)


def _log_sim_backward(ctx, grad):
    (d,) = ctx.saved_tensors
    return _log_similarity_backward(grad, d, ctx.eps), None


_log_similarity.register_autograd(_log_sim_backward, setup_context=_log_sim_setup)


# ----------------------------------------------------------------------------------------------- public API
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _prepare(features, prototypes, metric, channels_first=False, keep_half=False):
    """Validated canonical inputs: contiguous X, P [M, K] in a kernel dtype, and the map shape.

    ``keep_half``: leave float16/bfloat16 inputs as they are when the Triton kernels run them.

    X is [B, N, K] (patch rows), or with ``channels_first`` and NCHW features [B, K, N]: the map viewed as
    [B, D, H·W] (or unfold's [B, D·h·w, L]) with no transposed copy, for ops whose kernels read that layout.
    Returns ``(X, P, map_shape, channels_first)`` with the layout actually used.
    """
    check_features_prototypes(features, prototypes)
    check_metric(metric)
    keep_half = keep_half and backend_for(features.device) == "triton"
    if features.dtype not in _KERNEL_DTYPES and not keep_half:
        # float16 / bfloat16 on the CPU kernels and the fallback: accumulate in float32 (windows' backward too).
        # The Triton kernels read half inputs directly and accumulate in float32 themselves.
        features, prototypes = features.float(), prototypes.float()
    channels_first = channels_first and features.dim() == 4
    if channels_first:
        X, P, map_shape = as_patch_sets(features, prototypes, channels_first=True)
    else:
        X, P, map_shape = as_patch_sets(features, prototypes)
    if metric == "cosine":
        X, P = normalize_patches(X, dim=1 if channels_first else -1), normalize_patches(P)
    return X.contiguous(), P.contiguous(), map_shape, channels_first


def prototype_min_distances(features: Tensor, prototypes: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Distance from every prototype to its nearest patch, without materialising the B×M×N maps.

    Args:
        features: ``[B, D, H, W]`` (NCHW, as ProtoPNet) or ``[B, N, D]`` (a set of N vectors per sample: views,
            masks, tokens).
        prototypes: ``[M, D]``, ``[M, D, 1, 1]`` or ``[M, D, h, w]`` (h×w > 1: valid sliding window, stride 1).
        metric: ``"l2"``: d = relu(‖x‖² − 2 x·p + ‖p‖²), ProtoPNet's squared distance, zero gradient where
            clamped; ``"cosine"``: d = 1 − x̂·p̂ with x̂ = x / max(‖x‖, 1e-12).

    Returns:
        ``values [B, M]`` = min over patches of d (dtype of the inputs; float16/bfloat16 accumulate in float32)
        and ``argmin [B, M]`` (int64): the flat patch index (row-major over H'×W', or the set index) of the
        first occurrence of the minimum. A NaN anywhere in a row gives a NaN value. Gradients flow to the argmin
        patch only (O(B·M·D) backward).
    """
    X, P, _, channels_first = _prepare(features, prototypes, metric, channels_first=True, keep_half=True)
    values, argmin = set_min_distances(X, P, metric, channels_first)
    return values.to(features.dtype), argmin


def prototype_distance_maps(features: Tensor, prototypes: Tensor, metric: str = "l2") -> Tensor:
    """Full distance maps ``[B, M, H', W']`` (NCHW input) or ``[B, M, N]`` (set input), same math as
    :func:`prototype_min_distances`; computed in bounded-memory chunks. For heatmaps and push visualisation."""
    X, P, map_shape, _ = _prepare(features, prototypes, metric)
    maps = set_distance_maps(X, P, metric)
    return maps.reshape(maps.shape[0], maps.shape[1], *map_shape).to(features.dtype)


def log_similarity(distances: Tensor, eps: float = 1e-4) -> Tensor:
    """ProtoPNet's similarity log((d + 1) / (d + eps)), ε = 1e-4 by default (quanproto 1e-14, DProtoNet 1e-12)."""
    check_tensor("distances", distances)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if distances.dtype in _KERNEL_DTYPES:
        return _log_similarity(distances, float(eps))
    # float16 / bfloat16: compute in float32 (eps = 1e-14 underflows in half precision), round the result
    return _log_similarity(distances.float(), float(eps)).to(distances.dtype)

"""Triton kernels for prototype distances reduced over patches (CUDA path of ``protofast::set_min_distances``).

Same contract as the C++ CPU kernels (``csrc/prototype_distances.cpp``, ``torch.ops.protofast_cpu.*``). Notation
(SEMANTICS.md §1.2, §1.4): b image, n patch, m prototype, k channel (K = D·h·w).

    X [B, N, K] patches (``channels_first=False``) or [B, K, N] (``channels_first=True``: an NCHW map viewed as
      [B, D, H·W], or unfold's [B, D·h·w, L]); read through its strides, never copied
    P [M, K]    prototypes; X and P share one dtype: float32, float16 or bfloat16 (accumulation is float32)

    squared L2 (ProtoPNet):  S[b,n] = Σ_k x[b,n,k]²,  Q[m] = Σ_k p[m,k]²,  G[b,n,m] = Σ_k x[b,n,k]·p[m,k]
                             d[b,m,n] = relu(S[b,n] − 2·G[b,n,m] + Q[m])
    cosine (X, P already unit-normalised by the caller): d[b,m,n] = 1 − G[b,n,m]   (no clamp)

Kernels (each a fused GEMM with a different epilogue; nothing of size B×M×N is written except by
``distance_maps``, whose output *is* that tensor):

    _min_distances_fwd_kernel   grid (⌈M/BLOCK_M⌉, B): tiles of BLOCK_N patches × BLOCK_M prototypes, ``tl.dot``
                                over K, S and Q added in registers, running min + argmin over the patches.
    _min_distances_bwd_x_kernel grid (⌈N/BLOCK_N⌉, ⌈K/BLOCK_K⌉, B): rebuilds the one-hot routing weights
                                W[n, m] = G[b,m]·[argmin[b,m] = n] tile by tile and computes W·P (one GEMM-sized
                                pass).
    _min_distances_bwd_p_kernel grid (⌈M/BLOCK_M⌉, ⌈K/BLOCK_K⌉): gathers the winning patch of every (b, m) and
                                reduces over b in a fixed order (O(B·M·K)).
    _distance_maps_kernel       grid (⌈N/BLOCK_N⌉, ⌈M/BLOCK_M⌉, B): the full maps d [B, M, N] (heatmaps).

Determinism: no atomics; every output element is owned by one program, and every reduction runs in a fixed
order, so two runs are bitwise equal. Exact ties: every distance is computed by the same instruction sequence
whatever tile its patch falls in, so identical patches give identical distances and the first one wins.

Indexing: the per-image base offset b·stride is int64; offsets inside one image (n·stride_n + k·stride_k) and
inside P are int32, so one image and P must each hold fewer than 2³¹ elements.

Configs: ``FWD_CONFIGS``, ``MAPS_CONFIGS``, ``BWD_X_CONFIGS``, ``BWD_P_CONFIGS`` (two per dtype class, "fp32" and
"half", picked by the ``_pick_*`` heuristics on (N, M, K, dtype)). Under ``TRITON_INTERPRET=1`` (read at every
call) every launcher uses ``INTERPRETER_CONFIG`` instead: 16 is the smallest block ``tl.dot`` accepts and keeps
the CPU interpreter fast. ``kernel_variants()`` enumerates every (kernel, config, dtype, constexprs) the launchers
can select on a GPU, and ``capture_launches()`` records what they would launch for given tensors;
``protofast.kernels.aot`` compiles both for sm_80 and sm_90.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters of one kernel. ``block_n``/``block_m``/``block_k``: patches, prototypes
    and channels per tile (unused entries are 0 for kernels that do not tile that axis)."""

    name: str
    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


# Block sizes are per dtype class ("fp32", "half"). The reduction axis of each dot is K for the forward and the
# maps, M for the backward to X (W·P); the backward to P has no dot (a gathered sum). float32 ``tl.dot`` in exact
# ("ieee") precision runs on FMA units with both operand slices held in registers for the whole reduction step,
# so its reduction block is 16 (32 spills on sm_80); float16/bfloat16 (and tf32) run on tensor cores and take 32.
# Warps and stages were chosen so that every variant, generic and JIT-specialised (``protofast.kernels.aot``),
# compiles without spills on sm_80 and sm_90 under the ptxas options of Triton 3.9: its ``--regAllocOptLevel=2``
# sometimes spills 4–16 bytes at 80–168 registers (e.g. 4 warps, or 2 stages on the 64-patch fp32 tile).
#
# Forward (min + argmin): one program owns BLOCK_M prototypes of one image and streams its N patches.
FWD_CONFIGS = {
    "fp32": [Config("n32", block_n=32, block_m=64, block_k=16, num_warps=8, num_stages=3),   # sets, views
             Config("n64", block_n=64, block_m=64, block_k=16, num_warps=8, num_stages=1)],  # 7×7 maps and up
    "half": [Config("n32", block_n=32, block_m=64, block_k=32, num_warps=8, num_stages=3),
             Config("n64", block_n=64, block_m=64, block_k=32, num_warps=8, num_stages=3)],
}
# Full maps: same tiles, but each program owns one patch block too (nothing streamed but K).
MAPS_CONFIGS = FWD_CONFIGS
# Backward to X: output tile BLOCK_N × BLOCK_K, streaming over the prototypes in exact float32 for every dtype.
BWD_X_CONFIGS = {
    "fp32": [Config("n32", block_n=32, block_m=16, block_k=32, num_warps=4, num_stages=2),
             Config("n64", block_n=64, block_m=16, block_k=64, num_warps=4, num_stages=2)],
}
BWD_X_CONFIGS["half"] = BWD_X_CONFIGS["fp32"]
# Backward to P: output tile BLOCK_M × BLOCK_K, streaming over the B images (no patch axis, no dot).
BWD_P_CONFIGS = {
    "fp32": [Config("m32k32", block_n=0, block_m=32, block_k=32, num_warps=4, num_stages=1),
             Config("m64k128", block_n=0, block_m=64, block_k=128, num_warps=8, num_stages=1)],
}
BWD_P_CONFIGS["half"] = BWD_P_CONFIGS["fp32"]
INTERPRETER_CONFIG = Config("interpret", block_n=16, block_m=16, block_k=16, num_warps=1, num_stages=1)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_PROGRAMS = 264  # 2 waves of an H100's 132 SMs: below this, prefer the smaller tile


def interpreting() -> bool:
    """True when the Triton CPU interpreter is on (``TRITON_INTERPRET=1``, read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def _pick_fwd(N: int, M: int, K: int, dtype: torch.dtype) -> Config:
    """Forward and maps: the 32-patch block when it holds all of N (sets, views), else the 64-patch block (7×7
    maps in one step; larger maps stream). M and K only change the grid and the loop trip count."""
    if interpreting():
        return INTERPRETER_CONFIG
    small, large = FWD_CONFIGS[_dtype_class(dtype)]
    return small if N <= 32 else large


def _pick_maps(N: int, M: int, K: int, dtype: torch.dtype) -> Config:
    if interpreting():
        return INTERPRETER_CONFIG
    small, large = MAPS_CONFIGS[_dtype_class(dtype)]
    return small if N <= 32 else large


def _pick_bwd_x(N: int, M: int, K: int, dtype: torch.dtype, B: int = 1) -> Config:
    """The 64 × 64 output tile once N and K exceed 32 and it still gives ≥ 2 waves of programs, else 32 × 32
    (ProtoPNet, B = 80, N = 49, K = 128: 160 large-tile programs would leave an H100 under-filled → small)."""
    if interpreting():
        return INTERPRETER_CONFIG
    small, large = BWD_X_CONFIGS[_dtype_class(dtype)]
    programs = B * triton.cdiv(N, large.block_n) * triton.cdiv(K, large.block_k)
    return large if N > 32 and K > 32 and programs >= _MIN_PROGRAMS else small


def _pick_bwd_p(M: int, K: int, dtype: torch.dtype) -> Config:
    """The larger tile only when it still gives enough programs to fill the GPU."""
    if interpreting():
        return INTERPRETER_CONFIG
    small, large = BWD_P_CONFIGS[_dtype_class(dtype)]
    if triton.cdiv(M, large.block_m) * triton.cdiv(K, large.block_k) >= _MIN_PROGRAMS:
        return large
    return small


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision of the forward: float32 follows ``torch.backends.cuda.matmul.allow_tf32``
    (default False: exact "ieee" products); float16/bfloat16 use their tensor-core path ("ieee" is ignored)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _distance_tile(x_base, P, offs_n, mask_n, offs_m, mask_m, K,
                   stride_xn, stride_xk, stride_pm, stride_pk,
                   COSINE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """d [BLOCK_N, BLOCK_M] in float32 for patches ``offs_n`` of one image and prototypes ``offs_m``.

    G = Σ_k x·p by ``tl.dot`` over K in BLOCK_K steps (masked entries load as 0); l2 adds S and Q, accumulated
    alongside, in registers: d = relu((S − 2G) + Q), the fallback's order. NaN propagates (``NaN < 0`` is false).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    q = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)             # [BLOCK_N, BLOCK_K]
        pt = tl.load(P + offs_m[None, :] * stride_pm + offs_k[:, None] * stride_pk,
                     mask=mask_m[None, :] & mask_k[:, None], other=0.0)            # [BLOCK_K, BLOCK_M]
        acc = tl.dot(x, pt, acc, input_precision=DOT_PRECISION)
        if not COSINE:
            xf = x.to(tl.float32)
            pf = pt.to(tl.float32)
            s += tl.sum(xf * xf, axis=1)
            q += tl.sum(pf * pf, axis=0)
    if COSINE:
        d = 1.0 - acc
    else:
        d = s[:, None] - 2.0 * acc + q[None, :]
        d = tl.where(d < 0.0, 0.0, d)
    return d


@triton.jit
def _min_distances_fwd_kernel(X, P, VALUES, ARGMIN, N, M, K,
                              stride_xb, stride_xn, stride_xk, stride_pm, stride_pk,
                              COSINE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """values[b, m] = min_n d[b, m, n] and argmin[b, m] = first n attaining it, for BLOCK_M prototypes of image b.

    NaN is tracked without relying on how ``min`` or ``<`` treat it: every distance is mapped to a key, NaN -> -inf
    (a real distance is never -inf: l2 is clamped at 0 and cosine inputs are unit vectors, so d ≥ -1 - rounding).
    Per tile, the first row whose key equals the tile minimum; across tiles (n increasing) a strict ``<`` keeps
    the earliest. A row with a NaN therefore reports NaN at its first NaN patch (``torch.min`` semantics); an
    all-inf row reports (inf, 0).
    """
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_base = X + b * stride_xb
    run_min = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    run_arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        d = _distance_tile(x_base, P, offs_n, mask_n, offs_m, mask_m, K, stride_xn, stride_xk,
                           stride_pm, stride_pk, COSINE, DOT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
        key = tl.where(d != d, float("-inf"), d)                 # NaN ranks below every distance
        key = tl.where(mask_n[:, None], key, float("inf"))       # rows past N never win
        tile_min = tl.min(key, axis=0)
        tile_arg = tl.min(tl.where(key == tile_min[None, :], offs_n[:, None], N), axis=0)
        better = tile_min < run_min                              # strict: an earlier tile keeps its tie
        run_arg = tl.where(better, tile_arg, run_arg)
        run_min = tl.where(better, tile_min, run_min)
    values = tl.where(run_min == float("-inf"), float("nan"), run_min)
    argmin = run_arg.to(tl.int64)
    tl.store(VALUES + b * M + offs_m, values, mask=mask_m)
    tl.store(ARGMIN + b * M + offs_m, argmin, mask=mask_m)


@triton.jit
def _distance_maps_kernel(X, P, OUT, N, M, K, stride_xb, stride_xn, stride_xk, stride_pm, stride_pk,
                          COSINE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[b, m, n] = d[b, m, n] (float32, contiguous [B, M, N]) for one BLOCK_N × BLOCK_M tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    d = _distance_tile(X + b * stride_xb, P, offs_n, mask_n, offs_m, mask_m, K, stride_xn, stride_xk,
                       stride_pm, stride_pk, COSINE, DOT_PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)
    out = OUT + b * M * N + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    tl.store(out, d, mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _routing_weights(GRAD, VALUES, ARGMIN, row, offs_m, mask_m, COSINE: tl.constexpr):
    """(G [BLOCK_M] float32, n* [BLOCK_M] int64) of image ``row``: G = grad·[values > 0] (l2; the relu has zero
    derivative at 0, and ``NaN > 0`` is false) or grad (cosine); masked prototypes get G = 0, n* = 0."""
    g = tl.load(GRAD + row + offs_m, mask=mask_m, other=0.0)
    if not COSINE:
        v = tl.load(VALUES + row + offs_m, mask=mask_m, other=0.0)
        g = tl.where(v > 0.0, g, 0.0)
    n_star = tl.load(ARGMIN + row + offs_m, mask=mask_m, other=0)
    return g, n_star


@triton.jit
def _min_distances_bwd_x_kernel(GRAD, X, P, VALUES, ARGMIN, GRAD_X, N, M, K,
                                stride_xb, stride_xn, stride_xk, stride_gb, stride_gn, stride_gk,
                                stride_pm, stride_pk,
                                COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """grad_X[b, n, k] for one BLOCK_N × BLOCK_K tile of image b.

    W[n, m] = G[b, m]·[argmin[b, m] = n] is rebuilt in registers for each prototype block, then
        l2:     grad_X[b, n] = 2·(Σ_m W[n, m])·x[b, n] − 2·Σ_m W[n, m]·p_m
        cosine: grad_X[b, n] = −Σ_m W[n, m]·p_m
    (Σ_m W·p by ``tl.dot`` in exact float32, prototype blocks in increasing order: deterministic.) As in the C++
    kernel, a patch that receives no gradient gets an exact 0 even if it holds inf/NaN; unlike it, a non-finite
    prototype poisons the whole W·P product (0·inf inside the dot), so grad_X turns NaN loudly.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)     # Σ_m W[n, m]·p_m
    w_sum = tl.zeros([BLOCK_N], dtype=tl.float32)            # Σ_m W[n, m]
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g, n_star = _routing_weights(GRAD, VALUES, ARGMIN, b * M, offs_m, mask_m, COSINE)
        w = tl.where(n_star[None, :] == offs_n[:, None], g[None, :], 0.0)          # [BLOCK_N, BLOCK_M]
        p = tl.load(P + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(w, p, acc, input_precision="ieee")
        w_sum += tl.sum(w, axis=1)
    tile = mask_n[:, None] & mask_k[None, :]
    if COSINE:
        grad_x = -acc
    else:
        x = tl.load(X + b * stride_xb + offs_n[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                    mask=tile, other=0.0).to(tl.float32)
        x_term = tl.where(w_sum[:, None] != 0.0, w_sum[:, None] * x, 0.0)   # unrouted rows: exact 0, even for inf
        grad_x = 2.0 * (x_term - acc)
    out = GRAD_X + b * stride_gb + offs_n[:, None] * stride_gn + offs_k[None, :] * stride_gk
    tl.store(out, grad_x.to(GRAD_X.dtype.element_ty), mask=tile)


@triton.jit
def _min_distances_bwd_p_kernel(GRAD, X, P, VALUES, ARGMIN, GRAD_P, B, M, K,
                                stride_xb, stride_xn, stride_xk, stride_pm, stride_pk, stride_gm, stride_gk,
                                COSINE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_P[m, k] for one BLOCK_M × BLOCK_K tile: the winning patch x[b, n*] of every image is gathered and
        l2:     grad_P[m] = Σ_b 2·G[b, m]·(p_m − x[b, n*])
        cosine: grad_P[m] = −Σ_b G[b, m]·x[b, n*]
    summed over b = 0, 1, … in order (deterministic; O(B·BLOCK_M·BLOCK_K) per program). Pairs with G = 0 are
    skipped (an exact 0 contribution even from a NaN patch), as in the C++ kernel."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    tile = mask_m[:, None] & mask_k[None, :]
    p = tl.load(P + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pk, mask=tile, other=0.0)
    p = p.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for b in range(0, B):
        b64 = tl.cast(b, tl.int64)
        g, n_star = _routing_weights(GRAD, VALUES, ARGMIN, b64 * M, offs_m, mask_m, COSINE)
        x = tl.load(X + b64 * stride_xb + n_star[:, None] * stride_xn + offs_k[None, :] * stride_xk,
                    mask=tile, other=0.0).to(tl.float32)                              # [BLOCK_M, BLOCK_K]
        if COSINE:
            term = g[:, None] * x
        else:
            term = g[:, None] * (p - x)
        acc += tl.where(g[:, None] != 0.0, term, 0.0)       # a pair with G = 0 adds an exact 0 (inf/NaN rows too)
    if COSINE:
        grad_p = -acc
    else:
        grad_p = 2.0 * acc
    out = GRAD_P + offs_m[:, None] * stride_gm + offs_k[None, :] * stride_gk
    tl.store(out, grad_p.to(GRAD_P.dtype.element_ty), mask=tile)


# --------------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher would issue it: runtime ``args`` (in the kernel's parameter order, without
    the constexprs), ``constexprs``, ``grid`` and ``config``."""

    kernel: str
    fn: object
    grid: tuple
    config: Config
    args: tuple
    constexprs: dict


_captured: list | None = None


@contextlib.contextmanager
def capture_launches():
    """Within the block, launchers record their ``Launch``es instead of running them (outputs stay
    uninitialised), and accept tensors on any device. The AOT check uses it to compile exactly what the launchers
    would launch for a given workload, specialisations included, without a GPU."""
    global _captured
    outer, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = outer


def _launch(kernel: str, fn, grid: tuple, cfg: Config, args: tuple, constexprs: dict) -> None:
    if _captured is not None:
        _captured.append(Launch(kernel, fn, grid, cfg, args, constexprs))
        return
    fn[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check_inputs(X: Tensor, P: Tensor) -> None:
    if X.dim() != 3 or P.dim() != 2:
        raise ValueError(f"expected X [B, N, K] (or [B, K, N]) and P [M, K], got {tuple(X.shape)} and "
                         f"{tuple(P.shape)}")
    if X.dtype != P.dtype or X.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"X and P must share one dtype among float32, float16, bfloat16; got {X.dtype} and "
                        f"{P.dtype}")
    if X.device != P.device:
        raise ValueError(f"X and P must be on one device, got {X.device} and {P.device}")
    if X.device.type != "cuda" and not interpreting() and _captured is None:
        raise ValueError(f"the Triton launchers need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got "
                         f"{X.device}")


def _patch_view(X: Tensor, channels_first: bool):
    """(N, K, stride_b, stride_n, stride_k) of X read as [B, N, K] (no copy for channels-first X [B, K, N])."""
    if channels_first:
        return X.shape[2], X.shape[1], X.stride(0), X.stride(2), X.stride(1)
    return X.shape[1], X.shape[2], X.stride(0), X.stride(1), X.stride(2)


def min_distances_forward(X: Tensor, P: Tensor, cosine: bool, channels_first: bool) -> tuple[Tensor, Tensor]:
    """``(values [B, M] float32, argmin [B, M] int64)``: min over the N patches of d[b, m, n] and the first n
    attaining it (NaN in a row gives NaN at its first NaN patch). X [B, N, K] or [B, K, N] (``channels_first``),
    P [M, K]; any strides."""
    _check_inputs(X, P)
    N, K, sxb, sxn, sxk = _patch_view(X, channels_first)
    B, M = X.shape[0], P.shape[0]
    if K != P.shape[1]:
        raise ValueError(f"X has {K} channels per patch but P has {P.shape[1]}")
    if N == 0:
        raise ValueError("min over an empty patch set (N = 0)")
    values = torch.empty(B, M, dtype=torch.float32, device=X.device)
    argmin = torch.empty(B, M, dtype=torch.int64, device=X.device)
    if B == 0 or M == 0:
        return values, argmin
    cfg = _pick_fwd(N, M, K, X.dtype)
    grid = (triton.cdiv(M, cfg.block_m), B)
    _launch("min_distances_fwd", _min_distances_fwd_kernel, grid, cfg,
            (X, P, values, argmin, N, M, K, sxb, sxn, sxk, P.stride(0), P.stride(1)),
            dict(COSINE=bool(cosine), DOT_PRECISION=_dot_precision(X.dtype),
                 BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k))
    return values, argmin


def min_distances_backward(grad: Tensor, X: Tensor, P: Tensor, values: Tensor, argmin: Tensor, cosine: bool,
                           channels_first: bool) -> tuple[Tensor, Tensor]:
    """``(grad_X, grad_P)`` of Σ grad·values: the gradient reaches the argmin patch of every (b, m) only.

    G = grad·[values > 0] (l2) or grad (cosine), n* = argmin[b, m]:
        l2:     grad_X[b, n*] += 2G·(x[b, n*] − p_m),  grad_P[m] += 2G·(p_m − x[b, n*])
        cosine: grad_X[b, n*] += −G·p_m,               grad_P[m] += −G·x[b, n*]
    grad_X has X's shape, dtype and (dense) strides; grad_P is [M, K] in P's dtype. Deterministic.
    """
    _check_inputs(X, P)
    N, K, sxb, sxn, sxk = _patch_view(X, channels_first)
    B, M = X.shape[0], P.shape[0]
    grad_X = torch.empty_like(X)
    grad_P = torch.empty_like(P)
    if B == 0 or M == 0 or N == 0 or K == 0:
        return grad_X.zero_(), grad_P.zero_()
    grad = grad.to(torch.float32).contiguous()
    values = values.to(torch.float32).contiguous()
    argmin = argmin.contiguous()
    for name, t, dtype in (("grad", grad, None), ("values", values, None), ("argmin", argmin, torch.int64)):
        if t.shape != (B, M) or (dtype is not None and t.dtype != dtype):
            raise ValueError(f"{name} must be [B, M] = [{B}, {M}]{' int64' if dtype else ''}, got "
                             f"{tuple(t.shape)} {t.dtype}")
    _, _, sgb, sgn, sgk = _patch_view(grad_X, channels_first)
    cfg = _pick_bwd_x(N, M, K, X.dtype, B)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(K, cfg.block_k), B)
    _launch("min_distances_bwd_x", _min_distances_bwd_x_kernel, grid, cfg,
            (grad, X, P, values, argmin, grad_X, N, M, K, sxb, sxn, sxk, sgb, sgn, sgk, P.stride(0), P.stride(1)),
            dict(COSINE=bool(cosine), BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k))
    cfg = _pick_bwd_p(M, K, X.dtype)
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(K, cfg.block_k))
    _launch("min_distances_bwd_p", _min_distances_bwd_p_kernel, grid, cfg,
            (grad, X, P, values, argmin, grad_P, B, M, K, sxb, sxn, sxk, P.stride(0), P.stride(1),
             grad_P.stride(0), grad_P.stride(1)),
            dict(COSINE=bool(cosine), BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k))
    return grad_X, grad_P


def distance_maps(X: Tensor, P: Tensor, cosine: bool) -> Tensor:
    """Full maps d [B, M, N] (float32, contiguous) for X [B, N, K] (any strides) and P [M, K]."""
    _check_inputs(X, P)
    N, K, sxb, sxn, sxk = _patch_view(X, channels_first=False)
    B, M = X.shape[0], P.shape[0]
    if K != P.shape[1]:
        raise ValueError(f"X has {K} channels per patch but P has {P.shape[1]}")
    out = torch.empty(B, M, N, dtype=torch.float32, device=X.device)
    if out.numel() == 0:
        return out
    cfg = _pick_maps(N, M, K, X.dtype)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), B)
    _launch("distance_maps", _distance_maps_kernel, grid, cfg,
            (X, P, out, N, M, K, sxb, sxn, sxk, P.stride(0), P.stride(1)),
            dict(COSINE=bool(cosine), DOT_PRECISION=_dot_precision(X.dtype),
                 BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k))
    return out


# --------------------------------------------------------------------------------------------- enumeration


@dataclass(frozen=True)
class KernelVariant:
    """One compilation the launchers can request on a GPU: ``fn`` with ``signature`` (Triton type strings,
    ``"constexpr"`` for compile-time arguments) and ``constexprs``, launched with ``config``'s warps/stages."""

    kernel: str
    fn: object
    config: Config
    dtype: torch.dtype
    signature: dict
    constexprs: dict

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items() if not k.startswith("BLOCK_"))
        return f"{self.kernel}[{self.config.name}] {str(self.dtype).replace('torch.', '')} {flags}"


_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def triton_signature(fn, pointers: dict, dtype: torch.dtype = torch.float32, scalars: dict | None = None) -> dict:
    """Triton signature of ``fn`` for the AOT gate (shared by every kernel family): ``pointers`` maps pointer
    arguments to "input" (the inputs' ``dtype``), "f32", "i64", or a literal Triton pointer type ("*i8");
    ``scalars`` maps scalar arguments to a Triton type ("fp32"); constexpr arguments are "constexpr" and every
    other argument is i32 (sizes and strides below 2³¹, as the runtime specialises them)."""
    elem = {"input": _TRITON_DTYPES[dtype], "f32": "fp32", "i64": "i64"}
    scalars = scalars or {}
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            kind = pointers[name]
            sig[name] = kind if kind.startswith("*") else "*" + elem[kind]
        else:
            sig[name] = scalars.get(name, "i32")
    return sig


def kernel_variants() -> Iterator[KernelVariant]:
    """Every (kernel, config, dtype, constexpr combination) the launchers can select on a GPU (the interpreter's
    ``INTERPRETER_CONFIG`` is CPU-only and not listed). Forward and maps: fp32 comes in "ieee" and "tf32"
    (``allow_tf32``), half dtypes only with "ieee" (their dot is native); backward dots are always exact fp32."""
    for dtype in SUPPORTED_DTYPES:
        cls = _dtype_class(dtype)
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for cosine in (False, True):
            for precision in precisions:
                for kernel, fn, configs, out in (("min_distances_fwd", _min_distances_fwd_kernel, FWD_CONFIGS[cls],
                                                  {"VALUES": "f32", "ARGMIN": "i64"}),
                                                 ("distance_maps", _distance_maps_kernel, MAPS_CONFIGS[cls],
                                                  {"OUT": "f32"})):
                    for cfg in configs:
                        yield KernelVariant(kernel, fn, cfg, dtype,
                                            triton_signature(fn, {"X": "input", "P": "input", **out}, dtype),
                                            dict(COSINE=cosine, DOT_PRECISION=precision, BLOCK_N=cfg.block_n,
                                                 BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k))
            backward_pointers = {"GRAD": "f32", "X": "input", "P": "input", "VALUES": "f32", "ARGMIN": "i64"}
            for cfg in BWD_X_CONFIGS[cls]:
                fn = _min_distances_bwd_x_kernel
                yield KernelVariant("min_distances_bwd_x", fn, cfg, dtype,
                                    triton_signature(fn, {**backward_pointers, "GRAD_X": "input"}, dtype),
                                    dict(COSINE=cosine, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
                                         BLOCK_K=cfg.block_k))
            for cfg in BWD_P_CONFIGS[cls]:
                fn = _min_distances_bwd_p_kernel
                yield KernelVariant("min_distances_bwd_p", fn, cfg, dtype,
                                    triton_signature(fn, {**backward_pointers, "GRAD_P": "input"}, dtype),
                                    dict(COSINE=cosine, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k))

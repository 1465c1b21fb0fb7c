"""Triton kernels for PIP-Net presence scores and the align loss (CUDA path of ``protofast::pipnet_forward`` /
``protofast::pipnet_backward``). Same contract as ``csrc/pipnet.cpp`` (SEMANTICS.md §2.2–§2.4).

a [S, D, N] pre-softmax features (an NCHW map viewed as [S, D, H·W], contiguous), float32 / float16 / bfloat16,
computed in float32; with align, S = 2B and sample b pairs with sample B + b.

    lse[s, n]    = log Σ_d exp a[s, d, n]                        (online max / sum over channel blocks)
    z[s, d, n]   = exp(a[s, d, n] − lse[s, n])                    (recomputed, never stored)
    dot[b, n]    = Σ_d z[b, d, n]·z[B + b, d, n]
    pooled[s, d] = max_n z[s, d, n], argmax first occurrence, NaN replaces (the last NaN wins, like max-pool)
    backward (c = −g_A/(2·B·N), w = c/(dot + 1e-12), sp[s, n] = Σ_{d: argmax[s, d] = n} pooled[s, d]·g[s, d]):
      grad[s, d, n] = z·(w·(z_other − dot) − sp) + [n = argmax[s, d]]·z·g[s, d]     (without align: w = 0)

Kernels (no atomics: every output element is owned by one program and every reduction runs in a fixed order,
so results are bitwise reproducible):

    _lse_kernel       grid (⌈N/BLOCK_N⌉, jobs): BLOCK_N locations of one sample (or of both views of one pair);
                      pass 1 over channel blocks: online max/sum -> lse; with ALIGN, pass 2: dot.
    _pool_kernel      grid (⌈D/BLOCK_D⌉, S): BLOCK_D channels of one sample, streams the N locations: running
                      max / argmax of z.
    _backward_kernel  grid (⌈N/BLOCK_N⌉, jobs): pass 1 gathers sp for its locations from (argmax, pooled, g)
                      (D-vectors, no feature reads); pass 2 streams the channel blocks, recomputes z (both views
                      with ALIGN) and writes grad once.

HBM traffic (fp32, S·D·N = E elements): forward 3 reads of a with ALIGN (2 without), backward 1 read + 1 write
of a (2 reads with ALIGN: both views); see docs/pipnet.md for the roofline ESTIMATE.

Configs: ``CONFIGS`` (one tile shape per kernel); under ``TRITON_INTERPRET=1`` (read at every call) the launchers
use ``INTERPRETER_CONFIG`` (16 × 16 tiles: the interpreter tests exercise several channel and location blocks on
small inputs). ``kernel_variants()`` enumerates every (kernel, config, dtype, ALIGN) a GPU launch can select;
``tests/test_triton_aot_pipnet.py`` compiles them for sm_80 and sm_90.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .prototype_distances import Config, KernelVariant, triton_signature

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS_A = 1e-12

# block_n: locations per tile, block_k: channels per tile (block_m unused). 32 × 64 fp32 tiles are 16 values per
# thread at 4 warps; the backward holds two views' tiles.
CONFIGS = {
    "lse": Config("d32n64", block_n=64, block_m=0, block_k=32, num_warps=4, num_stages=2),
    "pool": Config("d32n64", block_n=64, block_m=0, block_k=32, num_warps=4, num_stages=2),
    "backward": Config("d32n64", block_n=64, block_m=0, block_k=32, num_warps=4, num_stages=2),
}
INTERPRETER_CONFIG = Config("interpret", block_n=16, block_m=0, block_k=16, num_warps=1, num_stages=1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(kernel: str) -> Config:
    return INTERPRETER_CONFIG if interpreting() else CONFIGS[kernel]


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_lse(A, base, offs_n, mask_n, D, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """lse over the D channels of the BLOCK_N locations at A + base (online max / sum, fp32)."""
    m = tl.full([BLOCK_N], -1e30, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = (offs_d < D)[:, None] & mask_n[None, :]
        x = tl.load(A + base + offs_d[:, None] * N + offs_n[None, :], mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[None, :]), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _lse_kernel(A, LSE, DOT, B, D, N, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base1 = j.to(tl.int64) * D * N
    lse1 = _tile_lse(A, base1, offs_n, mask_n, D, N, BLOCK_D, BLOCK_N)
    tl.store(LSE + j.to(tl.int64) * N + offs_n, lse1, mask=mask_n)
    if ALIGN:
        j2 = j + B
        base2 = j2.to(tl.int64) * D * N
        lse2 = _tile_lse(A, base2, offs_n, mask_n, D, N, BLOCK_D, BLOCK_N)
        tl.store(LSE + j2.to(tl.int64) * N + offs_n, lse2, mask=mask_n)
        dot = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = (offs_d < D)[:, None] & mask_n[None, :]
            off = offs_d[:, None] * N + offs_n[None, :]
            x1 = tl.load(A + base1 + off, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(A + base2 + off, mask=mask, other=0.0).to(tl.float32)
            z1 = tl.exp(x1 - lse1[None, :])
            z2 = tl.exp(x2 - lse2[None, :])
            dot += tl.sum(tl.where(mask, z1 * z2, 0.0), axis=0)
        tl.store(DOT + j.to(tl.int64) * N + offs_n, dot, mask=mask_n)


@triton.jit
def _pool_kernel(A, LSE, POOLED, ARGMAX, D, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_d = tl.program_id(0)
    s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    base = s.to(tl.int64) * D * N
    best = tl.full([BLOCK_D], -1.0, tl.float32)
    idx = tl.zeros([BLOCK_D], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_d[:, None] & mask_n[None, :]
        x = tl.load(A + base + offs_d[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + s.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
        z = tl.exp(x - lse[None, :])
        is_nan = (z != z) & mask
        z_ok = tl.where(mask & (z == z), z, -1.0)
        tmax = tl.max(z_ok, axis=1)
        tidx = tl.min(tl.where(z_ok == tmax[:, None], offs_n[None, :], 2147483647), axis=1)
        nan_idx = tl.max(tl.where(is_nan, offs_n[None, :], -1), axis=1)
        upd = (tmax > best) & (best == best)              # strict: the first occurrence stays
        best = tl.where(upd, tmax, best)
        idx = tl.where(upd, tidx, idx)
        has_nan = nan_idx >= 0                            # a NaN replaces the running max (the last NaN wins)
        best = tl.where(has_nan, float("nan"), best)
        idx = tl.where(has_nan, nan_idx, idx)
    out = s.to(tl.int64) * D + offs_d
    tl.store(POOLED + out, best, mask=mask_d)
    tl.store(ARGMAX + out, idx.to(tl.int64), mask=mask_d)


@triton.jit
def _pooled_sums(G, POOLED, ARGMAX, row, offs_n, D, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """sp[n] = Σ_{d: argmax[row, d] = n} pooled[row, d]·g[row, d] for the BLOCK_N locations offs_n."""
    sp = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        off = row.to(tl.int64) * D + offs_d
        g = tl.load(G + off, mask=mask_d, other=0.0)
        p = tl.load(POOLED + off, mask=mask_d, other=0.0)
        arg = tl.load(ARGMAX + off, mask=mask_d, other=-1)
        hit = (arg[:, None] == offs_n[None, :]) & mask_d[:, None]
        sp += tl.sum(tl.where(hit, (p * g)[:, None], 0.0), axis=0)
    return sp


@triton.jit
def _backward_kernel(G, GA, A, LSE, POOLED, ARGMAX, DOT, GRAD, B, D, N, scale, ALIGN: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    base1 = j.to(tl.int64) * D * N
    lse1 = tl.load(LSE + j.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
    sp1 = _pooled_sums(G, POOLED, ARGMAX, j, offs_n, D, BLOCK_D, BLOCK_N)
    if ALIGN:
        j2 = j + B
        base2 = j2.to(tl.int64) * D * N
        lse2 = tl.load(LSE + j2.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
        sp2 = _pooled_sums(G, POOLED, ARGMAX, j2, offs_n, D, BLOCK_D, BLOCK_N)
        dot = tl.load(DOT + j.to(tl.int64) * N + offs_n, mask=mask_n, other=1.0)
        c = -tl.load(GA) * scale                          # −g_A / (2·B·N), read on device (no host sync)
        w = c / (dot + 1e-12)
        wd = w * dot
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = mask_d[:, None] & mask_n[None, :]
        off = offs_d[:, None] * N + offs_n[None, :]
        x1 = tl.load(A + base1 + off, mask=mask, other=0.0).to(tl.float32)
        z1 = tl.exp(x1 - lse1[None, :])
        g1 = tl.load(G + j.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
        a1 = tl.load(ARGMAX + j.to(tl.int64) * D + offs_d, mask=mask_d, other=-1)
        pool1 = tl.where(a1[:, None] == offs_n[None, :], g1[:, None], 0.0)
        if ALIGN:
            x2 = tl.load(A + base2 + off, mask=mask, other=0.0).to(tl.float32)
            z2 = tl.exp(x2 - lse2[None, :])
            g2 = tl.load(G + j2.to(tl.int64) * D + offs_d, mask=mask_d, other=0.0)
            a2 = tl.load(ARGMAX + j2.to(tl.int64) * D + offs_d, mask=mask_d, other=-1)
            pool2 = tl.where(a2[:, None] == offs_n[None, :], g2[:, None], 0.0)
            grad1 = z1 * (w[None, :] * z2 - wd[None, :] - sp1[None, :] + pool1)
            grad2 = z2 * (w[None, :] * z1 - wd[None, :] - sp2[None, :] + pool2)
            tl.store(GRAD + base2 + off, grad2.to(GRAD.dtype.element_ty), mask=mask)
        else:
            grad1 = z1 * (pool1 - sp1[None, :])
        tl.store(GRAD + base1 + off, grad1.to(GRAD.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers
def _check(features: Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be [S, D, H, W], got shape {tuple(features.shape)}")
    if features.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton PIP-Net kernels take float32, float16 or bfloat16 features, got "
                        f"{features.dtype}")
    if features.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton launchers need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got "
                         f"{features.device}")


def _launch(fn, grid, cfg: Config, args: tuple, constexprs: dict) -> None:
    fn[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def pipnet_forward(features: Tensor, align: bool):
    """``(pooled [S, D] f32, argmax [S, D] i64, align_loss [] f32, lse [S, N] f32, dot [S/2, N] f32 or [0])``."""
    _check(features)
    a = features.contiguous()
    S, D, H, W = a.shape
    N = H * W
    B = S // 2
    if align and S % 2:
        raise ValueError("align needs an even batch [2B]")
    dev = a.device
    pooled = torch.empty(S, D, dtype=torch.float32, device=dev)
    argmax = torch.empty(S, D, dtype=torch.int64, device=dev)
    lse = torch.empty(S, N, dtype=torch.float32, device=dev)
    dot = torch.empty(B if align else 0, N if align else 0, dtype=torch.float32, device=dev)
    if not align:
        dot = dot.reshape(0)
    cfg = _config("lse")
    jobs = B if align else S
    _launch(_lse_kernel, (triton.cdiv(N, cfg.block_n), jobs), cfg, (a, lse, dot, B, D, N),
            dict(ALIGN=bool(align), BLOCK_D=cfg.block_k, BLOCK_N=cfg.block_n))
    cfg = _config("pool")
    _launch(_pool_kernel, (triton.cdiv(D, cfg.block_k), S), cfg, (a, lse, pooled, argmax, D, N),
            dict(BLOCK_D=cfg.block_k, BLOCK_N=cfg.block_n))
    loss = -torch.log(dot + EPS_A).mean() if align else pooled.new_zeros(())
    return pooled, argmax, loss, lse, dot


def pipnet_backward(grad_pooled: Tensor, grad_align: Tensor, features: Tensor, lse: Tensor, pooled: Tensor,
                    argmax: Tensor, dot: Tensor, align: bool) -> Tensor:
    """∂L/∂features (features' dtype and shape) from g_pooled [S, D] and g_align []."""
    _check(features)
    a = features.contiguous()
    S, D, H, W = a.shape
    N = H * W
    B = S // 2
    grad = torch.empty_like(a)
    g = grad_pooled.to(torch.float32).contiguous()
    ga = grad_align.to(device=a.device, dtype=torch.float32).reshape(1)
    scale = 1.0 / (2.0 * B * N) if align else 0.0
    cfg = _config("backward")
    jobs = B if align else S
    _launch(_backward_kernel, (triton.cdiv(N, cfg.block_n), jobs), cfg,
            (g, ga, a, lse.contiguous(), pooled.contiguous(), argmax.contiguous(), dot.contiguous(), grad, B, D, N,
             scale),
            dict(ALIGN=bool(align), BLOCK_D=cfg.block_k, BLOCK_N=cfg.block_n))
    return grad


# --------------------------------------------------------------------------------------------- enumeration
def kernel_variants() -> Iterator[KernelVariant]:
    """Every (kernel, config, dtype, ALIGN) the launchers can select on a GPU (5 per dtype, 15 in all)."""
    scalars = {"scale": "fp32"}
    for dtype in SUPPORTED_DTYPES:
        cfg = CONFIGS["lse"]
        for align in (False, True):
            yield KernelVariant("pipnet_lse", _lse_kernel, cfg, dtype,
                                triton_signature(_lse_kernel, {"A": "input", "LSE": "f32", "DOT": "f32"}, dtype,
                                                 scalars),
                                dict(ALIGN=align, BLOCK_D=cfg.block_k, BLOCK_N=cfg.block_n))
        cfg = CONFIGS["pool"]
        yield KernelVariant("pipnet_pool", _pool_kernel, cfg, dtype,
                            triton_signature(_pool_kernel, {"A": "input", "LSE": "f32", "POOLED": "f32",
                                                            "ARGMAX": "i64"}, dtype, scalars),
                            dict(BLOCK_D=cfg.block_k, BLOCK_N=cfg.block_n))
        cfg = CONFIGS["backward"]
        for align in (False, True):
            yield KernelVariant("pipnet_backward", _backward_kernel, cfg, dtype,
                                triton_signature(_backward_kernel, {"G": "f32", "GA": "f32", "A": "input",
                                                                    "LSE": "f32", "POOLED": "f32", "ARGMAX": "i64",
                                                                    "DOT": "f32", "GRAD": "input"}, dtype, scalars),
                                dict(ALIGN=align, BLOCK_D=cfg.block_k, BLOCK_N=cfg.block_n))

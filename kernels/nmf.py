"""Triton kernels for ProtoNMF's batched NMF multiplicative updates (CUDA path of ``protofast.batched_nmf``).

Same contract as the C++ CPU kernels (``csrc/nmf.cpp``): A [K, n_max, D] float32 features (rows ≥ lengths[k]
are padding and never read), E [K, n_max, p], B [K, p, D], ``active`` [K] bool (stopped classes are frozen).

    _nmf_rows_kernel      grid (⌈n_max/BLOCK_R⌉, K): one program owns BLOCK_R rows of one class. Pass 1 over D
                          (BLOCK_D columns at a time): A_tile Bᵀ with ``tl.dot`` ([BLOCK_R, BLOCK_P]); then the E
                          update of its rows E ← E ⊙ (A Bᵀ) / (E · B Bᵀ) (B Bᵀ [p, p] precomputed per class, zero
                          denominators → eps; applied ``inner`` times, accelerated MU), stored in place; with UPDATE_BASIS, pass 2 over D writes the tile's
                          partial Eᵀ A ([p, D]) and Eᵀ E ([p, p]) to its own slot of PART (no atomics; slots of
                          tiles past a class's length stay the launcher's zeros).
    _nmf_residual_kernel  grid (⌈n_max/BLOCK_R⌉, K): Σ of (A − E B)² over the program's rows (float32 partial per
                          tile), the residual formed tile by tile in registers.

The launchers then finish in torch on [K, p, D]-sized tensors: tile partials summed in tile order, the B update
B ← B ⊙ (Eᵀ A) / ((Eᵀ E) B) (``inner`` times) and the errors (float64). Nothing n×D besides A is read or written; per update A is
read twice by the rows kernel (pass 2 re-reads the tile just read, normally from L2) — see docs/protonmf.md.
p is padded to BLOCK_P (16, 32 or 64: ``tl.dot`` needs at least 16) with zero rows of B and zero columns of E.

Determinism: every output element is owned by one program and every reduction runs in a fixed order.
float32 only (``tl.dot`` with input_precision="ieee", exact fp32 products); float64 runs the torch code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from .prototype_distances import KernelVariant, triton_signature


@dataclass(frozen=True)
class Config:
    name: str
    block_r: int
    block_d: int
    block_p: int
    num_warps: int
    num_stages: int


# One config per padded rank. Exact fp32 dots keep both operand slices in registers, so the reduction (D) block
# is 16; rows per tile and warps were chosen so that every variant compiles without spills on sm_80 and sm_90
# under Triton 3.9's ptxas options (tests/test_triton_aot_nmf.py; e.g. 64 rows × 32 columns at p16 spilled 104 B,
# 32 rows at p64 spilled 288–440 B).
CONFIGS = {
    16: Config("p16", block_r=64, block_d=16, block_p=16, num_warps=8, num_stages=1),
    32: Config("p32", block_r=32, block_d=16, block_p=32, num_warps=8, num_stages=1),
    64: Config("p64", block_r=16, block_d=16, block_p=64, num_warps=8, num_stages=1),
}
INTERPRETER_CONFIGS = {p: Config(f"interpret{p}", block_r=16, block_d=16, block_p=p, num_warps=1, num_stages=1)
                       for p in CONFIGS}
MAX_RANK = 64


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_config(rank: int) -> Config:
    if rank > MAX_RANK:
        raise ValueError(f"the Triton NMF kernels support rank <= {MAX_RANK}, got {rank}")
    block_p = 16 if rank <= 16 else 32 if rank <= 32 else 64
    return (INTERPRETER_CONFIGS if interpreting() else CONFIGS)[block_p]


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _nmf_rows_kernel(A, E, B, BB, LENGTHS, ACTIVE, PART, n_max, D, p, n_tiles, eps, inner,
                     UPDATE_BASIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    tile = tl.program_id(0)
    k = tl.program_id(1)
    active = tl.load(ACTIVE + k)
    n = tl.load(LENGTHS + k).to(tl.int32)
    r0 = tile * BLOCK_R
    if (active != 0) & (r0 < n):
        rows = r0 + tl.arange(0, BLOCK_R)
        cols_p = tl.arange(0, BLOCK_P)
        row_ok = rows < n
        p_ok = cols_p < p
        a_base = A + k.to(tl.int64) * n_max * D
        b_base = B + k.to(tl.int64) * p * D
        # pass 1: A_tile Bᵀ  [BLOCK_R, BLOCK_P]
        ab = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols < D
            a = tl.load(a_base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            bt = tl.load(b_base + cols_p[None, :] * D + cols[:, None], mask=p_ok[None, :] & d_ok[:, None], other=0.0)
            ab = tl.dot(a, bt, ab, input_precision="ieee")
        # E update of the tile's rows
        e_ptr = E + k.to(tl.int64) * n_max * p + rows[:, None] * p + cols_p[None, :]
        e_mask = row_ok[:, None] & p_ok[None, :]
        e = tl.load(e_ptr, mask=e_mask, other=0.0)
        bb = tl.load(BB + k.to(tl.int64) * BLOCK_P * BLOCK_P + cols_p[:, None] * BLOCK_P + cols_p[None, :])
        for _ in range(inner):  # the E rule `inner` times with A Bᵀ and B Bᵀ fixed (1: Lee–Seung)
            den = tl.dot(e, bb, input_precision="ieee")
            den = tl.where(den == 0.0, eps, den)
            e = e * ab / den
        tl.store(e_ptr, e, mask=e_mask)
        if UPDATE_BASIS:
            # pass 2: the tile's partial Eᵀ A [BLOCK_P, D] and Eᵀ E [BLOCK_P, BLOCK_P]
            part = PART + (k.to(tl.int64) * n_tiles + tile) * (p * D + p * p)
            et = tl.trans(e)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                d_ok = cols < D
                a = tl.load(a_base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)
                ea = tl.dot(et, a, input_precision="ieee")
                tl.store(part + cols_p[:, None] * D + cols[None, :], ea, mask=p_ok[:, None] & d_ok[None, :])
            ee = tl.dot(et, e, input_precision="ieee")
            tl.store(part + p * D + cols_p[:, None] * p + cols_p[None, :], ee, mask=p_ok[:, None] & p_ok[None, :])


@triton.jit
def _nmf_residual_kernel(A, E, B, LENGTHS, ACTIVE, OUT, n_max, D, p, n_tiles,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    tile = tl.program_id(0)
    k = tl.program_id(1)
    active = tl.load(ACTIVE + k)
    n = tl.load(LENGTHS + k).to(tl.int32)
    r0 = tile * BLOCK_R
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if (active != 0) & (r0 < n):
        rows = r0 + tl.arange(0, BLOCK_R)
        cols_p = tl.arange(0, BLOCK_P)
        row_ok = rows < n
        p_ok = cols_p < p
        e = tl.load(E + k.to(tl.int64) * n_max * p + rows[:, None] * p + cols_p[None, :],
                    mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        a_base = A + k.to(tl.int64) * n_max * D
        b_base = B + k.to(tl.int64) * p * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            d_ok = cols < D
            a = tl.load(a_base + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(b_base + cols_p[:, None] * D + cols[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
            r = a - tl.dot(e, b, input_precision="ieee")
            total += tl.sum(r * r, axis=1)
    tl.store(OUT + k.to(tl.int64) * n_tiles + tile, tl.sum(total, axis=0))


# --------------------------------------------------------------------------------------------- launchers
def _check(A: Tensor, E: Tensor, B: Tensor) -> None:
    if A.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton launchers need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got "
                         f"{A.device}")
    if A.dtype != torch.float32 or E.dtype != torch.float32 or B.dtype != torch.float32:
        raise TypeError(f"the Triton NMF kernels take float32 A, E, B, got {A.dtype}, {E.dtype}, {B.dtype}")
    for name, t in (("A", A), ("E", E), ("B", B)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def _guard(den: Tensor, eps: float) -> Tensor:
    return torch.where(den == 0, torch.full_like(den, eps), den)


def nmf_step(A: Tensor, lengths: Tensor, E: Tensor, B: Tensor, active: Tensor, eps: float, update_basis: bool,
             gram: bool = False, a_sq: Tensor | None = None, inner: int = 1) -> Tensor | None:
    """One multiplicative update of the active classes, E and B in place (``csrc/nmf.cpp`` ``nmf_step``). With
    ``gram``, returns ‖A‖² − 2⟨Eᵀ A, B⟩ + ⟨Eᵀ E, B Bᵀ⟩ of the new factors (float64 [K], ``a_sq`` = ‖A‖²)."""
    _check(A, E, B)
    K, n_max, D = A.shape
    p = B.shape[1]
    cfg = pick_config(p)
    P = cfg.block_p
    n_tiles = max(1, triton.cdiv(n_max, cfg.block_r))
    BB = torch.zeros(K, P, P, dtype=torch.float32, device=A.device)
    BB[:, :p, :p] = torch.bmm(B, B.transpose(1, 2))
    accumulate = update_basis or gram
    part = torch.zeros(K, n_tiles, p * D + p * p, dtype=torch.float32, device=A.device) if accumulate else \
        torch.empty(1, dtype=torch.float32, device=A.device)
    lengths = lengths.to(A.device, torch.int64).contiguous()
    act = active.to(A.device, torch.int8).contiguous()
    _nmf_rows_kernel[(n_tiles, K)](A, E, B, BB, lengths, act, part, n_max, D, p, n_tiles, float(eps), int(inner),
                                   UPDATE_BASIS=accumulate, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, BLOCK_P=P,
                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if not accumulate:
        return None
    total = part.sum(1)                                      # tile partials in a fixed order
    EA = total[:, : p * D].view(K, p, D)
    EE = total[:, p * D:].view(K, p, p)
    sel = active.to(A.device)
    if update_basis:
        new_B = B
        for _ in range(inner):  # the B rule `inner` times with Eᵀ A and Eᵀ E fixed
            new_B = new_B * EA / _guard(torch.bmm(EE, new_B), eps)
        B.copy_(torch.where(sel[:, None, None], new_B, B))
    if not gram:
        return None
    Bd = B.double()
    sq = a_sq - 2 * (EA.double() * Bd).sum((1, 2)) + (EE.double() * torch.bmm(Bd, Bd.transpose(1, 2))).sum((1, 2))
    return sq.clamp(min=0)


def nmf_residual(A: Tensor, lengths: Tensor, E: Tensor, B: Tensor, active: Tensor) -> Tensor:
    """‖A_k − E_k B_k‖²_F per active class (float64 [K]; 0 for the others), summed over tiles in order."""
    _check(A, E, B)
    K, n_max, D = A.shape
    p = B.shape[1]
    cfg = pick_config(p)
    n_tiles = max(1, triton.cdiv(n_max, cfg.block_r))
    out = torch.empty(K, n_tiles, dtype=torch.float32, device=A.device)
    _nmf_residual_kernel[(n_tiles, K)](A, E, B, lengths.to(A.device, torch.int64).contiguous(),
                                       active.to(A.device, torch.int8).contiguous(), out, n_max, D, p, n_tiles,
                                       BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, BLOCK_P=cfg.block_p,
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.double().sum(1)


# --------------------------------------------------------------------------------------------- AOT variants
def kernel_variants() -> Iterator[KernelVariant]:
    """Every (kernel, config, constexprs) the launchers can select on a GPU: 3 padded ranks × (rows kernel with
    and without the Eᵀ A accumulation, residual kernel)."""
    rows_ptrs = {"A": "*fp32", "E": "*fp32", "B": "*fp32", "BB": "*fp32", "LENGTHS": "*i64", "ACTIVE": "*i8",
                 "PART": "*fp32"}
    res_ptrs = {"A": "*fp32", "E": "*fp32", "B": "*fp32", "LENGTHS": "*i64", "ACTIVE": "*i8", "OUT": "*fp32"}
    for cfg in CONFIGS.values():
        blocks = dict(BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, BLOCK_P=cfg.block_p)
        for update in (True, False):
            yield KernelVariant("nmf_rows", _nmf_rows_kernel, cfg, torch.float32,
                                triton_signature(_nmf_rows_kernel, rows_ptrs, scalars={"eps": "fp32"}),
                                dict(UPDATE_BASIS=update, **blocks))
        yield KernelVariant("nmf_residual", _nmf_residual_kernel, cfg, torch.float32,
                            triton_signature(_nmf_residual_kernel, res_ptrs, scalars={"eps": "fp32"}),
                            dict(blocks))

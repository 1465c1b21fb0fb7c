"""Per-class NMF by Lee–Seung multiplicative updates, exactly as ProtoNMF runs it (SEMANTICS.md §5.1).

ProtoNMF factorises, for each class c, the matrix A (n·H·W × D) of all spatial feature vectors of the class's
training images as A ≈ E B with E (n·H·W × p) ≥ 0 the encodings and B (p × D) ≥ 0 the prototypes. The paper
uses the NMF code of edocollins/DFF; this module is a plain, readable float64-capable re-statement of it:

- negative entries of A are set to 0 first (``clip_negative``);
- init (``init='abs_gaussian'``): scale = √(mean(A) / p); E = |N(0, 1)| · scale drawn first, shape (n, p),
  then B = |N(0, 1)| · scale, shape (p, D), from a private CPU generator seeded with ``seed`` (the paper seeds 0
  for every class); the draws are float32 (torch's default, as in DFF) and cast to A's dtype.
  ``init='clipped_gaussian'`` is the paper text's literal "set negative values to zero";
- each update t = 0, 1, …, max_iter − 1, in this order:
      E ← E ⊙ (A Bᵀ) / (E B Bᵀ)
      B ← B ⊙ (Eᵀ A) / (Eᵀ E B)      (with the new E)
  where denominator entries exactly equal to 0 are replaced by ``eps`` = 1e-7 (no additive epsilon);
- stopping rule (DFF): err = ‖A − E B‖_F (``stop_error='fro'``; ``'fro_squared'`` is the paper's literal
  squared error), err0 at the initialisation, prev = err0; after update t and only when t % check_every == 0:
  stop if (prev − err) / err0 < tol (an increase also stops), else prev = err. ``tol = 0`` disables the checks
  (as in DFF). A class whose err0 is 0 (all of A is 0) has nothing to fit: it stops at the first check
  (DFF's 0/0 would be NaN and run to max_iter doing nothing; the factors are the same zeros either way).
- ``fixed_basis`` (encode new data against given prototypes, ``nmf_encode``): B is not drawn and not updated,
  only E is (A Bᵀ and B Bᵀ are then constants).
- ``inner_updates`` = m > 1 (not in DFF; accelerated MU of Gillis & Glineur, Neural Computation 2012): within one
  update, the E rule is applied m times with A Bᵀ and B Bᵀ computed once, then the B rule m times with Eᵀ A and
  Eᵀ E computed once. Each inner step is the Lee–Seung step for that factor (the error never increases), and the
  extra steps cost O((n + D) p²) against the O(n D p) of the products with A, so an update makes more progress for
  almost the same time. m = 1 (the default) is DFF's update.

Returns (E, B, err, n_iter): the factors, the final error (in the ``stop_error`` measure) and the number of
updates performed.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

INITS = ("abs_gaussian", "clipped_gaussian")
STOP_ERRORS = ("fro", "fro_squared")


class NMFResult(NamedTuple):
    E: Tensor        # (n, p) encodings
    B: Tensor        # (p, D) prototypes
    err: float       # final error, ‖A − E B‖_F (or its square with stop_error='fro_squared')
    n_iter: int      # number of updates performed


def init_factors(A: Tensor, rank: int, seed: int = 0, init: str = "abs_gaussian",
                 fixed_basis: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """DFF's initialisation of (E, B) for a clipped A (n, D); with ``fixed_basis`` only E is drawn."""
    n, D = A.shape
    scale = math.sqrt(float(A.double().mean()) / rank) if A.numel() else 0.0
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    E = torch.randn(n, rank, generator=g, dtype=torch.float32)
    B = fixed_basis if fixed_basis is not None else torch.randn(rank, D, generator=g, dtype=torch.float32)
    fix = torch.abs if init == "abs_gaussian" else (lambda t: t.clamp(min=0))
    E = fix(E.to(A.dtype) * scale).to(A.device)
    if fixed_basis is None:
        B = fix(B.to(A.dtype) * scale).to(A.device)
    return E, B.to(A.dtype)


def approximation_error(A: Tensor, E: Tensor, B: Tensor, stop_error: str = "fro") -> float:
    """‖A − E B‖_F (``'fro'``) or its square (``'fro_squared'``), accumulated in float64."""
    sq = float(((A - E @ B).double() ** 2).sum())
    return math.sqrt(sq) if stop_error == "fro" else sq


def _guard(den: Tensor, eps: float) -> Tensor:
    """Denominator entries exactly equal to 0 become ``eps`` (DFF: ``WHH[WHH == 0] = EPSILON``)."""
    return torch.where(den == 0, torch.full_like(den, eps), den)


def multiplicative_update(A: Tensor, E: Tensor, B: Tensor, eps: float = 1e-7, update_basis: bool = True,
                          inner_updates: int = 1) -> tuple[Tensor, Tensor]:
    """One update: E ← E ⊙ (A Bᵀ)/(E B Bᵀ), then (with the new E) B ← B ⊙ (Eᵀ A)/(Eᵀ E B); with
    ``inner_updates`` = m each rule m times, its products with A (and the Gram matrix of the other factor) fixed."""
    AB, BB = A @ B.t(), B @ B.t()
    for _ in range(inner_updates):
        E = E * AB / _guard(E @ BB, eps)
    if update_basis:
        EA, EE = E.t() @ A, E.t() @ E
        for _ in range(inner_updates):
            B = B * EA / _guard(EE @ B, eps)
    return E, B


def nmf(A: Tensor, rank: int, max_iter: int = 200, tol: float = 1e-4, check_every: int = 10, eps: float = 1e-7,
        clip_negative: bool = True, seed: int = 0, init: str = "abs_gaussian", stop_error: str = "fro",
        fixed_basis: Optional[Tensor] = None, E0: Optional[Tensor] = None,
        B0: Optional[Tensor] = None, inner_updates: int = 1) -> NMFResult:
    """NMF of one class's feature matrix A (n, D) ≈ E (n, p) B (p, D) (module docstring for the rules).

    ``E0``/``B0`` replace the random initialisation (tests start the reference and an op from the same factors).
    """
    if clip_negative:
        A = A.clamp(min=0)
    update_basis = fixed_basis is None
    if E0 is None or (B0 is None and update_basis):
        E_init, B_init = init_factors(A, rank, seed, init, fixed_basis)
        E0 = E_init if E0 is None else E0
        B0 = B_init if B0 is None else B0
    E = E0.to(A.dtype).clone()
    B = (fixed_basis if fixed_basis is not None else B0).to(A.dtype).clone()

    err0 = approximation_error(A, E, B, stop_error)
    prev = err0
    err = err0
    n_iter = 0
    for t in range(max_iter):
        E, B = multiplicative_update(A, E, B, eps, update_basis, inner_updates)
        n_iter = t + 1
        if tol > 0 and t % check_every == 0:
            err = approximation_error(A, E, B, stop_error)
            if err0 == 0 or (prev - err) / err0 < tol:
                break
            prev = err
    else:
        if n_iter > 0:
            err = approximation_error(A, E, B, stop_error)
    return NMFResult(E, B, err, n_iter)

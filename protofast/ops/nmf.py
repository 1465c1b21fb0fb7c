"""Batched NMF by multiplicative updates over a ragged set of classes (ProtoNMF, SEMANTICS.md §5.1).

For every class k, A_k (n_k × D, clipped at 0) ≈ E_k (n_k × p) B_k (p × D). All classes advance together:

    E ← E ⊙ (A Bᵀ) / (E B Bᵀ),   then   B ← B ⊙ (Eᵀ A) / (Eᵀ E B)

(denominator entries exactly 0 replaced by ``eps``), with DFF's stopping rule per class (err = ‖A − E B‖_F,
relative change against err0, checked after updates t with t % check_every == 0) and a per-class done mask: a
class that stopped is frozen. The ragged classes live in a padded tensor A [K, n_max, D] with ``lengths``;
padded rows are 0 in A and initialised to 0 in E, so they stay 0 under the updates and add nothing to Eᵀ A,
Eᵀ E or the errors. ``protofast.reference.nmf`` is the per-class oracle; the initialisation is its
``init_factors`` per class, so both start from the same factors.

Backends (``protofast._backend``): CPU tensors run the fused C++ kernel (``csrc/nmf.cpp``: one streaming pass
over A per update, nothing n×D written) when it is built; CUDA float32 tensors the Triton kernels
(``kernels/nmf.py``, also under ``TRITON_INTERPRET=1`` with PROTOFAST_BACKEND=triton); else the torch code below (one ``bmm`` per product over
the padded batch). The error is computed from the streamed residual (``error_mode='stream'``, a pass over A at
each check) or from the Gram form ‖A‖² − 2⟨Eᵀ A, B⟩ + ⟨Eᵀ E, B Bᵀ⟩ in float64 (``error_mode='gram'``: no
extra pass, but cancellation near convergence).

Public functions: ``batched_nmf``, ``nmf`` (one matrix), ``nmf_encode`` (encode against fixed prototypes).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .._backend import backend_for
from ..reference.nmf import INITS, STOP_ERRORS, NMFResult, init_factors

ERROR_MODES = ("stream", "gram")
_DTYPES = (torch.float32, torch.float64)
_CHUNK_ELEMENTS = 1 << 22  # entries of the residual tile of the torch fallback
_RUN_CLASSES_PER_THREAD = 2  # from K >= 2 × threads, the C++ kernel runs classes in parallel, else row tiles
_CPP_MAX_RANK = 64         # kMaxRank of csrc/nmf.cpp; larger ranks run the torch code


class BatchedNMFResult(NamedTuple):
    """Result of ``batched_nmf``.

    E:       [K, n_max, p] encodings, padded (rows ≥ lengths[k] are 0); ``encodings()`` gives the ragged list
    B:       [K, p, D] prototypes
    n_iter:  [K] int64 updates performed per class
    err:     [K] float64 final error per class (‖A − E B‖_F, or squared with stop_error='fro_squared')
    lengths: [K] int64 rows per class
    """
    E: Tensor
    B: Tensor
    n_iter: Tensor
    err: Tensor
    lengths: Tensor

    def encodings(self) -> List[Tensor]:
        return [self.E[k, : int(n)] for k, n in enumerate(self.lengths.tolist())]


# ------------------------------------------------------------------------------------------ validation
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _pad(features, lengths) -> tuple[Tensor, Tensor]:
    """(A [K, n_max, D] with padded rows 0, lengths [K] int64 on CPU) from a list or a padded tensor."""
    if isinstance(features, torch.Tensor):
        if features.dim() != 3:
            raise ValueError(f"features must be a padded [K, n_max, D] tensor or a list of [n_k, D] matrices, got a "
                             f"{features.dim()}-d tensor of shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
        K, n_max, D = features.shape
        if K == 0:
            raise ValueError("features must hold at least one class (K >= 1), got K=0")
        if lengths is None:
            lengths = torch.full((K,), n_max, dtype=torch.long)
        else:
            if isinstance(lengths, torch.Tensor):
                if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
                    raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
                lengths = lengths.detach().to("cpu", torch.long).reshape(-1) if lengths.dim() <= 1 else lengths
            else:
                try:
                    lengths = torch.as_tensor(list(lengths), dtype=torch.long)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise TypeError(f"lengths must be a sequence of ints or an integer tensor ({exc})") from exc
            if lengths.dim() != 1 or lengths.shape[0] != K:
                raise ValueError(f"lengths must be [K] = [{K}], got shape {tuple(lengths.shape)}")
            if K and (int(lengths.min()) < 0 or int(lengths.max()) > n_max):
                raise ValueError(f"lengths must be in [0, n_max={n_max}], got {lengths.tolist()}")
        A = features
        if bool((lengths < n_max).any()):
            rows = torch.arange(n_max, device=A.device)
            pad = rows[None, :] >= lengths.to(A.device)[:, None]
            if bool((A.masked_select(pad[:, :, None]) != 0).any()):
                A = A.masked_fill(pad[:, :, None], 0)  # padded rows must be 0 (never read them otherwise)
        return A, lengths
    if lengths is not None:
        raise ValueError("lengths is only for a padded [K, n_max, D] features tensor; a list carries its lengths")
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"features must be a list of [n_k, D] tensors or a padded [K, n_max, D] tensor, got "
                        f"{type(features).__name__}")
    if len(features) == 0:
        raise ValueError("features must hold at least one class (K >= 1), got an empty list")
    for k, a in enumerate(features):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"features[{k}] must be a torch.Tensor, got {type(a).__name__}")
        if a.dim() != 2:
            raise ValueError(f"features[{k}] must be [n_k, D], got shape {tuple(a.shape)}")
        if not a.is_floating_point():
            raise TypeError(f"features[{k}] must be a floating-point tensor, got dtype {a.dtype}")
        if a.dtype != features[0].dtype:
            raise TypeError(f"features[{k}] has dtype {a.dtype} but features[0] has {features[0].dtype}")
        if a.device != features[0].device:
            raise ValueError(f"features[{k}] is on {a.device} but features[0] is on {features[0].device}")
        if a.shape[1] != features[0].shape[1]:
            raise ValueError(f"features[{k}] has D={a.shape[1]} but features[0] has D={features[0].shape[1]}")
    lengths = torch.tensor([a.shape[0] for a in features], dtype=torch.long)
    K, n_max, D = len(features), int(lengths.max()), features[0].shape[1]
    A = features[0].new_zeros(K, n_max, D)
    for k, a in enumerate(features):
        A[k, : a.shape[0]] = a
    return A, lengths


def _prepare(features, lengths, rank, fixed_basis, clip_negative):
    A, lengths = _pad(features, lengths)
    if A.dtype not in _DTYPES:
        raise TypeError(f"features must be float32 or float64, got dtype {A.dtype}")
    K, n_max, D = A.shape
    if D == 0:
        raise ValueError("features must have at least one column (D >= 1), got D=0")
    # one pass over A for both checks (min and max are NaN if any entry is NaN); far cheaper than isfinite(A)
    lo, hi = (float(v) for v in torch.aminmax(A)) if A.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("features contain NaN or Inf")
    if lo < 0:
        if not clip_negative:
            raise ValueError("features have negative entries and clip_negative=False: multiplicative updates need "
                             "A >= 0")
        A = A.clamp(min=0)
    if fixed_basis is not None:
        if not isinstance(fixed_basis, torch.Tensor):
            raise TypeError(f"fixed_basis must be a torch.Tensor, got {type(fixed_basis).__name__}")
        if fixed_basis.dtype != A.dtype:
            raise TypeError(f"fixed_basis must have the features' dtype {A.dtype}, got {fixed_basis.dtype}")
        if fixed_basis.device != A.device:
            raise ValueError(f"fixed_basis must be on the features' device {A.device}, got {fixed_basis.device}")
        if fixed_basis.dim() == 2:
            fixed_basis = fixed_basis.expand(K, *fixed_basis.shape)
        if fixed_basis.dim() != 3 or tuple(fixed_basis.shape) != (K, rank, D):
            raise ValueError(f"fixed_basis must be [rank, D] = [{rank}, {D}] or [K, rank, D] = [{K}, {rank}, {D}], got "
                             f"shape {tuple(fixed_basis.shape)}")
        if not bool(torch.isfinite(fixed_basis).all()):
            raise ValueError("fixed_basis contains NaN or Inf")
        if bool((fixed_basis < 0).any()):
            raise ValueError("fixed_basis must be non-negative (NMF prototypes)")
        fixed_basis = fixed_basis.contiguous()
    return A.contiguous(), lengths, fixed_basis


def _seeds(seed, K: int) -> List[int]:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a sequence of K ints, got bool")
    if isinstance(seed, int):
        return [seed] * K
    seeds = list(seed)
    if len(seeds) != K or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seed must be an int or a sequence of K={K} ints, got {seed!r}")
    return seeds


def initial_factors(A: Tensor, lengths: Tensor, rank: int, seed=0, init: str = "abs_gaussian",
                    fixed_basis: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Padded (E [K, n_max, p], B [K, p, D]): each class drawn as ``reference.nmf.init_factors`` draws it from its
    own unpadded rows (a private CPU generator per class; padded rows of E are 0)."""
    K, n_max, D = A.shape
    E = A.new_zeros(K, n_max, rank)
    B = A.new_empty(K, rank, D)
    for k, s in enumerate(_seeds(seed, K)):
        n = int(lengths[k])
        Ek, Bk = init_factors(A[k, :n], rank, s, init, None if fixed_basis is None else fixed_basis[k])
        E[k, :n] = Ek
        B[k] = Bk
    return E, B


# ------------------------------------------------------------------------------------------ torch backend
def _cpp_has_nmf() -> bool:
    """Whether the loaded C++ extension has the NMF kernels (``backend_for`` has already loaded it)."""
    try:
        torch.ops.protofast_cpu.nmf_step  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _guard(den: Tensor, eps: float) -> Tensor:
    return torch.where(den == 0, torch.full_like(den, eps), den)


def _step_torch(A: Tensor, E: Tensor, B: Tensor, eps: float, update_basis: bool, gram: bool,
                a_sq: Tensor, inner: int = 1) -> Optional[Tensor]:
    """One multiplicative update of all classes of (A, E, B) in place (each rule ``inner`` times); the Gram-form
    error (float64 [K]) if asked."""
    Bt = B.transpose(1, 2)
    AB, BB = torch.bmm(A, Bt), torch.bmm(B, Bt)
    for _ in range(inner):
        den = _guard(torch.bmm(E, BB), eps)   # E B Bᵀ with the old E (before the in-place update)
        E.mul_(AB).div_(den)
    if not update_basis:
        return _gram_error(a_sq, torch.bmm(E.transpose(1, 2), A), torch.bmm(E.transpose(1, 2), E), B) if gram else None
    Et = E.transpose(1, 2)
    EA = torch.bmm(Et, A)
    EE = torch.bmm(Et, E)
    for _ in range(inner):
        den = _guard(torch.bmm(EE, B), eps)
        B.mul_(EA).div_(den)
    return _gram_error(a_sq, EA, EE, B) if gram else None


def _gram_error(a_sq: Tensor, EA: Tensor, EE: Tensor, B: Tensor) -> Tensor:
    """‖A‖² − 2⟨Eᵀ A, B⟩ + ⟨Eᵀ E, B Bᵀ⟩ per class in float64, clamped at 0."""
    B = B.double()
    BB = torch.bmm(B, B.transpose(1, 2))
    sq = a_sq - 2 * (EA.double() * B).sum((1, 2)) + (EE.double() * BB).sum((1, 2))
    return sq.clamp(min=0)


def _residual_torch(A: Tensor, E: Tensor, B: Tensor) -> Tensor:
    """‖A − E B‖²_F per class (float64 [K]) in row tiles of bounded size."""
    K, n, D = A.shape
    out = torch.zeros(K, dtype=torch.float64, device=A.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, K * D))
    for r0 in range(0, n, rows):
        R = A[:, r0:r0 + rows] - torch.bmm(E[:, r0:r0 + rows], B)
        out += (R.double() ** 2).sum((1, 2))
    return out


# ------------------------------------------------------------------------------------------ public
def batched_nmf(features: Union[Tensor, Sequence[Tensor]], rank: int, max_iter: int = 200, tol: float = 1e-4,
                check_every: int = 10, eps: float = 1e-7, clip_negative: bool = True, seed=0,
                fixed_basis: Optional[Tensor] = None, stop_error: str = "fro", init: str = "abs_gaussian",
                error_mode: str = "stream", lengths=None, E0: Optional[Tensor] = None,
                B0: Optional[Tensor] = None, inner_updates: int = 1) -> BatchedNMFResult:
    """NMF of every class at once: A_k ≈ E_k B_k, A_k = features of class k (SEMANTICS.md §5.1).

    Args:
        features: a list of K matrices [n_k, D] (ragged), or a padded tensor [K, n_max, D] with ``lengths``.
        rank: p, the number of prototypes per class.
        max_iter, tol, check_every: at most ``max_iter`` updates; after update t with t % check_every == 0 a class
            stops when (prev − err)/err0 < tol (DFF's rule; ``tol=0`` never stops early).
        eps: replaces denominator entries exactly equal to 0.
        clip_negative: set negative features to 0 first (ViT/CoC features); False raises on negative input.
        seed: an int (every class seeded the same, as the paper) or K ints; the draws come from a private CPU
            generator, never the global RNG.
        fixed_basis: [p, D] or [K, p, D] non-negative prototypes to encode against (B fixed, only E updated).
        stop_error: ``'fro'`` (‖A − E B‖_F, DFF) or ``'fro_squared'`` (the paper's literal squared error).
        init: ``'abs_gaussian'`` (DFF) or ``'clipped_gaussian'`` (the paper's text).
        error_mode: ``'stream'`` (residual in tiles) or ``'gram'`` (float64 Gram form, no extra pass over A).
        lengths: [K] rows per class of a padded ``features`` tensor (default: all n_max).
        E0, B0: padded initial factors [K, n_max, p], [K, p, D] instead of the random init (tests).
        inner_updates: m ≥ 1. Each update applies the E rule m times with A Bᵀ and B Bᵀ fixed, then the B rule
            m times with Eᵀ A and Eᵀ E fixed (accelerated MU, Gillis & Glineur 2012; still one pass over A per
            update). 1 (default) is DFF's plain Lee–Seung update; larger m reaches a given error in fewer updates
            (docs/protonmf.md: m = 10 reaches the error of 200 plain updates in about 30).

    Returns:
        ``BatchedNMFResult(E [K, n_max, p], B [K, p, D], n_iter [K], err [K], lengths [K])``.
    """
    rank = _check_int("rank", rank, 1)
    max_iter = _check_int("max_iter", max_iter, 0)
    check_every = _check_int("check_every", check_every, 1)
    inner_updates = _check_int("inner_updates", inner_updates, 1)
    tol = _check_float("tol", tol, positive=False)
    eps = _check_float("eps", eps, positive=True)
    _check_choice("stop_error", stop_error, STOP_ERRORS)
    _check_choice("init", init, INITS)
    _check_choice("error_mode", error_mode, ERROR_MODES)
    A, lengths, fixed_basis = _prepare(features, lengths, rank, fixed_basis, clip_negative)
    K, n_max, D = A.shape
    update_basis = fixed_basis is None

    if E0 is None or (B0 is None and update_basis):
        E_init, B_init = initial_factors(A, lengths, rank, seed, init, fixed_basis)
        E0 = E_init if E0 is None else E0
        B0 = B_init if B0 is None else B0
    for name, t, shape in (("E0", E0, (K, n_max, rank)), ("B0", B0 if update_basis else None, (K, rank, D))):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t is not None and not bool(((t >= 0) & torch.isfinite(t)).all()):
            raise ValueError(f"{name} must be finite and non-negative (multiplicative updates keep signs)")
    E = E0.to(A.device, A.dtype).clone().contiguous()
    B = (B0 if update_basis else fixed_basis).to(A.device, A.dtype).clone().contiguous()
    pad = torch.arange(n_max)[None, :] >= lengths[:, None]
    if bool(pad.any()):
        E.masked_fill_(pad.to(A.device)[:, :, None], 0)

    backend = backend_for(A.device)
    use_cpp = backend == "cpp" and _cpp_has_nmf() and rank <= _CPP_MAX_RANK
    triton_kernels = None
    if backend == "triton" and A.dtype == torch.float32 and rank <= _CPP_MAX_RANK:
        from ..kernels import nmf as triton_kernels  # CUDA (or the interpreter): the fused Triton kernels
    if use_cpp and K >= _RUN_CLASSES_PER_THREAD * torch.get_num_threads():
        # enough classes for every thread: each class runs its whole loop on one thread (csrc/nmf.cpp nmf_run;
        # bitwise the same as the update-by-update loop below, without a synchronisation per update)
        n_iter, err = torch.ops.protofast_cpu.nmf_run(A, lengths.contiguous(), E, B, max_iter, tol, check_every, eps,
                                                      update_basis, stop_error == "fro_squared",
                                                      error_mode == "gram", inner_updates)
        return BatchedNMFResult(E, B, n_iter, err, lengths)
    n_iter = torch.zeros(K, dtype=torch.long)
    err = torch.zeros(K, dtype=torch.float64)
    # Classes are independent, so they run in blocks whose features fit in cache, each block for all its
    # updates (on the CPU; the results do not depend on the blocking, see csrc/nmf.cpp).
    per_class = max(1, n_max * D * A.element_size())
    block = K if A.device.type != "cpu" else max(1, min(K, class_block_bytes() // per_class))
    for k0 in range(0, K, block):
        k1 = min(K, k0 + block)
        n_iter[k0:k1], err[k0:k1] = _run_classes(A[k0:k1], lengths[k0:k1], E[k0:k1], B[k0:k1], max_iter, tol,
                                                 check_every, eps, update_basis, stop_error, error_mode == "gram",
                                                 use_cpp, triton_kernels, inner_updates)
    return BatchedNMFResult(E, B, n_iter, err, lengths)


def class_block_bytes() -> int:
    """Bytes of features per block of classes run together on the CPU (``$PROTOFAST_NMF_BLOCK_BYTES``, default
    16 MB: about half of this machine's L3)."""
    import os

    try:
        return int(float(os.environ.get("PROTOFAST_NMF_BLOCK_BYTES", 16e6)))
    except ValueError as exc:
        raise ValueError(f"PROTOFAST_NMF_BLOCK_BYTES must be a number of bytes, got "
                         f"{os.environ['PROTOFAST_NMF_BLOCK_BYTES']!r}") from exc


def _run_classes(A: Tensor, lengths: Tensor, E: Tensor, B: Tensor, max_iter: int, tol: float, check_every: int,
                 eps: float, update_basis: bool, stop_error: str, gram: bool, use_cpp: bool, triton_kernels=None,
                 inner: int = 1):
    """The update loop of a block of classes (E, B updated in place): per-class done mask, DFF stopping rule.
    Returns (n_iter [K] int64, err [K] float64)."""
    K = A.shape[0]
    lengths_dev = lengths.to(A.device).contiguous()
    a_sq = None
    if gram:
        a_sq = torch.ops.protofast_cpu.nmf_sq_norms(A, lengths_dev) if use_cpp else (A.double() ** 2).sum((1, 2))

    def residual_sq(active: Tensor) -> Tensor:
        if use_cpp:
            return torch.ops.protofast_cpu.nmf_residual(A, lengths_dev, E, B, active)
        if triton_kernels is not None:
            return triton_kernels.nmf_residual(A, lengths_dev, E, B, active).cpu()
        return _residual_torch(A, E, B)

    def to_err(sq: Tensor) -> Tensor:
        # math.sqrt is correctly rounded like the C++ kernel's std::sqrt (torch's vectorised sqrt can differ in
        # the last bit), so every path reports bitwise the same error
        if stop_error != "fro":
            return sq
        return torch.tensor([math.sqrt(x) for x in sq.tolist()], dtype=torch.float64)

    all_active = torch.ones(K, dtype=torch.bool)
    err0 = to_err(residual_sq(all_active)).cpu()
    prev = err0.clone()
    active = all_active.clone()
    n_iter = torch.zeros(K, dtype=torch.long)
    checking = tol > 0
    no_a_sq = A.new_empty(0, dtype=torch.float64)
    gram_sq = None
    for t in range(max_iter):
        check = checking and t % check_every == 0
        if use_cpp:
            gram_sq = torch.ops.protofast_cpu.nmf_step(A, lengths_dev, E, B, active, eps, update_basis,
                                                       gram and check, a_sq if gram else no_a_sq, inner)
        elif triton_kernels is not None:
            gram_sq = triton_kernels.nmf_step(A, lengths_dev, E, B, active, eps, update_basis, gram and check, a_sq,
                                              inner)
        elif bool(active.all()):
            gram_sq = _step_torch(A, E, B, eps, update_basis, gram and check, a_sq, inner)
        else:  # frozen classes: update the active ones only
            idx = active.nonzero().squeeze(1).to(A.device)
            Ea, Ba = E.index_select(0, idx), B.index_select(0, idx)
            sq = _step_torch(A.index_select(0, idx), Ea, Ba, eps, update_basis, gram and check,
                             a_sq.index_select(0, idx) if gram else None, inner)
            E.index_copy_(0, idx, Ea)
            B.index_copy_(0, idx, Ba)
            if sq is not None:
                gram_sq = torch.zeros(K, dtype=torch.float64, device=A.device).index_copy_(0, idx, sq)
        n_iter[active] = t + 1
        if check:
            err = to_err(gram_sq if gram else residual_sq(active)).cpu()
            stop = active & ((err0 == 0) | ((prev - err) / err0 < tol))
            prev = torch.where(active & ~stop, err, prev)
            active = active & ~stop
            if not bool(active.any()):
                break
    return n_iter, to_err(residual_sq(all_active)).cpu()


def nmf(A: Tensor, rank: int, max_iter: int = 200, tol: float = 1e-4, check_every: int = 10, eps: float = 1e-7,
        clip_negative: bool = True, seed: int = 0, fixed_basis: Optional[Tensor] = None, stop_error: str = "fro",
        init: str = "abs_gaussian", error_mode: str = "stream", inner_updates: int = 1) -> NMFResult:
    """NMF of one matrix A [n, D] ≈ E [n, p] B [p, D]; returns ``(E, B, err, n_iter)`` like the paper's call
    (``batched_nmf`` with K = 1; arguments as there)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2:
        raise ValueError(f"A must be [n, D], got shape {tuple(A.shape)}")
    if fixed_basis is not None and isinstance(fixed_basis, torch.Tensor) and fixed_basis.dim() == 2:
        fixed_basis = fixed_basis[None]
    r = batched_nmf(A[None], rank, max_iter=max_iter, tol=tol, check_every=check_every, eps=eps,
                    clip_negative=clip_negative, seed=seed, fixed_basis=fixed_basis, stop_error=stop_error,
                    init=init, error_mode=error_mode, inner_updates=inner_updates)
    return NMFResult(r.E[0], r.B[0], float(r.err[0]), int(r.n_iter[0]))


def nmf_encode(features: Union[Tensor, Sequence[Tensor]], basis: Tensor, **kwargs) -> BatchedNMFResult:
    """Encode features against fixed non-negative prototypes ``basis`` ([p, D] or [K, p, D]): only E is updated
    (``batched_nmf(features, p, fixed_basis=basis, ...)``)."""
    if not isinstance(basis, torch.Tensor):
        raise TypeError(f"basis must be a torch.Tensor, got {type(basis).__name__}")
    if basis.dim() not in (2, 3):
        raise ValueError(f"basis must be [p, D] or [K, p, D], got shape {tuple(basis.shape)}")
    return batched_nmf(features, basis.shape[-2], fixed_basis=basis, **kwargs)

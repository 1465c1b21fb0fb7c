"""Interpreter parity of the Triton NMF kernels (DESIGN.md §3 gate 1): run with TRITON_INTERPRET=1.

The launchers (kernels/nmf.py) run on CPU tensors and are compared with the torch code of protofast.ops.nmf and
the float64 reference, step by step and end to end through ``protofast.batched_nmf`` (PROTOFAST_BACKEND=triton).
"""
from __future__ import annotations

import math

import pytest
import torch

import protofast
import protofast.ops.nmf as N
import protofast.reference.nmf as R
from protofast.kernels import nmf as tk


def lowrank(n, D, r, noise, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(n, r, generator=g, dtype=torch.float64) @ torch.rand(r, D, generator=g, dtype=torch.float64)
    return A + noise * torch.rand(n, D, generator=g, dtype=torch.float64)


def padded(classes, dtype=torch.float32):
    A, lengths = N._pad([a.to(dtype) for a in classes], None)
    return A.contiguous(), lengths


@pytest.mark.parametrize("rank,inner", [(1, 1), (3, 1), (17, 1), (3, 4)])
@pytest.mark.parametrize("update_basis", [True, False])
def test_step_matches_torch(rank, inner, update_basis):
    # row counts around the 16-row interpreter tile, D not a multiple of the 16-column block
    classes = [lowrank(n, 21, 2, 0.2, n) for n in (1, 15, 16, 17, 33)]
    A, lengths = padded(classes)
    E, B = N.initial_factors(A, lengths, rank)
    active = torch.tensor([True, True, False, True, True])
    E1, B1 = E.clone(), B.clone()
    tk.nmf_step(A, lengths, E1, B1, active, 1e-7, update_basis, inner=inner)
    E2, B2 = E.clone(), B.clone()
    idx = active.nonzero().squeeze(1)
    Ea, Ba = E2[idx].clone(), B2[idx].clone()
    N._step_torch(A[idx], Ea, Ba, 1e-7, update_basis, False, None, inner)
    E2[idx], B2[idx] = Ea, Ba
    torch.testing.assert_close(E1, E2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B1, B2, rtol=1e-5, atol=1e-6)
    assert torch.equal(E1[2], E[2]) and torch.equal(B1[2], B[2])      # frozen class untouched
    assert bool((E1[0, 1:] == 0).all())                                # padded rows stay 0


def test_residual_and_gram_match_torch():
    classes = [lowrank(n, 40, 3, 0.3, n) for n in (5, 16, 47)]
    A, lengths = padded(classes)
    E, B = N.initial_factors(A, lengths, 3)
    active = torch.tensor([True, False, True])
    res = tk.nmf_residual(A, lengths, E, B, active)
    ref = N._residual_torch(A.double(), E.double(), B.double())
    torch.testing.assert_close(res[active], ref[active], rtol=1e-5, atol=1e-6)
    assert float(res[1]) == 0.0
    a_sq = (A.double() ** 2).sum((1, 2))
    E1, B1 = E.clone(), B.clone()
    gram = tk.nmf_step(A, lengths, E1, B1, torch.ones(3, dtype=torch.bool), 1e-7, True, True, a_sq)
    direct = N._residual_torch(A.double(), E1.double(), B1.double())
    torch.testing.assert_close(gram, direct, rtol=1e-4, atol=1e-4)


def test_batched_nmf_on_triton_matches_reference(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "triton")
    calls = []
    real_step = tk.nmf_step
    monkeypatch.setattr(tk, "nmf_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    classes = [lowrank(40, 16, 1, 0.0, 1), lowrank(23, 16, 3, 0.1, 2), lowrank(7, 16, 1, 1.0, 4),
               torch.zeros(3, 16, dtype=torch.float64)]
    r = protofast.batched_nmf([a.float() for a in classes], 3, max_iter=40, tol=0)
    for k, a in enumerate(classes):
        ref = R.nmf(a, 3, max_iter=40, tol=0)
        n = a.shape[0]
        torch.testing.assert_close(r.E[k, :n].double(), ref.E, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(r.B[k].double(), ref.B, rtol=2e-3, atol=1e-4)
        assert math.isclose(float(r.err[k]), ref.err, rel_tol=1e-4, abs_tol=1e-6)
    assert len(calls) == 40, "batched_nmf did not run the Triton kernels"
    # stopping rule: the same iteration as the float64 reference (tol chosen far from any check's margin)
    r = protofast.batched_nmf([a.float() for a in classes[:3]], 2, tol=1e-2)
    assert r.n_iter.tolist() == [R.nmf(a, 2, tol=1e-2).n_iter for a in classes[:3]]


def test_launcher_errors():
    A = torch.rand(1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        tk.nmf_step(A, torch.tensor([4]), torch.rand(1, 4, 2, dtype=torch.float64), torch.rand(1, 2, 16,
                    dtype=torch.float64), torch.tensor([True]), 1e-7, True)
    with pytest.raises(ValueError, match="rank <= 64"):
        tk.pick_config(65)

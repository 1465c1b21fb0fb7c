"""The public operators end to end on the Triton backend (PROTOFAST_BACKEND=triton), under the interpreter.

The launcher tests next to this file check the kernels themselves; these check the wiring: `_prepare` (NCHW read
in place, h×w windows through unfold, cosine normalisation), float16 inputs reaching the kernels as float16, the
registered op's autograd calling the Triton backward, and the full maps.
"""
from __future__ import annotations

import pytest
import torch

import protofast
import protofast.reference as ref
from protofast import _backend

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "triton")
    assert _backend.backend_for(torch.device("cpu")) == "triton"


def _inputs(fs, ps, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(fs, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    p = torch.randn(ps, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return f, p


def _reference(f, p, metric, up):
    fr = f.detach().double().requires_grad_()
    pr = p.detach().double().requires_grad_()
    values, _ = ref.prototype_min_distances(fr, pr, metric)
    values.backward(up.double())
    return values.detach(), fr.grad, pr.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("fs, ps", [((3, 13, 5, 7), (11, 13, 1, 1)), ((2, 13, 5, 7), (11, 13, 2, 3)),
                                    ((3, 6, 13), (11, 13))], ids=["nchw", "hw_window", "set"])
def test_public_min_distances_on_triton(fs, ps, metric, dtype):
    f, p = _inputs(fs, ps, dtype, seed=3)
    calls = []
    from protofast.kernels import prototype_distances as kernels

    fwd, bwd = kernels.min_distances_forward, kernels.min_distances_backward

    def spy_fwd(X, P, cosine, channels_first):
        calls.append(("fwd", X.dtype, channels_first))
        return fwd(X, P, cosine, channels_first)

    def spy_bwd(*args):
        calls.append(("bwd",))
        return bwd(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "min_distances_forward", spy_fwd)
        mp.setattr(kernels, "min_distances_backward", spy_bwd)
        values, argmin = protofast.prototype_min_distances(f, p, metric)
        up = torch.randn(values.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        values.backward(up)
    assert calls[0] == ("fwd", dtype, len(fs) == 4) and calls[1] == ("bwd",), calls
    assert values.dtype == dtype and argmin.dtype == torch.int64
    rv, rgf, rgp = _reference(f, p, metric, up)
    torch.testing.assert_close(values.double(), rv, **TOL[dtype])
    rmap = ref.prototype_distance_maps(f.detach().double(), p.detach().double(), metric).flatten(2)
    torch.testing.assert_close(rmap.gather(2, argmin[..., None]).squeeze(2), rv, **TOL[dtype])
    assert f.grad.dtype == dtype and p.grad.dtype == dtype
    torch.testing.assert_close(f.grad.double(), rgf, **TOL[dtype])
    torch.testing.assert_close(p.grad.double(), rgp, **TOL[dtype])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_public_distance_maps_on_triton(metric):
    f, p = _inputs((2, 5, 4, 6), (7, 5, 2, 2), torch.float32, seed=4)
    maps = protofast.prototype_distance_maps(f, p, metric)
    rmaps = ref.prototype_distance_maps(f.detach().double(), p.detach().double(), metric)
    assert maps.shape == rmaps.shape == (2, 7, 3, 5)
    torch.testing.assert_close(maps.double(), rmaps, **TOL[torch.float32])
    maps.backward(torch.ones_like(maps))  # the maps' backward runs the chunked torch code on any backend
    rf = f.detach().double().requires_grad_()
    ref.prototype_distance_maps(rf, p.detach().double(), metric).sum().backward()
    torch.testing.assert_close(f.grad.double(), rf.grad, **TOL[torch.float32])


def test_float64_on_the_triton_backend_runs_the_torch_code():
    """No float64 Triton kernels: float64 inputs take the chunked torch path, with float64 accuracy."""
    f, p = _inputs((2, 5, 3, 3), (4, 5), torch.float64, seed=6)
    values, _ = protofast.prototype_min_distances(f, p)
    rv, _ = ref.prototype_min_distances(f.detach(), p.detach())
    torch.testing.assert_close(values, rv, rtol=1e-12, atol=1e-12)

"""Shared fixtures and helpers of the protofast test suite (DESIGN.md §4).

- ``backend``: every test that takes it runs once per CPU backend, ``torch`` (the chunked fallback) and ``cpp``
  (the fused C++ kernel, built just in time). The ``cpp`` case is skipped only when the extension cannot be built
  here *and* ``PROTOFAST_REQUIRE_CPP`` is unset; CI sets it, so a broken build fails CI instead of hiding.
- ``TOLERANCES``: the one per-dtype tolerance table (op in that dtype against the float64 reference).
- helpers: random inputs that are tie-free by construction, reference-parity checks of values, argmins and
  gradients.
"""
from __future__ import annotations

import os

import pytest
import torch

import protofast  # noqa: F401  (the installed package: `pip install ".[test]"`, or `pip install -e ".[test]"`)
import protofast.reference as ref

# --------------------------------------------------------------------------------------------- tolerances
# (rtol, atol) of an op run in `dtype` against the float64 reference evaluated on the same (rounded) inputs.
# float16 / bfloat16: computed in float32, rounded once to the input dtype on the way out.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, msg=""):
    """``actual`` (any dtype) against the float64 ``expected`` with the tolerance of ``dtype``."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype), equal_nan=True,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


# --------------------------------------------------------------------------------------------- backends
BACKENDS = ("torch", "cpp")


def cpp_available() -> bool:
    from protofast import _cpp

    return bool(_cpp.load_library())


def _require_cpp(param: str) -> None:
    if param != "cpp" or cpp_available():
        return
    from protofast import _cpp

    error = _cpp.build_info()["error"]
    if os.environ.get("PROTOFAST_REQUIRE_CPP"):
        pytest.fail(f"PROTOFAST_REQUIRE_CPP is set but the C++ extension is unavailable: {error}")
    pytest.skip(f"C++ extension unavailable (set PROTOFAST_REQUIRE_CPP to make this an error): {error}")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Forces ``PROTOFAST_BACKEND`` for the test (read at every call)."""
    _require_cpp(request.param)
    monkeypatch.setenv("PROTOFAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Forces the torch fallback to cut every op into many tiny chunks (64 distance entries at most)."""
    import protofast.ops.distances as distances
    import protofast.ops.losses as losses

    monkeypatch.setattr(distances, "_CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(losses, "_MULTILABEL_CHUNK", 8)


# --------------------------------------------------------------------------------------------- inputs
def proto_shape(M: int, D: int, kind) -> tuple:
    """kind: "flat" -> [M, D], (h, w) -> [M, D, h, w]."""
    return (M, D) if kind == "flat" else (M, D, *kind)


def min_gap(features: torch.Tensor, prototypes: torch.Tensor, metric: str) -> float:
    """Smallest gap between the two smallest entries of any reference distance map (inf when N = 1), in
    float64 on the given (already rounded) inputs."""
    d = ref.prototype_distance_maps(features.double(), prototypes.double(), metric).flatten(2)
    if d.shape[2] == 1:
        return float("inf")
    two = d.topk(2, dim=2, largest=False).values
    return float((two[..., 1] - two[..., 0]).min())


def make_inputs(feature_shape, prototype_shape, dtype=torch.float64, metric="l2", seed=0, min_separation=1e-3,
                min_value=None, requires_grad=True):
    """Random normal features and prototypes in ``dtype`` whose distance maps have no near-ties (the two
    smallest entries of every map differ by ``min_separation``), so that argmins are unambiguous in any dtype
    and under gradcheck's perturbations. With ``min_value``, also every minimum distance exceeds it (away from
    the relu kink). Deterministic: tries seeds ``seed, seed + 1000, ...``."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed + 1000 * attempt)
        f = torch.randn(feature_shape, generator=g, dtype=torch.float64).to(dtype)
        p = torch.randn(prototype_shape, generator=g, dtype=torch.float64).to(dtype)
        if min_gap(f, p, metric) < min_separation:
            continue
        if min_value is not None:
            v = ref.prototype_min_distances(f.double(), p.double(), metric)[0]
            if float(v.min()) < min_value:
                continue
        return f.requires_grad_(requires_grad), p.requires_grad_(requires_grad)
    raise AssertionError("could not draw tie-free inputs; relax min_separation")


def as_reference(*tensors):
    """float64 leaf copies (the oracle runs in float64 on the same rounded values)."""
    return tuple(t.detach().double().requires_grad_(t.requires_grad) for t in tensors)


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, inputs, upstream, allow_unused=False)


def identity_matrix(M: int, K: int, per_class=None, dtype=torch.float32) -> torch.Tensor:
    """Contiguous-block class identity [M, K] (M % K need not be 0: the last class takes the rest)."""
    per_class = per_class or max(1, M // K)
    I = torch.zeros(M, K, dtype=dtype)
    for m in range(M):
        I[m, min(m // per_class, K - 1)] = 1
    return I

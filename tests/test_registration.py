"""torch.library registration (opcheck), torch.compile(fullgraph=True), backend selection and the C++ JIT loader.

DESIGN.md §2: every op works in eager mode, under torch.compile(fullgraph=True), with autograd and with
torch.library.opcheck.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import protofast
from conftest import identity_matrix, make_inputs

ops = torch.ops.protofast
REGISTERED = ["set_min_distances", "set_min_distances_backward", "set_distance_maps", "set_distance_maps_backward",
              "log_similarity", "log_similarity_backward", "cluster_separation", "cluster_separation_backward",
              "multilabel_cluster_separation", "masked_l1", "masked_l1_backward", "mean_distance",
              "mean_distance_exact", "pipnet_forward", "pipnet_backward",
              "masked_gap", "masked_gap_grad_features", "masked_gap_grad_masks"]   # opcheck: test_masked_gap.py


def _sets(dtype=torch.float64, requires_grad=True):
    X = torch.randn(2, 5, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    P = torch.randn(4, 3, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return X.requires_grad_(requires_grad), P.requires_grad_(requires_grad)


def _opcheck(op, args):
    torch.library.opcheck(op, args)   # raises on any failure


def test_every_registered_op_is_covered():
    """The list above is the namespace's full list of operators (a new op must get an opcheck here)."""
    registered = {schema.name.split("::")[1] for schema in torch._C._jit_get_all_schemas()
                  if schema.name.startswith("protofast::")}
    assert registered == set(REGISTERED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck_set_min_distances(backend, metric, dtype):
    X, P = _sets(dtype)
    _opcheck(ops.set_min_distances.default, (X, P, metric))
    values, argmin = ops.set_min_distances(X.detach(), P.detach(), metric)
    grad = torch.randn(values.shape, dtype=dtype)
    _opcheck(ops.set_min_distances_backward.default, (grad, X.detach(), P.detach(), values, argmin, metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck_set_distance_maps(metric):
    X, P = _sets()
    _opcheck(ops.set_distance_maps.default, (X, P, metric))
    maps = ops.set_distance_maps(X.detach(), P.detach(), metric)
    _opcheck(ops.set_distance_maps_backward.default, (torch.randn(maps.shape, dtype=maps.dtype), X.detach(),
                                                       P.detach(), maps, metric))


def test_opcheck_log_similarity(backend):
    d = (torch.rand(3, 4, dtype=torch.float64) + 0.1).requires_grad_()
    _opcheck(ops.log_similarity.default, (d, 1e-4))
    _opcheck(ops.log_similarity_backward.default, (torch.randn(3, 4, dtype=torch.float64), d.detach(), 1e-4))


@pytest.mark.parametrize("exact", [False, True])
def test_opcheck_cluster_separation(backend, exact):
    d = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    identity = identity_matrix(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    _opcheck(ops.cluster_separation.default, (d, labels, identity, 5.0, exact))
    *_, cl_idx, sep_idx, n_wrong = ops.cluster_separation(d.detach(), labels, identity, 5.0, exact)
    g = [torch.tensor(v, dtype=torch.float64) for v in (0.7, -0.3, 1.1)]
    _opcheck(ops.cluster_separation_backward.default, (*g, labels, identity, cl_idx, sep_idx, n_wrong, 6))
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.float64)
    _opcheck(ops.multilabel_cluster_separation.default, (d, targets, identity, 5.0, exact))


def test_opcheck_masked_l1(backend):
    W = torch.randn(3, 6, dtype=torch.float64).requires_grad_()
    identity = identity_matrix(6, 3, dtype=torch.float64)
    _opcheck(ops.masked_l1.default, (W, identity))
    _opcheck(ops.masked_l1_backward.default, (torch.tensor(0.6, dtype=torch.float64), W.detach(), identity))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_opcheck_mean_distance(metric):
    X, P = _sets()
    identity = identity_matrix(4, 2, dtype=torch.float64)
    labels = torch.tensor([1, 0])
    _opcheck(ops.mean_distance.default, (X, P, None, None, metric, False))
    _opcheck(ops.mean_distance.default, (X, P, labels, identity, metric, False))
    _opcheck(ops.mean_distance.default, (X, P, labels, identity, metric, True))
    _opcheck(ops.mean_distance_exact.default, (X, P, None, None, metric, False))
    _opcheck(ops.mean_distance_exact.default, (X, P, labels, identity, metric, True))


# --------------------------------------------------------------------------------------------- torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare_compiled(fn, inputs, *args, **kwargs):
    """fullgraph compile of fn(*inputs, *args) gives eager's outputs and gradients w.r.t. `inputs`."""
    def run(f):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = f(*leaves, *args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        diff = [o for o in outs if o.is_floating_point()]
        loss = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in diff)
        return outs, torch.autograd.grad(loss, leaves)

    expected_out, expected_grads = run(fn)
    got_out, got_grads = run(torch.compile(fn, fullgraph=True))
    for a, b in zip(got_out, expected_out):
        torch.testing.assert_close(a, b)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


F32 = dict(dtype=torch.float32, min_separation=1e-2)


def test_compile_min_distances(backend, fresh_dynamo):
    f, p = make_inputs((2, 3, 4, 5), (5, 3, 2, 2), **F32)
    _compare_compiled(protofast.prototype_min_distances, (f, p))
    _compare_compiled(protofast.prototype_min_distances, (f, p), "cosine")


def test_compile_distance_maps(fresh_dynamo):
    f, p = make_inputs((2, 4, 3), (5, 3), **F32)
    _compare_compiled(protofast.prototype_distance_maps, (f, p))


def test_compile_log_similarity(fresh_dynamo):
    d = torch.rand(2, 5) + 0.1
    _compare_compiled(protofast.log_similarity, (d,), 1e-4)


def test_compile_cluster_separation(fresh_dynamo):
    d = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) * 4
    identity = identity_matrix(6, 3)
    _compare_compiled(protofast.cluster_separation_costs, (d,), torch.tensor([0, 2, 1, 2]), identity, 3.0)
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]])
    _compare_compiled(protofast.cluster_separation_costs, (d,), targets, identity, 3.0, exact=True)


def test_compile_masked_l1(fresh_dynamo):
    _compare_compiled(protofast.masked_l1, (torch.randn(3, 6),), identity_matrix(6, 3))


@pytest.mark.parametrize("mode", ["closed_form", "exact"])
def test_compile_mean_distance(mode, fresh_dynamo):
    f, p = make_inputs((2, 3, 4, 4), (4, 3, 1, 1), **F32)
    _compare_compiled(protofast.mean_distance_loss, (f, p), mode=mode)
    _compare_compiled(protofast.mean_distance_loss, (f, p), torch.tensor([1, 0]), identity_matrix(4, 2), mode=mode,
                      classes="other")


# --------------------------------------------------------------------------------------------- backends
def _cpu_kernel_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("protofast_cpu::")}


def test_backend_selection(backend):
    """PROTOFAST_BACKEND=cpp runs the fused C++ kernel (forward and backward); =torch never does."""
    f, p = make_inputs((2, 3, 4, 4), (5, 3), torch.float32)

    def step():
        values, _ = protofast.prototype_min_distances(f, p)
        values.sum().backward()

    called = _cpu_kernel_calls(step)
    if backend == "cpp":
        assert called == {"protofast_cpu::min_distances_forward", "protofast_cpu::min_distances_backward"}
    else:
        assert called == set()


def test_auto_backend_prefers_cpp_when_built(monkeypatch):
    from protofast import _backend, _cpp

    monkeypatch.delenv("PROTOFAST_BACKEND", raising=False)
    expected = "cpp" if _cpp.load_library() else "torch"
    assert _backend.backend_for(torch.device("cpu")) == expected
    assert _backend.backend_for(torch.device("meta")) == "torch"


def test_forced_cpp_rejects_other_devices(monkeypatch):
    from protofast import _backend

    monkeypatch.setenv("PROTOFAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="CPU"):
        _backend.backend_for(torch.device("meta"))


def test_unavailable_extension(monkeypatch):
    """Without the C++ kernel, auto falls back to torch and a forced cpp raises a RuntimeError saying why."""
    from protofast import _cpp

    monkeypatch.setattr(_cpp, "load_library", lambda: False)
    monkeypatch.setattr(_cpp, "build_info", lambda: {"available": False, "error": "no compiler (test)"})
    f, p = make_inputs((2, 3, 4, 4), (5, 3), torch.float64)
    monkeypatch.setenv("PROTOFAST_BACKEND", "auto")
    assert _cpu_kernel_calls(lambda: protofast.prototype_min_distances(f, p)) == set()
    monkeypatch.setenv("PROTOFAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="no compiler \\(test\\)"):
        protofast.prototype_min_distances(f, p)


def test_info_is_json_serialisable(backend):
    info = protofast.info()
    json.dumps(info)
    assert info["requested_backend"] == backend
    assert info["cpu_backend"] == backend
    assert info["protofast"] == protofast.__version__


# --------------------------------------------------------------------------------------------- C++ loader
def test_build_info_keys():
    from protofast import _cpp

    info = _cpp.build_info()
    assert set(info) >= {"available", "error", "library_path", "build_seconds", "cache_dir", "sources"}
    assert info["available"] in (None, True, False)
    assert info["sources"] and (Path(info["sources"]) / "prototype_distances.cpp").is_file()
    assert info["cache_dir"]


def test_build_info_after_load():
    from conftest import _require_cpp
    from protofast import _cpp

    _require_cpp("cpp")
    info = _cpp.build_info()
    assert info["available"] is True and info["error"] is None
    if info["library_path"] is not None:       # None only when the ops were registered by other means
        assert Path(info["library_path"]).is_file()


def test_import_does_not_build():
    """Importing protofast compiles nothing and loads no extension (DESIGN.md §5)."""
    code = ("import protofast, protofast._cpp as c, torch; "
            "print(c.build_info()['available']); print(c._op_registered())")
    env = {k: v for k, v in os.environ.items() if k != "PROTOFAST_BACKEND"}
    root = Path(protofast.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "False"]
    assert "compiling" not in proc.stderr

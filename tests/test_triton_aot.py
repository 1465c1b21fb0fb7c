"""Ahead-of-time compile check of the Triton kernels (DESIGN.md §3, gate 2), in the main test process.

Every kernel × config × dtype × constexpr combination the launchers can select is compiled to a cubin for sm_80
and sm_90 (no GPU needed), generically and as the JIT specialises it for the ProtoPNet and ProtoMask workloads;
every one must fit the architecture's shared memory and must not spill (cuobjdump's STACK and LOCAL are 0).
``python -m protofast.kernels.aot`` prints the same table (docs/kernels.md).
The interpreter parity tests live in tests/triton/ and run in their own process (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

try:  # `tests/triton` is on sys.path as a namespace directory: require the real package
    import triton.language  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("the AOT check compiles real cubins: run it without TRITON_INTERPRET=1", allow_module_level=True)

from protofast.kernels import aot
from protofast.kernels import prototype_distances as tk


def _selectable(kernel: str) -> set:
    return {(v.config, v.dtype) for v in tk.kernel_variants() if v.kernel == kernel}


def test_heuristics_only_pick_enumerated_configs():
    """Whatever (N, M, K, dtype) the launchers see, the config they pick is one the AOT check compiles."""
    sizes = [1, 15, 16, 17, 32, 33, 49, 64, 65, 196, 676, 2000, 4096]
    picks = {"min_distances_fwd": lambda n, m, k, dt: tk._pick_fwd(n, m, k, dt),
             "distance_maps": lambda n, m, k, dt: tk._pick_maps(n, m, k, dt),
             "min_distances_bwd_x": lambda n, m, k, dt: tk._pick_bwd_x(n, m, k, dt, B=m),
             "min_distances_bwd_p": lambda n, m, k, dt: tk._pick_bwd_p(m, k, dt)}
    for kernel, pick in picks.items():
        selectable = _selectable(kernel)
        chosen = {(pick(n, m, k, dt), dt) for n, m, k in itertools.product(sizes, repeat=3)
                  for dt in tk.SUPPORTED_DTYPES}
        assert chosen <= selectable, f"{kernel}: picked configs that are never compiled: {chosen - selectable}"
        assert len({c for c, _ in chosen}) >= 2, f"{kernel}: the heuristic never uses its second config"


def test_variants_cover_dtypes_metrics_and_precisions():
    variants = list(tk.kernel_variants())
    fwd = {(v.dtype, v.constexprs["COSINE"], v.constexprs["DOT_PRECISION"]) for v in variants
           if v.kernel == "min_distances_fwd"}
    assert fwd == {(dt, cos, prec) for dt in tk.SUPPORTED_DTYPES for cos in (False, True)
                   for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",))}
    assert {v.kernel for v in variants} == {"min_distances_fwd", "distance_maps", "min_distances_bwd_x",
                                            "min_distances_bwd_p"}


def test_dot_precision_follows_allow_tf32():
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert tk._dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert tk._dot_precision(torch.float32) == "tf32"
        assert tk._dot_precision(torch.float16) == "ieee" and tk._dot_precision(torch.bfloat16) == "ieee"
    finally:
        matmul.allow_tf32 = saved


def test_launchers_refuse_cpu_tensors_without_the_interpreter():
    X, P = torch.zeros(2, 3, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="CUDA"):
        tk.min_distances_forward(X, P, False, False)
    with pytest.raises(ValueError, match="CUDA"):
        tk.distance_maps(X, P, True)


def test_cuobjdump_ships_with_triton():
    assert os.access(aot.cuobjdump_path(), os.X_OK), aot.cuobjdump_path()


def test_workload_launches_are_enumerated_and_specialised_like_the_jit():
    """What the launchers launch on the AOT workloads uses enumerated configs, and the JIT specialisation turns
    unit strides into constants (ProtoPNet's NCHW map read channels-first: the patch stride is 1)."""
    variants = {(v.kernel, v.config, v.dtype, tuple(sorted(v.constexprs.items()))) for v in tk.kernel_variants()}
    for name in aot.WORKLOADS:
        launches = aot.workload_launches(name)
        assert {launch.kernel for _, launch in launches} == {"min_distances_fwd", "distance_maps",
                                                              "min_distances_bwd_x", "min_distances_bwd_p"}
        for dtype, launch in launches:
            key = (launch.kernel, launch.config, dtype, tuple(sorted(launch.constexprs.items())))
            assert key in variants, f"{name}: launch not covered by kernel_variants(): {key}"
    fwd = next(launch for dtype, launch in aot.workload_launches("protopnet") if launch.kernel == "min_distances_fwd")
    signature, constexprs, attrs = aot.specialise(fwd)
    assert signature["stride_xn"] == "constexpr" and constexprs["stride_xn"] == 1
    assert signature["stride_xk"] == "i32" and signature["X"] == "*fp32"
    assert attrs[(0,)] == [["tt.divisibility", 16]]          # X's data pointer is 16-byte aligned


def test_every_variant_compiles_for_sm80_and_sm90_without_spills():
    rows = aot.resource_table()
    generic = [r for r in rows if r.spec == "generic"]
    assert len(generic) == 2 * len(list(tk.kernel_variants()))
    assert {r.spec for r in rows} == {"generic", *aot.WORKLOADS}
    assert {r.arch for r in rows} == {80, 90}
    assert all(r.regs > 0 for r in rows)
    for r in rows:
        assert r.smem <= aot.SMEM_LIMIT[r.arch], f"{r}: shared memory above the sm_{r.arch} limit"
        assert r.stack == 0 and r.local == 0, f"{r}: register spills (STACK {r.stack}, LOCAL {r.local})"
    assert not aot.violations(rows)


def test_violations_flags_spills_and_shared_memory():
    """The gate itself can fail: synthetic rows over the limits are reported."""
    ok = aot.Resources("k", "c", "float32", "", "generic", 80, 128, 1024, 0, 0)
    too_much_smem = aot.Resources("k", "c", "float32", "", "generic", 80, 128, aot.SMEM_LIMIT[80] + 1, 0, 0)
    spill = aot.Resources("k", "c", "float32", "", "generic", 90, 255, 1024, 8, 0)
    assert aot.violations([ok]) == []
    assert len(aot.violations([ok, too_much_smem, spill])) == 2

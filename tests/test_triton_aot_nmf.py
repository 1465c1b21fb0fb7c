"""Ahead-of-time compile gate of the Triton NMF kernels (DESIGN.md §3 gate 2), no GPU needed.

Every variant ``kernels/nmf.py`` ``kernel_variants()`` can select (3 padded ranks × rows kernel with/without the
Eᵀ A accumulation, residual kernel) is compiled for sm_80 and sm_90 (18 cubins): no spills (cuobjdump's STACK and
LOCAL are 0) and shared memory within the architecture's limit. docs/protonmf.md has the resulting table.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

try:
    import triton.language  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("the AOT check compiles real cubins: run it without TRITON_INTERPRET=1", allow_module_level=True)

from protofast.kernels import aot
from protofast.kernels import nmf as tk


def _compile(job):
    variant, arch = job
    compiled = aot.compile_variant(variant, arch)
    usage = aot.cubin_usage(compiled.asm["cubin"])
    return variant.label, arch, usage["regs"], int(compiled.metadata.shared), usage["stack"], usage["local"]


@pytest.fixture(scope="module")
def table():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = [(v, arch) for v in tk.kernel_variants() for arch in aot.ARCHS]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(_compile, jobs))
    print("\nkernel variant | arch | regs | smem | stack | local")
    for row in rows:
        print(" | ".join(map(str, row)))
    return rows


def test_every_variant_is_enumerated():
    variants = list(tk.kernel_variants())
    assert len(variants) == 9 and len(variants) * len(aot.ARCHS) <= 30
    assert {tk.pick_config(p) for p in (1, 3, 10, 16, 17, 32, 33, 64)} <= {v.config for v in variants} | {
        c for c in tk.INTERPRETER_CONFIGS.values() if tk.interpreting()}


def test_no_spills_and_smem_within_limits(table):
    for label, arch, regs, smem, stack, local in table:
        assert stack == 0 and local == 0, f"{label} spills on sm_{arch}: STACK={stack} LOCAL={local} (regs {regs})"
        assert smem <= aot.SMEM_LIMIT[arch], f"{label} needs {smem} B of shared memory on sm_{arch}"
        assert regs <= 255


def test_family_rows_of_the_cli_table(table):
    """``python -m protofast.kernels.aot --family nmf`` compiles the same variants (Triton's cache makes it cheap
    after the fixture) and reports no violation; an unknown family is an error."""
    rows = aot.family_rows("nmf")
    assert len(rows) == len(table) == 2 * len(list(tk.kernel_variants()))
    assert not aot.violations(rows)
    with pytest.raises(ValueError, match="family"):
        aot.family_rows("distance")

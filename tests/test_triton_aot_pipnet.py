"""Ahead-of-time compile gate of the PIP-Net Triton kernels (DESIGN.md §3, gate 2), in the main test process.

Every kernel × config × dtype × ALIGN the launchers of ``kernels/pipnet.py`` can select on a GPU (15 variants) is
compiled to a cubin for sm_80 and sm_90 (30 compiles, no GPU needed); each must fit the architecture's shared
memory and must not spill (cuobjdump's STACK and LOCAL are 0). ``python tests/test_triton_aot_pipnet.py`` prints
the resource table of docs/pipnet.md. Interpreter parity: tests/triton/test_pipnet_triton.py.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

try:
    import triton.language  # noqa: F401
    from triton.backends.compiler import GPUTarget  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton is not importable: {exc}", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("the AOT check compiles real cubins: run it without TRITON_INTERPRET=1", allow_module_level=True)

from protofast.kernels import aot
from protofast.kernels import pipnet as tk


def _row(variant, arch):
    compiled = aot.compile_variant(variant, arch)
    usage = aot.cubin_usage(compiled.asm["cubin"])
    return aot.Resources(variant.kernel, variant.config.name, str(variant.dtype).replace("torch.", ""),
                         ",".join(f"{k.lower()}={v}" for k, v in variant.constexprs.items() if k == "ALIGN"),
                         "generic", arch, usage["regs"], int(compiled.metadata.shared), usage["stack"],
                         usage["local"])


@functools.lru_cache(maxsize=None)
def resource_rows() -> tuple:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    jobs = [(v, arch) for v in tk.kernel_variants() for arch in aot.ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return tuple(pool.map(lambda job: _row(*job), jobs))


def test_variants_cover_every_launch():
    variants = list(tk.kernel_variants())
    keys = {(v.kernel, v.dtype, v.constexprs.get("ALIGN")) for v in variants}
    assert keys == {(k, dt, al) for dt in tk.SUPPORTED_DTYPES
                    for k, al in (("pipnet_lse", False), ("pipnet_lse", True), ("pipnet_pool", None),
                                  ("pipnet_backward", False), ("pipnet_backward", True))}
    assert len(variants) == 15
    # the launchers select exactly these configs on a GPU (one tile shape per kernel)
    chosen = {name: tk._config(name) for name in ("lse", "pool", "backward")}
    for v in variants:
        assert v.config == chosen[v.kernel.removeprefix("pipnet_")]
        assert v.constexprs["BLOCK_D"] == v.config.block_k and v.constexprs["BLOCK_N"] == v.config.block_n


def test_launchers_refuse_cpu_tensors_without_the_interpreter():
    a = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match="CUDA"):
        tk.pipnet_forward(a, True)
    with pytest.raises(TypeError, match="float32"):
        tk.pipnet_forward(a.double(), True)


def test_every_variant_compiles_for_sm80_and_sm90_without_spills():
    rows = resource_rows()
    assert len(rows) == 2 * len(list(tk.kernel_variants()))
    assert {r.arch for r in rows} == {80, 90}
    assert all(r.regs > 0 for r in rows)
    for r in rows:
        assert r.smem <= aot.SMEM_LIMIT[r.arch], f"{r}: shared memory above the sm_{r.arch} limit"
        assert r.stack == 0 and r.local == 0, f"{r}: register spills (STACK {r.stack}, LOCAL {r.local})"
    assert not aot.violations(rows)


if __name__ == "__main__":
    print(aot.format_table(resource_rows()))

"""Ahead-of-time compile check of the Triton kernels (DESIGN.md §3, gate 2), with no GPU present.

Every kernel × every config its launcher can select × every dtype/constexpr combination
(``prototype_distances.kernel_variants()``) is compiled to a cubin for sm_80 (A100) and sm_90 (H100) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``. For each cubin we read

    smem   shared memory bytes the launch requests (``metadata.shared``: static + dynamic)
    regs, stack, local   from ``cuobjdump --dump-resource-usage`` (the binary shipped in the triton wheel,
           ``triton/backends/nvidia/bin/cuobjdump``); STACK or LOCAL above 0 means register spills.

``python -m protofast.kernels.aot`` prints the table; ``tests/test_triton_aot.py`` asserts the limits below.
Compiles go through Triton's on-disk cache (``~/.triton/cache``), so a second run is fast; ``resource_table``
also caches its rows per process.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ARCHS = (80, 90)
# Maximum shared memory per block (opt-in) in bytes: 163 KB on sm_80, 227 KB on sm_90.
SMEM_LIMIT = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class Resources:
    kernel: str
    config: str
    dtype: str
    flags: str      # constexpr flags other than block sizes (metric, dot precision)
    arch: int
    regs: int
    smem: int
    stack: int
    local: int


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_usage(cubin: bytes) -> dict:
    """``{"regs", "stack", "static_smem", "local"}`` of the single kernel in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    found = _USAGE.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one function in cuobjdump's report, got:\n{out}")
    regs, stack, shared, local = map(int, found[0])
    return dict(regs=regs, stack=stack, static_smem=shared, local=local)


def compile_variant(variant, arch: int):
    """The compiled kernel (``triton.compiler.CompiledKernel``) of one ``KernelVariant`` for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs)
    options = dict(num_warps=variant.config.num_warps, num_stages=variant.config.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _row(variant, arch: int) -> Resources:
    compiled = compile_variant(variant, arch)
    usage = cubin_usage(compiled.asm["cubin"])
    flags = ",".join(f"{k.lower()}={v}" for k, v in variant.constexprs.items() if not k.startswith("BLOCK_"))
    return Resources(variant.kernel, variant.config.name, str(variant.dtype).replace("torch.", ""), flags, arch,
                     usage["regs"], int(compiled.metadata.shared), usage["stack"], usage["local"])


@functools.lru_cache(maxsize=None)
def resource_table(archs: tuple = ARCHS, workers: int = 2) -> tuple:
    """Compiles every selectable variant for every arch (``workers`` threads: the compiler releases the GIL in
    MLIR/LLVM and ptxas runs as a subprocess) and returns the ``Resources`` rows, in enumeration order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT check compiles real cubins: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
    from .prototype_distances import kernel_variants

    jobs = [(v, arch) for v in kernel_variants() for arch in archs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return tuple(pool.map(lambda job: _row(*job), jobs))


def violations(rows) -> list[str]:
    """Rows that break a gate: shared memory above the arch's limit, or any spill (STACK or LOCAL > 0)."""
    bad = []
    for r in rows:
        if r.smem > SMEM_LIMIT[r.arch]:
            bad.append(f"{r}: shared memory {r.smem} > {SMEM_LIMIT[r.arch]}")
        if r.stack or r.local:
            bad.append(f"{r}: spills (STACK {r.stack}, LOCAL {r.local})")
    return bad


def format_table(rows) -> str:
    """A Markdown table, one row per (kernel, config, dtype, flags, arch)."""
    lines = ["| kernel | config | dtype | flags | arch | regs | smem bytes | stack | local |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.config} | {r.dtype} | {r.flags} | sm_{r.arch} | {r.regs} | {r.smem} | "
                     f"{r.stack} | {r.local} |")
    return "\n".join(lines)


def main() -> int:
    import time

    start = time.perf_counter()
    rows = resource_table()
    print(format_table(rows))
    bad = violations(rows)
    print(f"\n{len(rows)} compilations in {time.perf_counter() - start:.1f} s; "
          f"{'all within limits, no spills' if not bad else f'{len(bad)} violations'}")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Ahead-of-time compile check of the Triton kernels (DESIGN.md §3, gate 2), with no GPU present.

Every kernel × every config its launcher can select × every dtype/constexpr combination
(``prototype_distances.kernel_variants()``) is compiled to a cubin for sm_80 (A100) and sm_90 (H100) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``. For each cubin we read

    smem   shared memory bytes the launch requests (``metadata.shared``: static + dynamic)
    regs, stack, local   from ``cuobjdump --dump-resource-usage`` (the binary shipped in the triton wheel,
           ``triton/backends/nvidia/bin/cuobjdump``); STACK or LOCAL above 0 means register spills.

``python -m protofast.kernels.aot`` prints the table of every kernel family (``--family`` picks one: the
distance kernels with their JIT-specialised workloads, PIP-Net's ``kernels/pipnet.py`` or the NMF kernels
``kernels/nmf.py``); ``tests/test_triton_aot.py``, ``tests/test_triton_aot_pipnet.py`` and
``tests/test_triton_aot_nmf.py`` assert the limits below.
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
    spec: str       # "generic" (all sizes/strides runtime i32) or the workload whose JIT specialisation was compiled
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
    return _compile(variant.fn, variant.signature, variant.constexprs, None, variant.config, arch)


def _compile(fn, signature: dict, constexprs: dict, attrs, config, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _flags(constexprs: dict) -> str:
    return ",".join(f"{k.lower()}={v}" for k, v in constexprs.items()
                    if k in ("COSINE", "DOT_PRECISION"))


def _row(variant, arch: int) -> Resources:
    compiled = compile_variant(variant, arch)
    usage = cubin_usage(compiled.asm["cubin"])
    return Resources(variant.kernel, variant.config.name, str(variant.dtype).replace("torch.", ""),
                     _flags(variant.constexprs), "generic", arch, usage["regs"], int(compiled.metadata.shared),
                     usage["stack"], usage["local"])


# --------------------------------------------------------------------------------------------- specialisations
# The JIT specialises every launch on its arguments: an integer equal to 1 (a unit stride) becomes a compile-time
# constant, and pointers or integers divisible by 16 get a divisibility hint (wider vector loads). These change
# the code, so besides the generic variants we compile what the launchers really launch for the workloads below,
# with the JIT's own specialisation function (``native_specialize_impl``, as ``JITFunction._pack_args`` does).
#
# workload: (features shape, prototypes shape); NCHW maps are read channels-first by the min ops (no copy), the
# maps kernel reads the same storage as [B, N, K] (a transposed view); [B, N, K] sets are contiguous.
WORKLOADS = {
    "protopnet": ((80, 128, 7, 7), (2000, 128)),   # ProtoPNet defaults: B 80, D 128, 7×7, M 2000
    "protomask": ((16, 11, 1280), (2000, 1280)),   # ProtoMask: 16 images × 11 views, 1280 channels
}


def workload_launches(name: str):
    """``(dtype, Launch)`` pairs for every kernel launch the launchers issue on workload ``name``, for every
    dtype, metric and (float32) ``allow_tf32`` setting. Tensors are allocated on the CPU, never computed."""
    import torch

    from . import prototype_distances as tk

    features_shape, prototypes_shape = WORKLOADS[name]
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    out = []
    try:
        for dtype in tk.SUPPORTED_DTYPES:
            for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                matmul.allow_tf32 = tf32
                for cosine in (False, True):
                    f = torch.empty(features_shape, dtype=dtype)
                    P = torch.empty(prototypes_shape, dtype=dtype)
                    channels_first = f.dim() == 4
                    X = f.flatten(2) if channels_first else f                  # [B, D, H·W] or [B, N, K]
                    B, M = X.shape[0], P.shape[0]
                    values = torch.empty(B, M)
                    argmin = torch.empty(B, M, dtype=torch.int64)
                    with tk.capture_launches() as launches:
                        tk.min_distances_forward(X, P, cosine, channels_first)
                        tk.min_distances_backward(values, X, P, values, argmin, cosine, channels_first)
                        tk.distance_maps(X.transpose(1, 2) if channels_first else X, P, cosine)
                    out += [(dtype, launch) for launch in launches]
    finally:
        matmul.allow_tf32 = saved
    return out


def specialise(launch):
    """``(signature, constexprs, attrs)`` the JIT would compile for ``launch`` (mirrors ``_pack_args``)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    args = iter(launch.args)
    for i, param in enumerate(launch.fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = launch.constexprs[param.name]
            attrs[(i,)] = []
            continue
        arg = next(args)
        kind, spec = native_specialize_impl(BaseBackend, arg, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = arg
        attrs[(i,)] = BaseBackend.parse_attr("" if kind == "constexpr" else spec)
    return signature, constexprs, attrs


def _workload_row(name: str, dtype, launch, arch: int) -> Resources:
    signature, constexprs, attrs = specialise(launch)
    compiled = _compile(launch.fn, signature, constexprs, attrs, launch.config, arch)
    usage = cubin_usage(compiled.asm["cubin"])
    return Resources(launch.kernel, launch.config.name, str(dtype).replace("torch.", ""), _flags(launch.constexprs),
                     name, arch, usage["regs"], int(compiled.metadata.shared), usage["stack"], usage["local"])


@functools.lru_cache(maxsize=None)
def resource_table(archs: tuple = ARCHS, workers: int = 2) -> tuple:
    """Compiles every selectable variant (generic) and every launch of the ``WORKLOADS`` (JIT-specialised) for
    every arch, with ``workers`` threads (MLIR/LLVM release the GIL and ptxas is a subprocess), and returns the
    ``Resources`` rows, generic ones first, in enumeration order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT check compiles real cubins: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences a warning)
    from .prototype_distances import kernel_variants

    jobs = [(_row, (v, arch)) for v in kernel_variants() for arch in archs]
    for name in WORKLOADS:
        seen = set()
        for dtype, launch in workload_launches(name):
            key = (launch.kernel, str(specialise(launch)), launch.config)
            if key not in seen:
                seen.add(key)
                jobs += [(_workload_row, (name, dtype, launch, arch)) for arch in archs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return tuple(pool.map(lambda job: job[0](*job[1]), jobs))


FAMILIES = ("distances", "pipnet", "nmf")


def family_rows(family: str, archs: tuple = ARCHS, workers: int = 2) -> tuple:
    """``Resources`` rows of one kernel family: ``"distances"`` is ``resource_table`` (generic variants plus the
    JIT-specialised workloads); ``"pipnet"`` / ``"nmf"`` compile every variant of that module's
    ``kernel_variants()`` (generic signatures) for every arch."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "distances":
        return resource_table(archs, workers)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the AOT check compiles real cubins: run it without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import importlib

    module = importlib.import_module(f"{__package__}.{family}")
    jobs = [(v, arch) for v in module.kernel_variants() for arch in archs]
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
    """A Markdown table, one row per (kernel, config, dtype, flags, specialisation, arch)."""
    lines = ["| kernel | config | dtype | flags | specialisation | arch | regs | smem bytes | stack | local |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.config} | {r.dtype} | {r.flags} | {r.spec} | sm_{r.arch} | {r.regs} | "
                     f"{r.smem} | {r.stack} | {r.local} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="AOT compile gate of the Triton kernels (no GPU needed)")
    parser.add_argument("--family", choices=("all",) + FAMILIES, default="all")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    families = FAMILIES if args.family == "all" else (args.family,)
    rows = tuple(row for family in families for row in family_rows(family))
    print(format_table(rows))
    bad = violations(rows)
    print(f"\n{len(rows)} compilations in {time.perf_counter() - start:.1f} s; "
          f"{'all within limits, no spills' if not bad else f'{len(bad)} violations'}")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

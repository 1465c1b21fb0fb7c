"""ProtoPNet head microbenchmarks (pytest-benchmark): one training-step loss of the prototype head
(distances -> min -> log-similarity -> logits -> CE + 0.8·clst − 0.08·sep + 1e-4·l1) at M = 2000, D = 128, 7×7,
K = 200, for B in {40, 80, 160, 200}, forward ("fwd", autograd enabled) and forward+backward ("fwd+bwd").

Providers (see :mod:`protofast.bench`): ``original`` (cfchen-duke/ProtoPNet: ones-conv, max_pool2d, dense masks),
``compile`` (torch.compile of it; marker ``compile``), ``cdist`` (cdist² + amin), ``protofast`` (fused op) and
``gemm`` (the GEMM floor: one [B·H·W, D] @ [D, M] matmul). Each (B, mode) is one pytest-benchmark group, so the
providers print side by side; ``extra_info["peak_mb"]`` holds the peak memory (torch profiler, MB = 10^6 bytes).
Unlike ``protofast bench``, pytest-benchmark runs the cases one after another (not interleaved): compare
within one run and prefer ratios.
"""
import os

import pytest

from protofast import bench

BATCHES = (40, 80, 160, 200)
ROUNDS = int(os.environ.get("PROTOFAST_BENCH_ROUNDS", "5"))


def _cases():
    for batch in BATCHES:
        for mode in bench.MODES:
            for provider in bench.PROVIDERS:
                marks = (pytest.mark.compile,) if provider == "compile" else ()
                yield pytest.param(provider, batch, mode, marks=marks, id=f"B{batch}-{mode}-{provider}")


@pytest.mark.parametrize("provider,batch,mode", list(_cases()))
def test_protopnet_head(benchmark, head_inputs, record_peak, provider, batch, mode):
    inp = head_inputs(batch)
    try:
        bench.step(provider, inp, "fwd+bwd")            # first call: JIT build / compile, outside the timing
    except bench.ProviderUnavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = f"protopnet-head B={batch} {mode}"
    benchmark.extra_info.update(provider=provider, batch=batch, mode=mode,
                                backend=os.environ.get("PROTOFAST_BACKEND", "auto"))
    benchmark.extra_info["peak_mb"] = bench.step_peak_memory_mb(provider, inp, mode)
    record_peak(benchmark.group, provider, benchmark.extra_info["peak_mb"])
    benchmark.pedantic(bench.step, args=(provider, inp, mode), setup=inp.zero_grad,
                       rounds=ROUNDS, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("batch", (40, 200))
@pytest.mark.parametrize("provider", [p if p != "compile" else pytest.param(p, marks=pytest.mark.compile)
                                      for p in bench.PROVIDERS if p not in ("original", "gemm")])
def test_providers_agree(head_inputs, provider, batch):
    """Every provider computes the original's loss value to fp32 tolerance."""
    import torch

    inp = head_inputs(batch)
    with torch.no_grad():
        expected = float(bench.head_original(inp))
        try:
            value = float(bench.get_provider(provider)(inp))
        except bench.ProviderUnavailable as exc:
            pytest.skip(str(exc))
    assert bench.losses_agree(value, expected), (provider, value, expected)

"""pytest-benchmark configuration for the protofast microbenchmarks.

Run (not part of the default ``pytest`` test paths):

    pytest benchmarks/                       # every provider, B in {40, 80, 160, 200}, fwd and fwd+bwd
    pytest benchmarks/ -m "not compile"      # without torch.compile (which compiles for ~30 s)
    PROTOFAST_BACKEND=torch pytest benchmarks/   # protofast's chunked torch fallback instead of the C++ kernel

``PROTOFAST_BENCH_ROUNDS`` (default 5) sets the timed rounds per case.
"""
import pytest

_PEAKS = []   # (group, provider, peak MB), printed at the end of the run


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: torch.compile provider (cold compile ~30 s; deselect with -m \"not compile\")")


@pytest.fixture(scope="session")
def head_inputs():
    """``head_inputs(B)``: the synthetic ProtoPNet-head inputs of :func:`protofast.bench.make_inputs`, one set per
    batch size for the whole session (so every provider of a group sees the same tensors)."""
    from protofast import bench

    cache = {}

    def get(batch):
        if batch not in cache:
            cache[batch] = bench.make_inputs(batch)
        return cache[batch]

    return get


@pytest.fixture
def record_peak():
    """``record_peak(group, provider, mb)``: remember a case's peak memory for the end-of-run summary."""
    def record(group, provider, mb):
        _PEAKS.append((group, provider, mb))

    return record


def pytest_terminal_summary(terminalreporter):
    if not _PEAKS:
        return
    terminalreporter.section("peak memory (torch profiler, MB = 10^6 bytes, above the inputs)")
    width = max(len(g) for g, _, _ in _PEAKS)
    for group, provider, mb in _PEAKS:
        terminalreporter.write_line(f"{group.ljust(width)}  {provider:<10} {mb:9.1f}")

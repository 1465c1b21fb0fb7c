"""pytest-benchmark cases of the push benchmark (``pytest benchmarks/test_push_bench.py``); the standalone
script with the interleaved ratio is ``benchmarks/push_bench.py``."""
import pytest


@pytest.fixture(scope="module")
def push_inputs():
    from protofast.push_bench import make_push_inputs

    return make_push_inputs()


@pytest.mark.parametrize("provider", ["original", "protofast"])
def test_push(benchmark, push_inputs, provider):
    from protofast.push_bench import _run

    model, batches = push_inputs
    benchmark.group = "push 2000 images, M=2000, K=200, 7x7"
    seconds, prototypes, index = benchmark.pedantic(_run, args=(provider, model, batches), rounds=2, iterations=1)
    assert (index >= 0).sum() > 0

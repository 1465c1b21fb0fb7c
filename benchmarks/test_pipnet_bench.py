"""pytest-benchmark cases of the PIP-Net loss (``pytest benchmarks/test_pipnet_bench.py``): the original eager loss
and protofast.pipnet_losses, forward + backward at 2 x 32 views, D=768, 26x26, K=200. The standalone script with
the interleaved ratio and peak memory is ``benchmarks/pipnet_bench.py``."""
import pytest


@pytest.fixture(scope="module")
def pipnet_inputs():
    from pipnet_bench import make_inputs

    return make_inputs(32, 768, 26, 200)


@pytest.mark.parametrize("provider", ["original", "protofast"])
def test_pipnet_loss_fwd_bwd(benchmark, pipnet_inputs, provider):
    from pipnet_bench import step

    a, Wc, y = pipnet_inputs
    benchmark.group = "PIP-Net train loss fwd+bwd, 2 x 32 views, D=768, 26x26, K=200"
    loss = benchmark.pedantic(step, args=(provider, a, Wc, y), rounds=3, iterations=1, warmup_rounds=1)
    assert loss.isfinite()

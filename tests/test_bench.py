"""The benchmark suite behind `protofast bench` and the CLI: a smoke run at a tiny batch (not a timing test).

It checks that every quick provider computes the same loss as the original way (run_suite raises
ProviderMismatch otherwise), for both loss definitions, and that the report, the JSON and `protofast info` work.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from protofast import bench


@pytest.mark.parametrize("loss", ["head", "step"])
def test_quick_suite_providers_agree(tmp_path, loss):
    result = bench.run_suite(batches=[2], providers=bench.QUICK_PROVIDERS, repeats=1, progress=False, loss=loss)
    rows = {(r["provider"], r["mode"]) for r in result["results"]}
    assert {("original", "fwd"), ("protofast", "fwd+bwd"), ("cdist", "fwd+bwd"), ("gemm", "fwd")} <= rows
    losses = [r["loss"] for r in result["results"] if r["provider"] != "gemm"]
    assert max(losses) - min(losses) < 1e-3
    assert result["config"]["loss"] == loss
    for r in result["results"]:
        assert r["median_ms"] > 0 and r["peak_mb"] is not None and r["peak_mb"] >= 0
    report = bench.format_report(result)
    assert "protofast" in report and "acceptance checks" in report
    out = tmp_path / "bench.json"
    bench.write_json(result, str(out))
    assert json.loads(out.read_text())["config"]["batches"] == [2]


def test_unknown_loss_rejected():
    with pytest.raises(ValueError, match="loss"):
        bench.make_inputs(2, loss="nope")


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "protofast.cli", "info", "--json"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out)
    assert info["torch"] and info["cpu_backend"] in ("cpp", "torch")


def test_cli_bench_runs_head_and_push_and_writes_json(tmp_path):
    """The main job end to end at a tiny size: head table, push comparison (identical results), JSON."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "protofast.cli", "bench", "--batch-sizes", "2", "--providers",
                           "original", "protofast", "gemm", "--repeats", "1", "--no-memory", "--no-progress",
                           "--push-images", "150", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "speed-up (original / protofast)" in proc.stdout
    assert "identical prototypes and image indices: True" in proc.stdout
    result = json.loads(out.read_text())
    assert result["push"]["agree"] is True and result["push"]["config"]["num_images"] == 150
    assert result["push"]["ratio"] > 0

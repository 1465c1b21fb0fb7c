"""Backend selection (protofast._backend): forced names, the Triton path's guards, and what `info()` reports."""
import pytest
import torch

import protofast
from protofast import _backend
from protofast.ops import distances as ops


def test_unknown_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PROTOFAST_BACKEND"):
        _backend.backend_for(torch.device("cpu"))


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.backend_for(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        protofast.prototype_min_distances(torch.rand(2, 3, 4, 4), torch.rand(5, 3))


def test_forced_cpp_rejects_other_devices(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        _backend.backend_for(torch.device("meta"))


def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter alone does not move CPU work to Triton
    assert _backend.backend_for(torch.device("cpu")) in ("cpp", "torch")


def test_info_reports_triton_and_gpu_path():
    info = protofast.info(build=False)
    for key in ("triton", "triton_kernels", "triton_error", "gpu_path", "cuda_available"):
        assert key in info
    ok, error = _backend.triton_status()
    assert info["triton_kernels"] is ok and (error is None) == ok
    if not torch.cuda.is_available():
        assert info["gpu_path"] is None and "no CUDA device" in info["gpu_path_note"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_half_inputs_to_the_registered_op_give_float32_values(monkeypatch, name, dtype):
    """The registered op's contract for half X (what the Triton kernels return, and the fake kernel says): values
    in float32, gradients in the inputs' dtype. CPU backends compute it in float32."""
    monkeypatch.setenv("PROTOFAST_BACKEND", name)
    X = torch.rand(2, 6, 5).to(dtype).requires_grad_()
    P = torch.rand(4, 5).to(dtype).requires_grad_()
    values, argmin = ops.set_min_distances(X, P, "l2")
    assert values.dtype == torch.float32 and argmin.dtype == torch.int64
    ref_v, ref_i = ops.set_min_distances(X.detach().float(), P.detach().float(), "l2")
    torch.testing.assert_close(values, ref_v)
    assert torch.equal(argmin, ref_i)
    values.sum().backward()
    assert X.grad.dtype == dtype and P.grad.dtype == dtype
    torch.library.opcheck(ops.set_min_distances, (X.detach(), P.detach(), "l2"))

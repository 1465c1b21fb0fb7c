"""Interleaved: prototype_min_distances forward(+backward of values.sum()) vs torch.mm into a preallocated output."""
import time, torch, protofast as pf
torch.manual_seed(0)
for B in (80, 200):
    x = torch.rand(B, 128, 7, 7, requires_grad=True); p = torch.rand(2000, 128, 1, 1, requires_grad=True)
    X2 = x.detach().permute(0, 2, 3, 1).reshape(-1, 128).contiguous(); P2 = p.detach().reshape(2000, 128).contiguous()
    out = torch.empty(X2.shape[0], 2000)
    def gemm(): torch.mm(X2, P2.t(), out=out)
    def fwd():
        with torch.no_grad(): pf.prototype_min_distances(x, p)
    def fwdbwd():
        x.grad = p.grad = None; v, _ = pf.prototype_min_distances(x, p); v.sum().backward()
    fns = {"gemm(out=)": gemm, "op fwd": fwd, "op fwd+bwd": fwdbwd}
    for f in fns.values():
        for _ in range(3): f()
    ts = {k: [] for k in fns}
    for _ in range(25):
        for k, f in fns.items():
            t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in ts.items()}
    print(f"B={B}: " + ", ".join(f"{k} {m:.2f} ms ({m / med['gemm(out=)']:.2f}x)" for k, m in med.items()))

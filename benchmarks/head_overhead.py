"""Diagnostic: the ProtoPNet head (B=80) through the public API vs the same C++ kernels called from plain
autograd.Functions (no validation, no torch.library dispatch), interleaved against the GEMM floor
(torch.mm into a preallocated output). The difference is the Python-layer cost per training step.

Run: python benchmarks/head_overhead.py   (needs the C++ extension; prints ms and ratios to the GEMM)
"""
import time

import torch

import protofast.bench as pb
import protofast._cpp as c; c.load_library()
ops = torch.ops.protofast_cpu
inp = pb.make_inputs(80); x, p, y, I = inp.x, inp.prototypes, inp.labels, inp.identity
class MinD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, P):
        v, a = ops.min_distances_forward(X, P, False, True); ctx.save_for_backward(X, P, v, a); return v
    @staticmethod
    def backward(ctx, g):
        X, P, v, a = ctx.saved_tensors; return ops.min_distances_backward(g.contiguous(), X, P, v, a, False, True)
class LogSim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d): ctx.save_for_backward(d); return ops.log_similarity_forward(d, 1e-4)
    @staticmethod
    def backward(ctx, g): (d,) = ctx.saved_tensors; return ops.log_similarity_backward(g, d, 1e-4)
class CS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d):
        c_, s_, a_, ci, si, no, nw = ops.cluster_separation_forward(d, y, I, 128.0, False)
        ctx.save_for_backward(ci, si, nw); ctx.M = d.shape[1]; return c_, s_
    @staticmethod
    def backward(ctx, gc, gs):
        ci, si, nw = ctx.saved_tensors
        return ops.cluster_separation_backward(gc, gs, torch.zeros_like(gc), y, I, ci, si, nw, ctx.M)
def lean():
    x.grad = p.grad = None
    d = MinD.apply(x.flatten(2), p.reshape(2000, 128)); s = LogSim.apply(d); c_, s_ = CS.apply(d)
    (s.mean() + 0.8 * c_ - 0.08 * s_).backward()
def api(): inp.zero_grad(); pb.step("protofast", inp, "fwd+bwd")
out = torch.empty(80 * 49, 2000)
def gemm(): torch.mm(inp.x2d, inp.p2d.t(), out=out)
fns = dict(api=api, lean=lean, gemm=gemm)
for f in fns.values():
    for _ in range(3): f()
ts = {k: [] for k in fns}
for _ in range(25):
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
med = {k: sorted(v)[12] * 1e3 for k, v in ts.items()}
print(" ".join(f"{k} {m:.2f} ms ({m / med['gemm']:.2f}x)" for k, m in med.items()))

"""Each kernel of the ProtoPNet head alone against the GEMM floor (diagnostic; see docs/benchmarks.md).

    python benchmarks/kernel_breakdown.py [--threads N] [--batch 80] [--rounds 15]

Times, interleaved, the raw C++ kernels (``torch.ops.protofast_cpu``) on the bench's shapes (M=2000, D=128, 7×7,
K=200): ``torch.mm`` into a preallocated output, the fused forward, the sparse backward, cluster/separation and
log-similarity; prints min and median ms and the ratio of the minimum to the GEMM's minimum.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import protofast
from protofast._cpp import load_library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if not load_library():
        raise SystemExit("the C++ kernels are unavailable here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, M, D, K = args.batch, 2000, 128, 200
    X = torch.rand(B, D, 49)                                  # an NCHW map viewed as [B, D, H·W]
    P = torch.rand(M, D)
    identity = torch.zeros(M, K)
    identity[torch.arange(M), torch.arange(M) // 10] = 1
    labels = torch.randint(0, K, (B,))
    X2d, out = X.transpose(1, 2).reshape(B * 49, D).contiguous(), torch.empty(B * 49, M)
    ops = torch.ops.protofast_cpu
    values, argmin = ops.min_distances_forward(X, P, False, True)
    grad = torch.rand(B, M)
    pieces = {
        "gemm floor (mm, out=)": lambda: torch.mm(X2d, P.t(), out=out),
        "fused forward": lambda: ops.min_distances_forward(X, P, False, True),
        "sparse backward": lambda: ops.min_distances_backward(grad, X, P, values, argmin, False, True),
        "cluster/separation fwd": lambda: ops.cluster_separation_forward(values, labels, identity, 128.0, False),
        "log-similarity fwd": lambda: ops.log_similarity_forward(values, 1e-4),
    }
    times = {k: [] for k in pieces}
    for f in pieces.values():
        f()
    for r in range(args.rounds):
        for name in (pieces if r % 2 == 0 else reversed(list(pieces))):
            t0 = time.perf_counter()
            pieces[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    floor = min(times["gemm floor (mm, out=)"])
    print(f"B={B}, M={M}, D={D}, 7x7, {torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds, "
          f"protofast {protofast.__version__}")
    print(f"{'piece':<26}{'min ms':>9}{'median ms':>11}{'min / gemm':>12}")
    total = 0.0
    for name, t in times.items():
        print(f"{name:<26}{min(t):>9.2f}{statistics.median(t):>11.2f}{min(t) / floor:>12.2f}")
        total += min(t) if name != "gemm floor (mm, out=)" else 0.0
    print(f"{'sum of the head kernels':<26}{total:>9.2f}{'':>11}{total / floor:>12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

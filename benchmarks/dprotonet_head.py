"""DProtoNet head at the paper's sizes: protofast vs the straightforward PyTorch formulation, and masked_gap vs
the GEMM floor. ``python benchmarks/dprotonet_head.py [--batch 60] [--repeats 5] [--threads N]``.

Sizes (SEMANTICS.md §4.1, §7): B = 60 images, I = 240 feature masks, D = 512 channels, 7×7 map, M = 2000
prototypes (10 per class, K = 200). One training step of the head, forward + backward (gradients to the shaping
output F, the prototypes and the last layer; the masks are the default fixed buffer):

- ``straightforward``: z = mean_hw(M_i ⊙ F) through the materialised [B, I, D, H, W] product (1.45 GB), distances
  ‖z‖² − 2 z·pᵀ + ‖p‖² as a dense [B, I, M] tensor (115 MB, cdist-style), clamp, min over masks, log-similarity
  (ε = 1e-12), last layer, CE + 0.8·Clst − 0.08·Sep + 1e-4·l1 with true masked minima, autograd throughout;
- ``protofast``: masked_gap (batched GEMM) → prototype_min_distances (fused GEMM + min, argmin-routed backward) →
  log_similarity → last layer → cluster_separation_costs(exact=True) + masked_l1, the same loss;
- ``gemm floor``: the GEMMs any exact implementation has to do, on pre-laid-out contiguous operands into
  preallocated outputs: the masked-GAP bmm [D]×([B, S]·[S, I]) and the distance mm [B·I, D]·[D, M] (forward);
  plus the bmm of ∂F (forward + backward: the min-distance backward is O(B·M·D), no GEMM).

Part 1 times masked_gap alone against its own floor (the bare bmm of the same shapes): the op *is* that bmm plus
a layout copy of z, so it runs on MKL/oneDNN here and on cuBLAS on a GPU — which is why protofast has no C++ or
Triton kernel for it. No GPU timing is claimed.

Timings: interleaved rounds in one process, median (and min) reported, as ratios. Peak memory: allocations
recorded by the torch profiler (``protofast.bench.peak_memory_mb``) for one forward + backward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import protofast as pf
from protofast.bench import environment, peak_memory_mb
from protofast.models.dprotonet import mask_min_distances


def make_inputs(B=60, I=240, D=512, H=7, W=7, M=2000, K=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.rand(B, D, H, W, generator=g)                       # shaping output (ReLU-free: any sign works)
    masks = torch.rand(I, D, H, W, generator=g)                       # U[0, 1], fixed buffer
    protos = torch.rand(M, D, generator=g) * 0.5
    identity = torch.zeros(M, K)
    identity[torch.arange(M), torch.arange(M) // (M // K)] = 1
    Wc = identity.t() - 0.5 * (1 - identity.t())
    labels = torch.randint(0, K, (B,), generator=g)
    return dict(F=feats, masks=masks, P=protos, Wc=Wc, labels=labels, identity=identity)


def _total(logits, mind, labels, identity, Wc, clst, sd, l1):
    return F.cross_entropy(logits, labels) + 0.8 * clst - 0.08 * sd + 1e-4 * l1


def loss_straightforward(Fm, masks, P, Wc, labels, identity):
    z = (masks[None] * Fm[:, None]).mean(dim=(3, 4))                                  # [B, I, D] via 5-D
    s = (z * z).sum(-1, keepdim=True) - 2 * z @ P.t() + (P * P).sum(-1)               # [B, I, M]
    mind = s.clamp_min(0).min(dim=1).values
    logits = torch.log((mind + 1) / (mind + 1e-12)) @ Wc.t()
    T = identity[:, labels].t()
    inf = torch.full_like(mind, float("inf"))
    clst = torch.where(T > 0, mind, inf).min(1).values.mean()
    sd = torch.where(T > 0, inf, mind).min(1).values.mean()
    l1 = (Wc.abs() * (1 - identity.t())).sum()
    return _total(logits, mind, labels, identity, Wc, clst, sd, l1)


def loss_protofast(Fm, masks, P, Wc, labels, identity):
    z = pf.masked_gap(Fm, masks)                                  # [B, I, D] view of a [B, D, I] buffer
    mind, _ = mask_min_distances(z, P)                            # fused, reads z channels-first (no copy)
    logits = pf.log_similarity(mind, 1e-12) @ Wc.t()
    clst, sd, _ = pf.cluster_separation_costs(mind, labels, identity, float(P.shape[1]), exact=True)
    l1 = pf.masked_l1(Wc, identity)
    return _total(logits, mind, labels, identity, Wc, clst, sd, l1)


class Step:
    """Forward + backward of one provider on fresh leaves (F, P, Wc require grad; masks do not)."""

    def __init__(self, fn, inp):
        self.fn, self.inp = fn, inp
        self.leaves = [inp[k].clone().requires_grad_() for k in ("F", "P", "Wc")]

    def __call__(self):
        for t in self.leaves:
            t.grad = None
        Fm, P, Wc = self.leaves
        loss = self.fn(Fm, self.inp["masks"], P, Wc, self.inp["labels"], self.inp["identity"])
        loss.backward()
        return float(loss.detach())


class HeadFloor:
    """The head's GEMMs on contiguous operands into preallocated outputs."""

    def __init__(self, inp, backward=True):
        Fm, masks, P = inp["F"], inp["masks"], inp["P"]
        B, D, H, W = Fm.shape
        I, M, S = masks.shape[0], P.shape[0], H * W
        self.Fc = Fm.reshape(B, D, S).transpose(0, 1).contiguous()                # [D, B, S]
        self.Mc = masks.reshape(I, D, S).permute(1, 2, 0).contiguous()            # [D, S, I]
        self.MT = masks.reshape(I, D, S).transpose(0, 1).contiguous()             # [D, I, S]
        self.z = torch.empty(D, B, I)
        self.Z = torch.rand(B * I, D)
        self.Pt = P.t().contiguous()
        self.G = torch.empty(B * I, M)
        self.gz = torch.rand(D, B, I)
        self.gF = torch.empty(D, B, S)
        self.backward = backward

    def gap(self):
        torch.bmm(self.Fc, self.Mc, out=self.z)

    def gap_backward(self):
        torch.bmm(self.gz, self.MT, out=self.gF)

    def __call__(self):
        self.gap()
        torch.mm(self.Z, self.Pt, out=self.G)
        if self.backward:
            self.gap_backward()


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v) * 1e3, min(v) * 1e3) for k, v in times.items()}


def _table(title, res, base):
    print(f"\n{title}")
    print(f"  {'provider':<34} {'median ms':>10} {'min ms':>9} {'x ' + base:>14}")
    for k, (med, mn) in res.items():
        print(f"  {k:<34} {med:>10.2f} {mn:>9.2f} {med / res[base][0]:>14.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--masks", type=int, default=240)
    ap.add_argument("--prototypes", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--only-gap", action="store_true", help="part 1 only (masked_gap vs its bmm floor)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(f"DProtoNet head: B={args.batch}, I={args.masks}, D=512, 7x7, M={args.prototypes}, K=200 | torch "
          f"{env['torch']}, {env['torch_num_threads']} threads, {env['cpu']} ({env['cpu_count']} cores), "
          f"malloc env {env['malloc_env']}, load avg {os.getloadavg()[0]:.1f} (shared machine)")
    inp = make_inputs(B=args.batch, I=args.masks, M=args.prototypes)
    B, D, H, W = inp["F"].shape
    I = inp["masks"].shape[0]

    # ------------------------------------------------------------------ part 1: masked_gap vs its GEMM floor
    floor = HeadFloor(inp)
    Fg = inp["F"].clone().requires_grad_()
    gz = torch.rand(B, D, I).transpose(1, 2)                         # ∂L/∂z in z's layout (as the fused op gives it)

    def op_fwd():
        with torch.no_grad():
            pf.masked_gap(inp["F"], inp["masks"])

    def op_fwdbwd():
        Fg.grad = None
        pf.masked_gap(Fg, inp["masks"]).backward(gz)

    def floor_fwdbwd():
        floor.gap()
        floor.gap_backward()

    flops = 2 * D * B * I * H * W
    res = interleaved({"bmm floor fwd": floor.gap, "masked_gap fwd": op_fwd,
                       "bmm floor fwd+bwd (2 bmm)": floor_fwdbwd, "masked_gap fwd+bwd": op_fwdbwd},
                      max(args.repeats, 15))
    _table(f"1. masked_gap alone ({flops / 1e9:.2f} GFLOP per bmm)", res, "bmm floor fwd")
    for i, stat in enumerate(("median", "min")):
        print(f"  masked_gap / floor ({stat}): forward {res['masked_gap fwd'][i] / res['bmm floor fwd'][i]:.2f}x, "
              f"forward+backward {res['masked_gap fwd+bwd'][i] / res['bmm floor fwd+bwd (2 bmm)'][i]:.2f}x; "
              f"forward at {flops / res['masked_gap fwd'][i] / 1e6:.1f} GFLOP/s")
    if args.only_gap:
        return 0

    # ------------------------------------------------------------------ part 2: the head, fwd + bwd
    steps = {"straightforward (5-D product)": Step(loss_straightforward, inp),
             "protofast": Step(loss_protofast, inp), "gemm floor (fwd+bwd)": HeadFloor(inp)}
    l_a, l_b = steps["straightforward (5-D product)"](), steps["protofast"]()
    agree = abs(l_a - l_b) <= 1e-3 * max(1.0, abs(l_a))
    print(f"\nloss: straightforward {l_a:.6f}, protofast {l_b:.6f} ({'agree' if agree else 'DISAGREE'})")
    res = interleaved(steps, args.repeats)
    _table("2. DProtoNet head forward + backward", res, "protofast")
    for i, stat in enumerate(("median", "min")):
        s, p, g = (res[k][i] for k in steps)
        print(f"  ({stat}) straightforward / protofast = {s / p:.2f}x time; protofast / GEMM floor = {p / g:.2f}x")
    if not args.no_memory:
        mem = {k: peak_memory_mb(steps[k]) for k in ("straightforward (5-D product)", "protofast")}
        a, b = mem.values()
        print(f"\npeak memory (fwd+bwd, MB above the inputs): straightforward {a:.1f}, protofast {b:.1f}: "
              f"protofast uses {b / a:.3f} of it (1/{a / b:.0f}); target <= 1/10: {'met' if b <= a / 10 else 'NOT met'}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

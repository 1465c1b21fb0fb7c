"""ProtoMask head and view cropping: protofast vs the straightforward PyTorch formulation (one process, interleaved).

Head (forward + backward), at quanproto's sizes by default (B = 16 images × V = 11 views, D = 1280, M = 2000
prototypes, K = 200): view embeddings e → distances → min over views → log-similarity (ε = 1e-14) → last layer →
CE + 0.8·clst − 0.2·sep + 0.2·div (div without gradient, as quanproto).

- "quanproto": the original's way: e as a [B·V, D, 1, 1] map, L2SquaredConv2d (conv of e² with a fresh all-ones
  [M, D, 1, 1] tensor, conv with the prototypes, + ‖p‖², relu, NaN check), view [B, V, M], min over views,
  LogActivation, Linear, multiply-then-max cluster/separation with [B, M] masks, diversity from [B, N, N, D]
  difference vectors (a Python float);
- "protofast": ProtoMask.head + ProtoMask.loss (prototype_min_distances on the [B, V, D] sets, fused
  log-similarity and cluster/separation, Gram-based diversity).

Views: protofast.mask_views (one affine_grid + grid_sample over all B·V masks) vs the per-mask loop of
protofast.reference.protomask.mask_views (slice + F.interpolate), B = 16 images of 224×224 with V = 11 random
box-shaped masks, views of 224×224 (quanproto's input size), and 32×32 images → 16×16 views (the synthetic
training set's sizes), forward only.

Timings: median of interleaved rounds (wall clock); peak memory: protofast.bench.peak_memory_mb (CPU allocator,
MB = 10⁶ bytes). Run: python benchmarks/protomask_head.py [--threads N] [--rounds R] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import protofast
from protofast.bench import peak_memory_mb
from protofast.models import ProtoMask
from protofast.reference import protomask as ref


def quanproto_head(e, P, W, identity, labels, D):
    """The straightforward formulation (quanproto's ProtoMask forward + compute_loss, single label)."""
    B, V, _ = e.shape
    x = e.reshape(B * V, D, 1, 1)
    ones = torch.ones_like(P)                                              # re-allocated every call
    x2 = F.conv2d(x ** 2, ones)
    xp = F.conv2d(x, P)
    p2 = (P ** 2).sum((1, 2, 3)).view(-1, 1, 1)
    d = F.relu(x2 - 2 * xp + p2)
    if torch.isnan(d).any():                                               # the per-forward NaN check (host sync)
        raise ValueError("NaN")
    mind = d.squeeze().view(B, V, -1).min(dim=1)[0]
    sim = torch.log((1 + mind) / (mind + 1e-14))
    logits = F.linear(sim, W)
    ce = F.cross_entropy(logits, labels)
    max_dist = D
    T = identity[:, labels].t()
    inv, _ = torch.max((max_dist - mind) * T, dim=1)
    clst = torch.mean(max_dist - inv)
    inv, _ = torch.max((max_dist - mind) * (1 - T), dim=1)
    sep = torch.mean(max_dist - inv)
    ids = torch.nonzero(identity[:, labels].t(), as_tuple=True)[1]
    v = P[ids].reshape(B, -1, D)
    div = torch.exp(-0.001 * torch.linalg.norm(v[:, None] - v[:, :, None], dim=-1).sum((1, 2))).mean().item()
    return ce + 0.8 * clst - 0.2 * sep + 0.2 * div


def bench_head(B, V, D, M, K, rounds):
    torch.manual_seed(0)
    net = ProtoMask(torch.nn.Identity(), K, prototypes_per_class=M // K, embedding_dim=D, backbone_channels=D)
    e0 = torch.rand(B, V, D)
    labels = torch.randint(0, K, (B,))
    P, W, I = net.prototype_vectors, net.last_layer.weight, net.prototype_class_identity
    W.requires_grad_(True)

    def run_quanproto():
        e = e0.clone().requires_grad_()
        loss = quanproto_head(e, P, W, I, labels, D)
        loss.backward()
        return loss.detach()

    def run_protofast():
        e = e0.clone().requires_grad_()
        logits, mind, _ = net.head(e)
        loss, _ = net.loss(logits, mind, labels)
        loss.backward()
        return loss.detach()

    def zero():
        P.grad = W.grad = None

    zero()
    a = run_quanproto()
    gp_a, gw_a = P.grad.clone(), W.grad.clone()
    zero()
    b = run_protofast()
    agree = (abs(float(a) - float(b)) <= 1e-3 * max(1.0, abs(float(a))) and
             torch.allclose(P.grad, gp_a, rtol=1e-3, atol=1e-5) and torch.allclose(W.grad, gw_a, rtol=1e-3, atol=1e-5))
    times = {"quanproto": [], "protofast": []}
    fns = {"quanproto": run_quanproto, "protofast": run_protofast}
    for r in range(rounds):
        order = ("quanproto", "protofast") if r % 2 == 0 else ("protofast", "quanproto")
        for name in order:
            zero()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    mem = {}
    for name in ("quanproto", "protofast"):
        zero()
        mem[name] = peak_memory_mb(fns[name])
    zero()
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, mem, agree


def bench_views(B, V, H, size, rounds):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(B, 3, H, H, generator=g)
    masks = torch.zeros(B, V, H, H, dtype=torch.bool)
    for b in range(B):
        for v in range(V):
            y0, x0 = torch.randint(0, H - 8, (2,), generator=g).tolist()
            h, w = torch.randint(4, H // 2, (2,), generator=g).tolist()
            masks[b, v, y0:y0 + h, x0:x0 + w] = torch.rand(min(h, H - y0), min(w, H - x0), generator=g) > 0.2
    fns = {"per-mask loop": lambda: ref.mask_views(images, masks, size)[0],
           "mask_views": lambda: protofast.mask_views(images, masks, size)[0]}
    err = float((fns["per-mask loop"]() - fns["mask_views"]()).abs().max())
    times = {k: [] for k in fns}
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}, err


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, V, D, M, K = (4, 5, 64, 100, 10) if args.quick else (16, 11, 1280, 2000, 200)
    H, size = (64, 32) if args.quick else (224, 224)
    print(f"threads {torch.get_num_threads()}, rounds {args.rounds} (interleaved, median)")
    t, mem, agree = bench_head(B, V, D, M, K, args.rounds)
    print(f"ProtoMask head fwd+bwd, B={B} x V={V} views, D={D}, M={M}, K={K} (losses/gradients agree: {agree})")
    for name in ("quanproto", "protofast"):
        print(f"  {name:10s} {t[name]:9.2f} ms   peak {mem[name]:8.2f} MB")
    print(f"  protofast / quanproto: time {t['protofast'] / t['quanproto']:.2f}x, "
          f"peak memory {mem['protofast'] / max(mem['quanproto'], 1e-9):.2f}x")
    for H, size in ((H, size), (32, 16)) if not args.quick else ((H, size),):
        t, err = bench_views(B, V, H, size, args.rounds)
        print(f"mask views forward, B={B} x V={V} masks, {H}x{H} images -> {size}x{size} (max |diff| {err:.1e})")
        for name, ms in t.items():
            print(f"  {name:14s} {ms:9.2f} ms")
        print(f"  mask_views / per-mask loop: time {t['mask_views'] / t['per-mask loop']:.2f}x")


if __name__ == "__main__":
    main()

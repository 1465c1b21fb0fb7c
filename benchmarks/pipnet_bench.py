"""PIP-Net loss benchmark: M-Nauta/PIPNet's eager loss vs protofast.pipnet_losses, one process, interleaved rounds.

    python benchmarks/pipnet_bench.py                         # 2 x 32 and 2 x 64 views, D=768, 26x26, K=200
    python benchmarks/pipnet_bench.py --batch 32 --rounds 7 --json pipnet.json
    PROTOFAST_BACKEND=torch python benchmarks/pipnet_bench.py # protofast's chunked torch path instead of C++

One step = forward + backward of the train-phase loss (5·L_A + 2·L_T + 2·L_C) from the backbone features
a [2B, D, H, W] (a leaf that requires grad, standing in for the backbone output) and the classifier Wc [K, D]:

- original: ``protofast.reference.pipnet.original_forward`` + ``original_calculate_loss`` (M-Nauta/PIPNet's
  Softmax add-on, AdaptiveMaxPool2d + Flatten, NonNegLinear and ``calculate_loss`` with its chunk / flatten /
  permute / einsum), eager;
- protofast: ``protofast.pipnet_losses(a, y, Wc)``.

Time: median (and min) wall-clock ms over interleaved rounds after one warm-up each. Peak memory:
``protofast.bench.peak_memory_mb`` (the profiler's allocation trace, MB above what was allocated before the step;
the gradients of a and Wc are allocated inside the step by both). Each provider's loss and gradients are checked
against the other's before timing. Prints a table and the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import protofast
from protofast import bench
from protofast.reference import pipnet as ref

PROVIDERS = ("original", "protofast")


def make_inputs(views_per_batch: int, dim: int, size: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = (2.0 * torch.randn(2 * views_per_batch, dim, size, size, generator=g)).requires_grad_()
    Wc = (1.0 + 0.1 * torch.randn(classes, dim, generator=g)).requires_grad_()
    y = torch.randint(0, classes, (views_per_batch,), generator=g)
    return a, Wc, y


def step(provider: str, a, Wc, y):
    a.grad = None
    Wc.grad = None
    if provider == "original":
        proto_features, pooled, out = ref.original_forward(a, Wc)
        loss = ref.original_calculate_loss(proto_features, pooled, out, y, 5.0, 2.0, 2.0, 2.0, False, False,
                                           torch.nn.NLLLoss())
    else:
        loss = protofast.pipnet_losses(a, y, Wc, phase="train").loss
    loss.backward()
    return loss.detach()


def run(batches=(32, 64), dim=768, size=26, classes=200, rounds=5, threads=None, seed=0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    result = {"environment": bench.environment(), "protofast_info": bench.protofast_info(),
              "config": {"dim": dim, "size": size, "classes": classes, "rounds": rounds, "phase": "train",
                         "step": "forward + backward of the loss w.r.t. features and classifier"},
              "rows": []}
    for B in batches:
        a, Wc, y = make_inputs(B, dim, size, classes, seed)
        # agreement (values and gradients) before timing
        got = {}
        for p in PROVIDERS:
            loss = step(p, a, Wc, y)
            got[p] = (loss, a.grad.clone(), Wc.grad.clone())
        (l0, ga0, gw0), (l1, ga1, gw1) = got["original"], got["protofast"]
        agree = (abs(float(l0) - float(l1)) <= 1e-4 * max(1.0, abs(float(l0)))
                 and torch.allclose(ga0, ga1, rtol=1e-3, atol=1e-6 * float(ga0.abs().max()))
                 and torch.allclose(gw0, gw1, rtol=1e-3, atol=1e-6 * float(gw0.abs().max())))
        del got, ga0, ga1, gw0, gw1
        times = {p: [] for p in PROVIDERS}
        for _ in range(rounds):
            for p in PROVIDERS:
                t0 = time.perf_counter()
                step(p, a, Wc, y)
                times[p].append((time.perf_counter() - t0) * 1e3)
        peaks = {}
        for p in PROVIDERS:
            a.grad = Wc.grad = None      # freed before the trace starts: the step allocates its own gradients
            peaks[p] = bench.peak_memory_mb(lambda: step(p, a, Wc, y))
        a.grad = Wc.grad = None
        row = {"views": f"2 x {B}", "batch": 2 * B, "agree": bool(agree), "loss": float(l0),
               "input_mb": a.numel() * a.element_size() / 1e6}
        for p in PROVIDERS:
            row[p] = {"median_ms": statistics.median(times[p]), "min_ms": min(times[p]), "times_ms": times[p],
                      "peak_mb": peaks[p]}
        row["time_ratio"] = row["protofast"]["median_ms"] / row["original"]["median_ms"]
        row["peak_ratio"] = row["protofast"]["peak_mb"] / row["original"]["peak_mb"]
        result["rows"].append(row)
        del a, Wc
    return result


def format_table(result: dict) -> str:
    cfg = result["config"]
    env = result["environment"]
    lines = [f"PIP-Net train-phase loss, forward + backward: D={cfg['dim']}, {cfg['size']}x{cfg['size']}, "
             f"K={cfg['classes']}; {cfg['rounds']} interleaved rounds; {env['cpu']}, "
             f"{env['torch_num_threads']} threads, backend {(result['protofast_info'] or {}).get('cpu_backend')}",
             f"{'views':>8} {'input MB':>9} {'original ms':>12} {'protofast ms':>13} {'time ratio':>11} "
             f"{'orig peak MB':>13} {'pf peak MB':>11} {'peak ratio':>11} {'agree':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['views']:>8} {r['input_mb']:9.0f} {r['original']['median_ms']:12.1f} "
                     f"{r['protofast']['median_ms']:13.1f} {r['time_ratio']:11.3f} {r['original']['peak_mb']:13.0f} "
                     f"{r['protofast']['peak_mb']:11.0f} {r['peak_ratio']:11.3f} {str(r['agree']):>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64], help="images per view (2B = 2 x this)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--size", type=int, default=26)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result = run(tuple(args.batch), args.dim, args.size, args.classes, args.rounds, args.threads, args.seed)
    print(format_table(result))
    print(json.dumps(result["rows"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(r["agree"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

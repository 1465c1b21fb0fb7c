"""ProtoNMF's per-class NMF: protofast.batched_nmf vs a scikit-learn loop vs a straightforward torch loop.

    python benchmarks/nmf_bench.py            # 200 classes × 30 images × 7×7 × D=512, ranks 3 and 10
    python benchmarks/nmf_bench.py --quick    # 20 classes, for a smoke run

Data: per class A = relu(W H + noise − shift) (1470 × 512, about half the entries 0, like ReLU features), a
rank-16 non-negative product plus Gaussian noise, so that NMF is meaningful. Every provider starts from the SAME
initial factors (protofast's DFF init, seed 0 per class) and runs 200 multiplicative updates without early
stopping (scikit-learn ``NMF(solver="mu", init="custom", beta_loss="frobenius", max_iter=200, tol=0)`` with
W = E0, H = B0); protofast is also timed with its default early stopping (tol = 1e-4, DFF's rule).

Timing: the classes are processed in chunks of ``--chunk`` classes, and on every chunk the providers run one
after another (interleaved, so a noisy neighbour hurts all of them alike). The scikit-learn and torch loops,
which are slow, run on the first ``--baseline-classes`` classes only (default 40); their ratios are taken over
exactly those classes (per-class fits are independent, so the time per class is what is compared). protofast
also runs all classes in one call (``ratio_sklearn_over_protofast_one_call`` compares time per class). All providers use torch's / OpenBLAS's
default thread count (printed). Final errors ‖A − E B‖_F are compared class by class (must agree within 1 %).

Equal final error (the issue's criterion): protofast also runs accelerated multiplicative updates
(``inner_updates=20``: the E rule 20 times per pass over A with A Bᵀ and B Bᵀ fixed, then the B rule 20 times;
Gillis & Glineur 2012). Before the timings, untimed, the benchmark finds the smallest even number T of such
updates after which EVERY baseline class's error is at or below its error after 200 plain updates; the timed run
then does exactly T updates per class (interleaved with the others), and its final errors are compared with
scikit-learn's class by class (reported: max and mean relative difference, classes at or below). The same
accelerated updates are also timed with the library's default stopping rule (max_iter 200, tol 1e-4: nothing
tuned), with their final errors.

``--threads N`` sets torch's threads and scikit-learn's BLAS threads (threadpoolctl) to N for every provider.

Bandwidth: the fused kernel reads A once per update (plus once per error check). The floor for reading all
classes' A from memory is measured with a timed ``torch.sum`` over A itself (hundreds of MB, far above the L3);
protofast runs classes in cache-sized blocks, so most of its reads hit the cache and it can beat that floor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import protofast
from protofast.ops.nmf import initial_factors


def make_features(K: int, n: int, D: int, seed: int = 0, true_rank: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(K, n, D)
    for k in range(K):
        W = torch.randn(n, true_rank, generator=g).abs()
        H = torch.randn(true_rank, D, generator=g).abs()
        Z = W @ H / true_rank
        A[k] = torch.relu(Z - Z.mean() + 0.5 * torch.randn(n, D, generator=g))
    return A


def torch_loop(A: torch.Tensor, E0: torch.Tensor, B0: torch.Tensor, iters: int, eps: float = 1e-7):
    """The straightforward way (DFF's code, class by class): dense mm's, [n, p] and [p, D] temporaries."""
    errs = []
    for k in range(A.shape[0]):
        a, E, B = A[k], E0[k].clone(), B0[k].clone()
        for _ in range(iters):
            den = E @ (B @ B.t())
            den[den == 0] = eps
            E *= (a @ B.t()) / den
            den = (E.t() @ E) @ B
            den[den == 0] = eps
            B *= (E.t() @ a) / den
        errs.append(float(torch.linalg.norm(a - E @ B)))
    return errs


def sklearn_loop(A: torch.Tensor, E0: torch.Tensor, B0: torch.Tensor, iters: int):
    from sklearn.decomposition import NMF

    errs = []
    for k in range(A.shape[0]):
        model = NMF(E0.shape[2], solver="mu", init="custom", beta_loss="frobenius", max_iter=iters, tol=0)
        model.fit_transform(A[k].numpy(), W=E0[k].numpy().copy(), H=B0[k].numpy().copy())
        errs.append(float(model.reconstruction_err_))
    return errs


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def accelerated_updates_needed(A, E0, B0, rank, iters, inner):
    """Untimed: the smallest even number of accelerated updates (``inner_updates=inner``) after which EVERY class
    has an error at or below its error after ``iters`` plain updates (scikit-learn's error, to ~1e-6)."""
    target = protofast.batched_nmf(A, rank, max_iter=iters, tol=0, E0=E0, B0=B0).err
    for T in range(2, iters + 1, 2):
        r = protofast.batched_nmf(A, rank, max_iter=T, tol=0, E0=E0, B0=B0, inner_updates=inner)
        if bool((r.err <= target).all()):
            return T
    return iters


def run_rank(A, rank, iters, chunk, sklearn_classes, skip_sklearn, inner, accel_iters):
    import warnings

    K, n, D = A.shape
    lengths = torch.full((K,), n)
    E0, B0 = initial_factors(A, lengths, rank, seed=0)
    S0 = min(K, sklearn_classes)
    if accel_iters is None:
        accel_iters = accelerated_updates_needed(A[:S0], E0[:S0], B0[:S0], rank, iters, inner)
    times = {"protofast": 0.0, "torch_loop": 0.0, "sklearn": 0.0, "protofast_on_baseline_classes": 0.0,
             "protofast_accelerated": 0.0, "protofast_accelerated_early_stopping": 0.0}
    errs = {"protofast": [], "torch_loop": [], "sklearn": [], "protofast_accelerated": [],
            "protofast_accelerated_early_stopping": []}
    es_updates = []
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        a, e0, b0 = A[k0:k1], E0[k0:k1], B0[k0:k1]
        dt, r = timed(lambda: protofast.batched_nmf(a, rank, max_iter=iters, tol=0, E0=e0, B0=b0))
        times["protofast"] += dt
        errs["protofast"] += r.err.tolist()
        if k0 >= sklearn_classes:
            print(f"  rank {rank}: classes {k0}..{k1 - 1} done (protofast only)", file=sys.stderr, flush=True)
            continue
        dt_a, r_a = timed(lambda: protofast.batched_nmf(a, rank, max_iter=accel_iters, tol=0, E0=e0, B0=b0,
                                                        inner_updates=inner))
        times["protofast_accelerated"] += dt_a
        errs["protofast_accelerated"] += r_a.err.tolist()
        # the same accelerated updates with the library's default stopping (max_iter 200, tol 1e-4): no tuning
        dt_e, r_e = timed(lambda: protofast.batched_nmf(a, rank, E0=e0, B0=b0, inner_updates=inner))
        times["protofast_accelerated_early_stopping"] += dt_e
        errs["protofast_accelerated_early_stopping"] += r_e.err.tolist()
        es_updates += r_e.n_iter.tolist()
        dt_t, e = timed(lambda: torch_loop(a, e0, b0, iters))
        times["torch_loop"] += dt_t
        times["protofast_on_baseline_classes"] += dt
        errs["torch_loop"] += e
        if not skip_sklearn:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: max_iter reached (intended)
                dt_s, e = timed(lambda: sklearn_loop(a, e0, b0, iters))
            times["sklearn"] += dt_s
            errs["sklearn"] += e
        print(f"  rank {rank}: classes {k0}..{k1 - 1} done", file=sys.stderr, flush=True)

    # all classes in one call, with and without early stopping (one run each)
    dt_all, r_all = timed(lambda: protofast.batched_nmf(A, rank, max_iter=iters, tol=0, E0=E0, B0=B0))
    dt_es, r_es = timed(lambda: protofast.batched_nmf(A, rank, max_iter=iters, E0=E0, B0=B0))

    pf = torch.tensor(errs["protofast"], dtype=torch.float64)
    tl = torch.tensor(errs["torch_loop"], dtype=torch.float64)
    S = len(tl)
    out = {
        "rank": rank,
        "classes": K,
        "iters": iters,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "protofast_all_classes_one_call_s": round(dt_all, 3),
        "protofast_early_stopping_s": round(dt_es, 3),
        "early_stopping_mean_updates": float(r_es.n_iter.double().mean()),
        "early_stopping_err_increase_vs_200_max_rel": float(((r_es.err - r_all.err) / r_all.err).max()),
        "ms_per_update_all_classes": round(1e3 * dt_all / iters, 2),
        "baseline_classes": S,
        "ratio_torch_loop_over_protofast": round(times["torch_loop"] / times["protofast_on_baseline_classes"], 2),
        "err_rel_diff_vs_torch_loop_max": float(((pf[:S] - tl).abs() / tl).max()),
        "err_rel_diff_chunked_vs_one_call_max": float(((pf - r_all.err).abs() / r_all.err).max()),
    }
    if errs["sklearn"]:
        sk = torch.tensor(errs["sklearn"], dtype=torch.float64)
        out["ratio_sklearn_over_protofast"] = round(times["sklearn"] / times["protofast_on_baseline_classes"], 2)
        out["ratio_sklearn_over_protofast_one_call"] = round((times["sklearn"] / S) / (dt_all / K), 2)
        out["ratio_sklearn_over_protofast_early_stopping"] = round((times["sklearn"] / S) / (dt_es / K), 2)
        out["ratio_sklearn_over_torch_loop"] = round(times["sklearn"] / times["torch_loop"], 2)
        out["err_rel_diff_vs_sklearn_max"] = float(((pf[:S] - sk).abs() / sk).max())
        out["err_rel_diff_early_stopping_vs_sklearn_max"] = float(((r_es.err[:S] - sk).abs() / sk).max())
        # accelerated MU: time to (at most) scikit-learn's final error
        ac = torch.tensor(errs["protofast_accelerated"], dtype=torch.float64)
        out["accelerated"] = {
            "inner_updates": inner, "updates": accel_iters,
            "ratio_sklearn_over_protofast": round(times["sklearn"] / times["protofast_accelerated"], 2),
            "err_rel_diff_vs_sklearn_max": float(((ac - sk) / sk).max()),
            "err_rel_diff_vs_sklearn_mean": float(((ac - sk) / sk).mean()),
            "classes_with_err_at_most_sklearn": int((ac <= sk).sum()),
        }
        ae = torch.tensor(errs["protofast_accelerated_early_stopping"], dtype=torch.float64)
        out["accelerated_early_stopping"] = {
            "inner_updates": inner, "updates_mean": sum(es_updates) / len(es_updates),
            "ratio_sklearn_over_protofast": round(times["sklearn"] / times["protofast_accelerated_early_stopping"], 2),
            "err_rel_diff_vs_sklearn_max": float(((ae - sk) / sk).max()),
            "err_rel_diff_vs_sklearn_mean": float(((ae - sk) / sk).mean()),
            "classes_with_err_at_most_sklearn": int((ae <= sk).sum()),
        }
    return out


def bandwidth_floor(A: torch.Tensor, rounds: int = 10) -> dict:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        A.sum()
        best = min(best, time.perf_counter() - t)
    nbytes = A.numel() * A.element_size()
    return {"bytes": nbytes, "sum_seconds_min": round(best, 4), "GB_per_s": round(nbytes / best / 1e9, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 classes (smoke run)")
    p.add_argument("--classes", type=int, default=None, help="number of classes (default 200, --quick 20)")
    p.add_argument("--ranks", type=int, nargs="+", default=[3, 10])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--chunk", type=int, default=10, help="classes per interleaved chunk")
    p.add_argument("--baseline-classes", type=int, default=40,
                   help="classes the scikit-learn and torch loops run on (they are slow; their ratios are per class, "
                        "over exactly these classes)")
    p.add_argument("--no-sklearn", action="store_true")
    p.add_argument("--inner-updates", type=int, default=20,
                   help="accelerated MU provider: E and B rules applied this many times per update (default 20)")
    p.add_argument("--accel-iters", type=int, default=None,
                   help="updates of the accelerated provider (default: found before the timings, untimed: the "
                        "smallest even count at which every baseline class's error is at or below its error after "
                        "--iters plain updates; the final errors are then compared with scikit-learn's)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of torch and of scikit-learn's BLAS (default: their defaults)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            print("threadpoolctl is not installed: scikit-learn's BLAS keeps its default threads", file=sys.stderr)
    K = args.classes or (20 if args.quick else 200)
    n, D = 30 * 7 * 7, 512

    print(f"protofast NMF benchmark: {K} classes × {n} rows × D={D}, {args.iters} updates, ranks {args.ranks}; "
          f"torch threads {torch.get_num_threads()}, backend {protofast.info()['cpu_backend']}, "
          f"MALLOC settings: {os.environ.get('MALLOC_ARENA_MAX', 'default')}", flush=True)
    A = make_features(K, n, D)
    print(f"features: {A.numel() * 4 / 1e6:.0f} MB, {float((A == 0).double().mean()):.2f} of entries are 0",
          flush=True)
    protofast.batched_nmf(A[:1], 3, max_iter=2)  # build/load the C++ kernel outside the timings
    results = {"machine": platform.platform(), "threads": torch.get_num_threads(), "classes": K,
               "rows": n, "D": D, "iters": args.iters, "bandwidth_floor": bandwidth_floor(A), "ranks": []}
    bw = results["bandwidth_floor"]
    for rank in args.ranks:
        r = run_rank(A, rank, args.iters, args.chunk, args.baseline_classes, args.no_sklearn, args.inner_updates,
                     args.accel_iters)
        r["dram_floor_ms_per_update"] = round(1e3 * bw["sum_seconds_min"], 2)
        results["ranks"].append(r)
        print(json.dumps(r, indent=1), flush=True)
    print(f"memory-bandwidth floor: reading A ({bw['bytes'] / 1e6:.0f} MB) takes {bw['sum_seconds_min'] * 1e3:.1f} ms "
          f"({bw['GB_per_s']} GB/s, timed torch.sum)")
    for r in results["ranks"]:
        line = (f"rank {r['rank']}: protofast {r['ms_per_update_all_classes']} ms per update of all {K} classes "
                f"(DRAM floor for one read of A: {r['dram_floor_ms_per_update']} ms); torch loop / protofast = "
                f"{r['ratio_torch_loop_over_protofast']}× (over {r['baseline_classes']} classes)")
        if "ratio_sklearn_over_protofast" in r:
            line += (f"; sklearn / protofast = {r['ratio_sklearn_over_protofast']}× ({r['iters']} updates each; "
                     f"{r['ratio_sklearn_over_protofast_one_call']}× per class against the one call on all classes), "
                     f"{r['ratio_sklearn_over_protofast_early_stopping']}× with protofast's early stopping; "
                     f"max final-error difference vs sklearn {100 * r['err_rel_diff_vs_sklearn_max']:.4f} % "
                     f"({100 * r['err_rel_diff_early_stopping_vs_sklearn_max']:.3f} % early-stopped)")
            ac = r["accelerated"]
            line += (f"\n  at equal final error: sklearn ({r['iters']} plain updates) / protofast ({ac['updates']} "
                     f"accelerated updates, inner_updates={ac['inner_updates']}) = {ac['ratio_sklearn_over_protofast']}×; "
                     f"protofast's final error vs sklearn's: max {100 * ac['err_rel_diff_vs_sklearn_max']:+.4f} %, "
                     f"mean {100 * ac['err_rel_diff_vs_sklearn_mean']:+.4f} %, "
                     f"{ac['classes_with_err_at_most_sklearn']}/{r['baseline_classes']} classes at or below sklearn's")
            ae = r["accelerated_early_stopping"]
            line += (f"\n  accelerated with the default early stopping (tol 1e-4, mean {ae['updates_mean']:.1f} updates): "
                     f"sklearn / protofast = {ae['ratio_sklearn_over_protofast']}×; final error vs sklearn's: max "
                     f"{100 * ae['err_rel_diff_vs_sklearn_max']:+.4f} %, mean {100 * ae['err_rel_diff_vs_sklearn_mean']:+.4f} %, "
                     f"{ae['classes_with_err_at_most_sklearn']}/{r['baseline_classes']} at or below")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

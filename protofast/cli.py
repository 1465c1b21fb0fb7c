"""The ``protofast`` command line.

``protofast info [--json]``
    versions, threads and the backends that run the ops (``protofast.info()``).
``protofast bench [--full] [--out PATH] [--backend cpp|torch] [--repeats N] ...``
    the ProtoPNet-head benchmark (:mod:`protofast.bench`): prints a table of ms, ratio to the original way,
    ratio to the GEMM floor and peak MB, then the acceptance checks; writes the results as JSON. It is a report:
    it exits 0 whatever the checks say (1 only if the providers disagree on the loss value, or on bad usage).

``python -m protofast.cli ...`` works too. Heavy imports (torch) happen inside the commands only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

DEFAULT_OUT = "protofast-bench.json"


def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value) if value else "-"
    return str(value)


def _format_info(info: dict, indent: int = 0) -> List[str]:
    """Nested dict -> aligned ``key: value`` lines, sub-dicts indented under their key."""
    lines = []
    width = max((len(str(k)) for k in info), default=0)
    pad = " " * indent
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.extend(_format_info(value, indent + 2) if value else [f"{pad}  -"])
        else:
            lines.append(f"{pad}{str(key).ljust(width)}  {_format_value(value)}")
    return lines


def _collect_info() -> dict:
    import protofast

    info = getattr(protofast, "info", None)
    if info is not None:
        return info()
    # protofast without its public API (partial checkout): report what can be known
    import platform

    import torch

    from protofast._version import __version__

    return {"protofast": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "threads": torch.get_num_threads(),
            "note": "protofast.info() is not available in this installation"}


def cmd_info(args: argparse.Namespace) -> int:
    info = _collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(_format_info(info)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.backend:
        os.environ["PROTOFAST_BACKEND"] = args.backend   # read by protofast at every call
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from . import bench

    batches = args.batch_sizes or (bench.FULL_BATCHES if args.full else bench.QUICK_BATCHES)
    providers = args.providers or (bench.PROVIDERS if args.full else bench.QUICK_PROVIDERS)
    repeats = args.repeats if args.repeats is not None else (10 if args.full else 7)
    try:
        result = bench.run_suite(batches=batches, providers=providers, repeats=repeats, seed=args.seed, loss=args.loss,
                                 progress=not args.no_progress, measure_memory=not args.no_memory)
    except bench.ProviderMismatch as exc:
        print(f"protofast bench: {exc}", file=sys.stderr)
        return 1
    result["command"] = " ".join(["protofast"] + (args.argv or []))
    print(bench.format_report(result))
    if args.out != "-":
        bench.write_json(result, args.out)
        print(f"\nresults written to {os.path.abspath(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protofast",
                                     description="Fused kernels for prototype-based interpretable vision models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_info = sub.add_parser("info", help="versions and active backends",
                            description="Print protofast.info(): versions, threads and the backends in use.")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=cmd_info)

    p_bench = sub.add_parser(
        "bench", help="benchmark the ProtoPNet head (about a minute)",
        description="Time the ProtoPNet head (distances -> min -> log-similarity -> cluster/separation loss, "
                    "forward and forward+backward) on synthetic tensors (M=2000, D=128, 7x7, K=200): the "
                    "original way, cdist+amin, protofast and the GEMM floor (plus torch.compile with --full). "
                    "Prints median ms, ratio to the original way, ratio to the GEMM floor and peak MB, then the "
                    "acceptance checks, and writes the results as JSON. Exits 0 whatever the checks say.")
    p_bench.add_argument("--full", action="store_true",
                         help="B in {40, 80, 160, 200} and the torch.compile provider (compiles for ~30 s)")
    p_bench.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                         help=f"JSON results file (default: {DEFAULT_OUT} in the current directory; '-' for none)")
    p_bench.add_argument("--backend", choices=("cpp", "torch"),
                         help="force protofast's CPU backend (sets PROTOFAST_BACKEND)")
    p_bench.add_argument("--repeats", type=int, metavar="N",
                         help="timed rounds per batch size (default 7, --full 10); the median is reported")
    p_bench.add_argument("--batch-sizes", type=int, nargs="+", metavar="B", help="override the batch sizes")
    p_bench.add_argument("--providers", nargs="+", metavar="NAME",
                         choices=("original", "compile", "cdist", "protofast", "gemm"),
                         help="override the providers (original is always included)")
    p_bench.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) before timing")
    p_bench.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs (default 0)")
    p_bench.add_argument("--loss", choices=("head", "step"), default="head",
                         help="head: distances -> min -> log-similarity -> cluster/separation (default); "
                              "step: the full training loss, adding the last layer, cross-entropy and l1")
    p_bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except BrokenPipeError:                       # e.g. `protofast info | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

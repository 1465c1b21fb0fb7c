"""Push benchmark: protofast.push_prototypes vs the original host-side push loop, same process, interleaved.

    python benchmarks/push_bench.py                     # 2000 images, batch 75, 3 rounds, torch's thread count
    python benchmarks/push_bench.py --threads 1 --json push.json

See :mod:`protofast.push_bench` for the setup (ProtoPNet defaults, identity features to isolate the push).
"""
from __future__ import annotations

import argparse
import json
import sys

from protofast.push_bench import format_push_report, run_push_benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=75)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the raw result here")
    args = parser.parse_args(argv)
    result = run_push_benchmark(num_images=args.images, batch_size=args.batch_size, repeats=args.repeats,
                                threads=args.threads, seed=args.seed)
    print(format_push_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())

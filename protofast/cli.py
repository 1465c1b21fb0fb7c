"""The ``protofast`` command line.

``protofast info [--json]``
    versions, threads and the backends that run the ops (``protofast.info()``).
``protofast bench [--full] [--out PATH] [--backend cpp|torch] [--repeats N] ...``
    the ProtoPNet-head benchmark (:mod:`protofast.bench`): prints a table of ms, ratio to the original way,
    ratio to the GEMM floor and peak MB, then the acceptance checks; writes the results as JSON. It is a report:
    it exits 0 whatever the checks say (1 only if the providers disagree on the loss value, or on bad usage).

``protofast train protopnet [--dataset synthetic|digits] [--epochs N] [--loss minmax|mean] [--out DIR] ...``
    trains a ProtoPNet (:mod:`protofast.train`) on the embedded synthetic set (or scikit-learn's digits), printing
    per-epoch accuracy and the backbone/head time split; writes ``DIR/model.pt``, ``DIR/config.json`` (load with
    ``protofast.train.load_checkpoint(DIR)``) and ``DIR/prototypes.png``. Runs under ``torchrun`` (DDP over gloo
    on CPU; only rank 0 prints and writes).

``protofast train pipnet [--dataset synthetic|digits] [--epochs N] [--pretrain-epochs N] [--num-prototypes D] ...``
    trains a PIP-Net (:mod:`protofast.pipnet_train`), prints test accuracy, abstention on pure-noise images and
    the explanation sizes; writes ``DIR/model.pt``, ``DIR/config.json`` and ``DIR/prototypes_topk.png``.

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
    if not args.no_push:
        from . import push_bench

        print(f"\nProtoPNet push (projection): the original host-side loop vs protofast.push_prototypes, "
              f"{args.push_images} images, interleaved, {min(repeats, 3)} rounds")
        push = push_bench.run_push_benchmark(num_images=args.push_images, repeats=min(repeats, 3), seed=args.seed)
        result["push"] = push
        print(push_bench.format_push_report(push))
    if args.out != "-":
        bench.write_json(result, args.out)
        print(f"\nresults written to {os.path.abspath(args.out)}")
    return 0


#: defaults of ``protofast train protopnet`` for the synthetic set (chosen to reach >= 90 % test accuracy on a
#: 2-core CPU in well under 3 minutes; the backbone is trained from scratch, hence lrs above the original's)
TRAIN_LRS = {"features": 1e-3, "add_on_layers": 1e-3, "prototype_vectors": 1e-3, "last_layer": 1e-3}


def cmd_train(args: argparse.Namespace) -> int:
    if args.model == "dprotonet":
        from .dprotonet_train import cli_train
        return cli_train(args)
    if args.model == "protomask":
        from .protomask_train import train_protomask_cli
        return train_protomask_cli(args)
    if args.model == "pipnet":
        from .pipnet_train import cli_train_pipnet
        return cli_train_pipnet(args)
    import time

    import torch
    from torch.utils.data import DataLoader

    from . import data as pf_data
    from .models import ProtoPNet, SmallCNN
    from .train import save_checkpoint, save_prototype_figure, train_protopnet

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        try:
            train_set, test_set, num_classes = pf_data.train_test_datasets(args.dataset, args.train_size,
                                                                           args.test_size, seed=args.seed)
        except ImportError as exc:
            print(f"protofast train: {exc}", file=sys.stderr)
            return 2
        torch.manual_seed(args.seed)
        model = ProtoPNet(SmallCNN(channels=(16, 32, 32)), num_classes, prototypes_per_class=args.prototypes_per_class,
                          prototype_shape=(32, 1, 1), loss=args.loss)
        train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                  generator=torch.Generator().manual_seed(args.seed))
        test_loader = DataLoader(test_set, batch_size=256)
        say(f"protofast train protopnet: {args.dataset} ({len(train_set)} train / {len(test_set)} test, "
            f"{num_classes} classes), loss {args.loss}, {model.num_prototypes} prototypes "
            f"{tuple(model.prototype_shape[1:])}, {sum(p.numel() for p in model.parameters())} parameters, "
            f"{torch.get_num_threads()} threads" + (f", {torch.distributed.get_world_size()} processes (DDP, gloo)"
                                                     if distributed else ""))
        result = train_protopnet(model, train_loader, test_loader, args.epochs, args.loss,
                                 warm_epochs=min(args.warm_epochs, args.epochs),
                                 last_layer_iters=args.last_layer_iters, lrs=TRAIN_LRS, lr_scale=args.lr_scale,
                                 progress=not args.no_progress, seed=args.seed)
        train_rows = [r for r in result.history if "backbone_s" in r]
        backbone = sum(r["backbone_s"] for r in train_rows)
        head = sum(r["head_s"] for r in train_rows)
        say(f"final test accuracy {result.test_acc:.4f}; training {result.seconds:.1f} s "
            f"(backbone {backbone:.1f} s, prototype head {head:.1f} s)")
        purity = None
        if rank == 0 and hasattr(train_set, "part_locations"):
            from .metrics import part_purity

            purity = part_purity(model, train_set, k=10)
            say(f"part purity (10 nearest training patches per prototype): mean {purity.mean_purity:.2f}, "
                f"on the class's own parts {float(purity.on_class_part.mean()):.2f}")
        if rank == 0:
            extra = {"train": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
                     "test_acc": result.test_acc, "seconds": result.seconds, "history": result.history}
            if purity is not None:
                extra["part_purity"] = {"mean": purity.mean_purity, "per_prototype": purity.purity.tolist(),
                                        "on_class_part": purity.on_class_part.tolist()}
            save_checkpoint(model, args.out, extra=extra)
            say(f"checkpoint written to {os.path.abspath(args.out)} (model.pt, config.json)")
            if not args.no_figure:
                t0 = time.perf_counter()
                try:
                    path = save_prototype_figure(model, train_set, test_set, os.path.join(args.out, "prototypes.png"))
                    say(f"figure written to {os.path.abspath(path)} ({time.perf_counter() - t0:.1f} s)")
                except ImportError as exc:
                    say(f"no figure: {exc}")
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
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
    p_bench.add_argument("--no-push", action="store_true",
                         help="skip the push benchmark (original host-side loop vs protofast.push_prototypes)")
    p_bench.add_argument("--push-images", type=int, default=2000, metavar="N",
                         help="images in the push benchmark (default 2000)")
    p_bench.set_defaults(func=cmd_bench)

    p_train = sub.add_parser(
        "train", help="train a ProtoPNet, PIP-Net, DProtoNet or ProtoMask on the synthetic set (minutes)",
        description="Train a reference model (small CNN backbone) on the synthetic set with its original schedule "
                    "(protopnet: warm/joint/push/last-layer; pipnet: backbone warm-up, [pretrain], train with the "
                    "weight shrink; dprotonet: warm/joint with multi-image prototype updates; protomask: joint, "
                    "push, fine-tune), print per-epoch accuracy and the model's own metrics, and write a checkpoint "
                    "into --out. protopnet also writes prototypes.png and runs under torchrun (DDP, gloo on CPU).")
    p_train.add_argument("model", choices=("protopnet", "pipnet", "dprotonet", "protomask"),
                         help="the architecture")
    p_train.add_argument("--dataset", choices=("synthetic", "digits"), default="synthetic",
                         help="synthetic: protofast.data.SyntheticParts (default); digits: scikit-learn's digits")
    p_train.add_argument("--epochs", type=int, default=20, help="warm + joint epochs (default 20)")
    p_train.add_argument("--warm-epochs", type=int, default=1, help="warm epochs among them (default 1)")
    p_train.add_argument("--last-layer-iters", type=int, default=5,
                         help="last-layer passes after the final push (default 5)")
    p_train.add_argument("--loss", choices=("minmax", "mean"), default="minmax",
                         help="minmax: cluster/separation (the original, default); mean: mean-distance loss")
    p_train.add_argument("--batch-size", type=int, default=32, help="batch size per process (default 32)")
    p_train.add_argument("--lr-scale", type=float, default=1.0, help="multiplies every learning rate")
    p_train.add_argument("--prototypes-per-class", type=int, default=2,
                         help="default 2 (each synthetic class has two parts)")
    p_train.add_argument("--train-size", type=int, default=2000, help="synthetic training images (default 2000)")
    p_train.add_argument("--test-size", type=int, default=1000, help="synthetic test images (default 1000)")
    p_train.add_argument("--out", default="protofast-protopnet", metavar="DIR",
                         help="output directory (default ./protofast-protopnet)")
    p_train.add_argument("--seed", type=int, default=0, help="seed of the data and the initialisation")
    p_train.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_train.add_argument("--no-figure", action="store_true", help="skip prototypes.png")
    from .protomask_train import add_cli_options as _protomask_options
    _protomask_options(p_train)
    p_train.add_argument("--num-masks", type=int, default=64, help="dprotonet: feature masks I (default 64)")
    p_train.add_argument("--copies", type=int, default=10,
                         help="dprotonet: augmented copies R per prototype update (default 10)")
    p_train.add_argument("--update-every", type=int, default=10,
                         help="dprotonet: multi-image prototype update every N epochs and after the last (default 10)")
    p_train.add_argument("--pretrain-epochs", type=int, metavar="N",
                         help="pipnet: self-supervised pretraining epochs (align + tanh) before --epochs "
                              "(default 0: on the warmed-up SmallCNN it lowers the accuracy reached)")
    p_train.add_argument("--num-prototypes", type=int, metavar="D",
                         help="pipnet: prototypes D (a 1x1 conv add-on; default 32)")
    p_train.add_argument("--backbone-warmup-epochs", type=int, default=8, metavar="N",
                         help="pipnet: supervised warm-up epochs of the from-scratch backbone, the stand-in for "
                              "the original's ImageNet-pretrained backbone (default 8)")
    p_train.add_argument("--weight-shrink", type=float, metavar="S",
                         help="pipnet: subtracted from every classifier weight after each step of the schedule "
                              "(default 1e-3, the original's; the classifier-only phase sparsifies afterwards)")
    p_train.add_argument("--part-sets", action=argparse.BooleanOptionalAction, default=None,
                         help="pipnet: train on protofast.pipnet_train.SyntheticPartSets (8 classes, one part each at "
                              "a random place; SmallCNN without coordinates; the default) or, with --no-part-sets, on "
                              "SyntheticParts (10 classes of parts in given quadrants; SmallCNN with coordinates)")
    p_train.add_argument("--align-weight", type=float, metavar="W",
                         help="pipnet: weight of the align loss in the training phase (default 0.1; the original's 5 "
                              "makes one background prototype swallow the parts of some classes here)")
    p_train.add_argument("--augment-noise", type=float, metavar="S",
                         help="pipnet: standard deviation of the per-view pixel noise of the two-view augmentation "
                              "(default 0.03)")
    p_train.add_argument("--trivial-ops", metavar="OPS",
                         help="pipnet: per-view TrivialAugment colour ops, one drawn per view: 'original' (the "
                              "original's 8: identity, brightness, color, contrast, sharpness, posterize, "
                              "autocontrast, equalize), 'none', or a comma-separated list (a name given twice is "
                              "drawn twice as often); default: see docs/pipnet.md")
    p_train.add_argument("--clutter", type=int, default=0, metavar="N",
                         help="pipnet: paint N random rectangles (bars, lines, blocks of random colour) into every "
                              "synthetic image's background, like the clutter of a natural photo (default 0)")
    p_train.add_argument("--random-part-colours", action="store_true",
                         help="pipnet: every synthetic part takes a random part colour, so parts are known by their "
                              "texture only and colour carries no class information (default: one colour per part)")
    p_train.add_argument("--classifier-only-epochs", type=int, default=80, metavar="N",
                         help="pipnet: after the schedule, N epochs of classifier-only steps (backbone and add-on "
                              "frozen) with the weight shrink on the cached presence scores of the training set "
                              "(default 80: ~5000 steps at batch 32, about a second; 0 turns the phase off)")
    p_train.add_argument("--classifier-only-optimizer", choices=("adam", "sgd"), default="sgd",
                         help="pipnet: optimizer of the classifier-only phase (adam: AdamW; sgd: momentum 0.9)")
    p_train.add_argument("--classifier-only-lr", type=float, default=0.05, metavar="LR",
                         help="pipnet: learning rate of the classifier-only phase (default 0.05, times --lr-scale)")
    p_train.add_argument("--classifier-only-weight-decay", type=float, default=0.0, metavar="WD",
                         help="pipnet: weight decay of the classifier-only phase (default 0)")
    p_train.add_argument("--classifier-only-shrink", type=float, metavar="S",
                         help="pipnet: weight shrink per classifier-only step (default 5e-3)")
    p_train.add_argument("--zero-class-independent", type=float, metavar="F",
                         help="pipnet: before the classifier-only phase, zero the classifier column of every prototype "
                              "present (score >= 0.1) on at least a fraction F (e.g. 0.99) of the training images of "
                              "every class (off by default); also after every training epoch from "
                              "--zero-class-independent-start on, while the backbone still learns")
    p_train.add_argument("--zero-class-independent-start", type=int, default=1, metavar="E",
                         help="pipnet: first training epoch after which --zero-class-independent runs (default 1)")
    p_train.set_defaults(func=cmd_train)
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

"""Training ProtoMask: a synthetic dataset with segmentation masks, quanproto's joint → push → fine-tune schedule,
and ``protofast train protomask``.

:class:`SyntheticPartsWithMasks` turns :class:`protofast.data.SyntheticParts` into ProtoMask's input: per image a
fixed number V of masks, the background (all pixels outside the pasted parts) first, then one mask per pasted
part box (``part_locations``) in reading order (top, then left), and empty masks where an image has fewer parts
(distractors are pasted with probability 1/2); the views are cut once by :func:`protofast.mask_views` and items
are ``(views [V, 3, s, s], label, view_valid [V])``.

:func:`train_protomask` follows uos-sis/quanproto (SEMANTICS.md §3.3): joint epochs (no warm-up; backbone and
prototypes in the optimiser, the add-on only with ``train_add_on``; optional StepLR), gradient accumulation over
``accumulation_steps`` batches (quanproto: batch 16 × 4), then the projection (:func:`push_protomask`, quanproto's
``reset_per_batch`` by default) and fine-tune epochs (last layer only, CE + 1e-3·l1).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data import SyntheticParts
from .models.protomask import ProtoMask, push_protomask
from .ops.views import mask_views
from .train import TrainResult

__all__ = ["SyntheticPartsWithMasks", "part_masks", "train_protomask", "evaluate_protomask"]


def part_masks(dataset: SyntheticParts, views_per_image: Optional[int] = None) -> Tensor:
    """``[N, V, S, S]`` bool masks of a :class:`SyntheticParts` set: mask 0 = background (outside every part box),
    masks 1.. = the part boxes of ``part_locations(i)`` sorted by (top, left), empty masks as padding.
    ``V`` defaults to ``1 + parts_per_class + distractors`` (the most parts an image can have)."""
    S = dataset.image_size
    V = views_per_image or 1 + dataset.parts_per_class + dataset.distractors
    masks = torch.zeros(len(dataset), V, S, S, dtype=torch.bool)
    for i in range(len(dataset)):
        boxes = dataset.part_locations(i)
        order = sorted(range(len(boxes)), key=lambda r: (int(boxes[r, 1]), int(boxes[r, 2])))
        if len(order) > V - 1:
            raise ValueError(f"image {i} has {len(order)} parts but views_per_image = {V} leaves room for {V - 1}")
        for slot, r in enumerate(order, start=1):
            _, top, left, bottom, right = (int(v) for v in boxes[r])
            masks[i, slot, top:bottom, left:right] = True
        masks[i, 0] = ~masks[i, 1:].any(0)
    return masks


class SyntheticPartsWithMasks(Dataset):
    """:class:`SyntheticParts` with segmentation masks and ProtoMask views.

    Args:
        base: the image set.
        view_size: s, the side of each view.
        fill: :func:`protofast.mask_views` background rule (``"zero"``, ``"mean"``, ``"original"``).
        views_per_image: V (default ``1 + parts_per_class + distractors``).

    Attributes: ``images [N, 3, S, S]``, ``labels [N]``, ``masks [N, V, S, S]``, ``views [N, V, 3, s, s]``,
    ``valid [N, V]``, ``base``. ``dataset[i] = (views[i], label, valid[i])``.
    """

    def __init__(self, base: SyntheticParts, view_size: int = 16, fill: str = "zero",
                 views_per_image: Optional[int] = None, chunk: int = 256):
        self.base, self.view_size, self.fill = base, int(view_size), fill
        self.images, self.labels = base.images, base.labels
        self.num_classes = base.num_classes
        self.masks = part_masks(base, views_per_image)
        views, valid = [], []
        with torch.no_grad():
            for s in range(0, len(base), chunk):
                v, ok = mask_views(self.images[s:s + chunk], self.masks[s:s + chunk], self.view_size, fill=fill)
                views.append(v)
                valid.append(ok)
        self.views, self.valid = torch.cat(views), torch.cat(valid)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        return self.views[index], int(self.labels[index]), self.valid[index]


def _split(batch):
    views, labels = batch[0], batch[1]
    valid = batch[2] if len(batch) > 2 else None
    return views, labels, valid


def evaluate_protomask(model: ProtoMask, loader, device=None) -> float:
    """Top-1 accuracy over a loader of ``(views, labels[, view_valid])``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            views, labels, valid = _split(batch)
            logits, _ = model(views.to(device), None if valid is None else valid.to(device))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)


def _epoch(model: ProtoMask, loader, optimizer, phase: str, accumulation_steps: int, device, progress: bool,
           desc: str) -> dict:
    from tqdm.auto import tqdm

    model.train()
    correct = total = 0
    loss_sum = 0.0
    term_sums: Dict[str, float] = {}
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    for step, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=not progress)):
        views, labels, valid = _split(batch)
        views, labels = views.to(device), labels.to(device)
        logits, mind = model(views, None if valid is None else valid.to(device))
        loss, terms = model.loss(logits, mind, labels, phase=phase)
        (loss / accumulation_steps).backward()
        last = n_batches is not None and step + 1 == n_batches
        if (step + 1) % accumulation_steps == 0 or last:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        n = int(labels.numel())
        correct += int((logits.detach().argmax(1) == labels).sum())
        total += n
        loss_sum += float(loss.detach()) * n
        for k, v in terms.items():
            term_sums[k] = term_sums.get(k, 0.0) + float(v) * n
    return dict(train_acc=correct / max(total, 1), train_loss=loss_sum / max(total, 1),
                **{k: v / max(total, 1) for k, v in term_sums.items() if k != "total"})


def train_protomask(model: ProtoMask, train_loader, test_loader, joint_epochs: int, fine_tune_epochs: int = 10,
                    accumulation_steps: int = 1, lrs: Optional[Dict[str, float]] = None, lr_step=None,
                    push_loader=None, push: bool = True, reset_per_batch: bool = True, progress: bool = True,
                    device=None, log=print) -> TrainResult:
    """quanproto's ProtoMask schedule: ``joint_epochs`` joint epochs, the projection over ``push_loader`` (default:
    the train set in order, no shuffle) unless ``push=False``, then ``fine_tune_epochs`` last-layer epochs.

    Args:
        accumulation_steps: optimizer step every that many batches (quanproto: 4 with batch 16); the loss is
            divided by it, so a step sees the mean gradient of the accumulated batches.
        lrs: learning rates by group name (``features, add_on_layers, prototype_vectors, last_layer``).
        lr_step: ``(step_size, gamma)`` StepLR over the joint epochs (quanproto CUB: (35, 0.5)); None: constant.
    Returns:
        :class:`protofast.train.TrainResult` (history rows per epoch, final test accuracy, seconds, push results).
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    history: List[dict] = []
    pushes = []
    start = time.perf_counter()

    def record(epoch, phase, stats, seconds):
        row = dict(epoch=epoch, phase=phase, test_acc=evaluate_protomask(model, test_loader, device),
                   seconds=seconds, **stats)
        history.append(row)
        if log:
            log(f"epoch {epoch:3d} {phase:9s} train acc {row['train_acc']:.3f} loss {row['train_loss']:.3f} "
                f"test acc {row['test_acc']:.3f} ({seconds:.1f} s)")

    optimizer = model.phase("joint", lrs)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, lr_step[0], lr_step[1]) if lr_step else None
    for epoch in range(joint_epochs):
        t0 = time.perf_counter()
        stats = _epoch(model, train_loader, optimizer, "joint", accumulation_steps, device, progress, "joint")
        if scheduler is not None:
            scheduler.step()
        record(epoch, "joint", stats, time.perf_counter() - t0)
    if push:
        if push_loader is None:
            push_loader = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size, shuffle=False)
        t0 = time.perf_counter()
        pushes.append(push_protomask(model, push_loader, reset_per_batch=reset_per_batch, device=device))
        acc = evaluate_protomask(model, test_loader, device)
        history.append(dict(epoch=joint_epochs, phase="push", test_acc=acc, seconds=time.perf_counter() - t0))
        if log:
            log(f"push: test acc {acc:.3f}")
    optimizer = model.phase("fine_tune", lrs)
    for epoch in range(fine_tune_epochs):
        t0 = time.perf_counter()
        stats = _epoch(model, train_loader, optimizer, "fine_tune", accumulation_steps, device, progress, "fine-tune")
        record(joint_epochs + epoch, "fine_tune", stats, time.perf_counter() - t0)
    test_acc = evaluate_protomask(model, test_loader, device)
    return TrainResult(history=history, test_acc=test_acc, seconds=time.perf_counter() - start, push_results=pushes)


# ---------------------------------------------------------------------------------------------- CLI
#: ``protofast train protomask`` defaults (small CNN from scratch, hence lrs above quanproto's fine-tuning ones)
CLI_LRS = {"features": 1e-3, "add_on_layers": 1e-3, "prototype_vectors": 3e-3, "last_layer": 1e-3}


def _given(args, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in getattr(args, "argv", []) or [])


def train_protomask_cli(args: argparse.Namespace) -> int:
    """``protofast train protomask --dataset synthetic``: SyntheticParts (10 classes, one part per class, no
    distractors) with masks, views of ``--view-size``, ProtoMask on a small CNN."""
    import json

    from .models import SmallCNN

    if args.dataset != "synthetic":
        print("protofast train protomask: only --dataset synthetic has segmentation masks", flush=True)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs if _given(args, "--epochs") else 12
    batch_size = args.batch_size if _given(args, "--batch-size") else 16
    per_class = args.prototypes_per_class if _given(args, "--prototypes-per-class") else 2
    out = args.out if _given(args, "--out") else "protofast-protomask"
    kw = dict(num_classes=10, image_size=32, parts_per_class=1, distractors=0, seed=args.seed)
    t0 = time.perf_counter()
    train_set = SyntheticPartsWithMasks(SyntheticParts(args.train_size, split="train", **kw),
                                        view_size=args.view_size, fill=args.fill)
    test_set = SyntheticPartsWithMasks(SyntheticParts(args.test_size, split="test", **kw),
                                       view_size=args.view_size, fill=args.fill)
    torch.manual_seed(args.seed)
    model = ProtoMask(SmallCNN(channels=(16, 32)), train_set.num_classes, prototypes_per_class=per_class,
                      embedding_dim=args.embedding_dim, input_shape=(3, args.view_size, args.view_size),
                      div_grad=args.div_grad, train_add_on=args.train_add_on)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=256)
    print(f"protofast train protomask: synthetic ({len(train_set)} train / {len(test_set)} test, "
          f"{train_set.num_classes} classes, {train_set.views.shape[1]} views of {args.view_size}x{args.view_size}, "
          f"fill {args.fill}; views cut in {time.perf_counter() - t0:.1f} s), {model.num_prototypes} prototypes of "
          f"{model.embedding_dim}, batch {batch_size} x {args.accumulation} accumulation, "
          f"{torch.get_num_threads()} threads", flush=True)
    result = train_protomask(model, train_loader, test_loader, epochs, args.fine_tune_epochs,
                             accumulation_steps=args.accumulation, lrs=CLI_LRS, progress=not args.no_progress)
    print(f"final test accuracy {result.test_acc:.4f}; training {result.seconds:.1f} s", flush=True)
    os.makedirs(out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out, "model.pt"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model": "protomask", "config": model.config(), "test_acc": result.test_acc,
                   "seconds": result.seconds, "history": result.history,
                   "push_log": {str(k): v for k, v in result.push_results[-1].log().items()}
                   if result.push_results else {}}, f, indent=1)
    print(f"checkpoint written to {os.path.abspath(out)} (model.pt, config.json)", flush=True)
    return 0


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """The ``protofast train`` options only ProtoMask reads."""
    g = parser.add_argument_group("protomask")
    g.add_argument("--view-size", type=int, default=16, help="protomask: side of each mask view (default 16)")
    g.add_argument("--fill", choices=("zero", "mean", "original"), default="zero",
                   help="protomask: background of the masked views (default zero, quanproto's default)")
    g.add_argument("--fine-tune-epochs", type=int, default=3, help="protomask: last-layer epochs (default 3)")
    g.add_argument("--accumulation", type=int, default=1,
                   help="protomask: batches per optimizer step (quanproto: 4; default 1)")
    g.add_argument("--embedding-dim", type=int, default=64, help="protomask: D (quanproto 1280; default 64)")
    g.add_argument("--div-grad", action="store_true", help="protomask: differentiable diversity loss")
    g.add_argument("--train-add-on", action="store_true",
                   help="protomask: train the add-on 1x1 conv (quanproto leaves it at its init)")

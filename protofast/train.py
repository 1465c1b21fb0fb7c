"""Training ProtoPNet end to end: warm → joint → push → last layer, with timing, checkpoints and figures.

:func:`train_protopnet` runs cfchen-duke/ProtoPNet's schedule (SEMANTICS.md §1.6), scaled by its arguments:

- epochs ``0 .. warm_epochs−1``: *warm* (backbone frozen; add-on and prototypes trained);
- the other epochs: *joint* (everything but the last layer in the optimizer; optional StepLR);
- after each epoch in ``push_epochs``: *push* (:func:`protofast.push_prototypes` over the unaugmented train set,
  in loader order) then ``last_layer_iters`` passes over the train loader training only the last layer.

Timing (per epoch, training steps only, summed over the steps of this process): ``backbone_s`` is the time in
``model.conv_features`` (backbone + add-on layers) forward plus its share of the backward; ``head_s`` is the
prototype layer, similarity, last layer and loss forward plus their backward. Both are wall-clock
``time.perf_counter()`` intervals: the forward split is taken around ``conv_features`` inside
``ProtoPNet.forward``; the backward split is the moment a tensor hook on the add-on output fires (autograd
has then finished the head's backward and starts the backbone's). The optimizer step, data loading and
evaluation are in neither (``step_s`` is the optimizer). Under DDP the gradient all-reduce overlaps the backward
and is counted where it happens.

Distributed: when ``torch.distributed`` is initialised (e.g. ``torchrun --nproc_per_node 2`` with gloo), the
train loader is re-made with a :class:`~torch.utils.data.DistributedSampler` (same batch size per process),
the model is wrapped in ``DistributedDataParallel`` (re-wrapped at every phase change, so that only trainable
parameters are registered), accuracies are all-reduced, push runs over per-rank shards (merged by
:func:`protofast.push_prototypes`), and only rank 0 logs and shows progress bars.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .models.protopnet import ProtoPNet

__all__ = ["TrainResult", "train_protopnet", "evaluate", "save_checkpoint", "load_checkpoint",
           "nearest_patches", "save_prototype_figure"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.pt"


@dataclasses.dataclass
class TrainResult:
    """``history``: one dict per epoch and per last-layer pass (keys ``epoch, phase, train_acc, train_loss,
    test_acc, seconds, backbone_s, head_s, step_s`` and the mean loss terms); ``test_acc``: the final test
    accuracy; ``seconds``: wall time of the whole call; ``push_results``: what each push returned."""

    history: List[dict]
    test_acc: float
    seconds: float
    push_results: list


# ---------------------------------------------------------------------------------------------- distributed
def _dist():
    """(rank, world_size) when torch.distributed is initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(values: Sequence[float], device) -> List[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _dist()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, device=None) -> float:
    """Top-1 accuracy of ``model`` (forward → ``(logits, ...)``) over ``loader``. Under torch.distributed each
    rank evaluates the indices ``rank, rank + world, ...`` of ``loader.dataset`` and the counts are summed, so
    every sample is counted exactly once."""
    net = _unwrap(model)
    device = device or next(net.parameters()).device
    rank, world = _dist()
    if world > 1:
        dataset = loader.dataset
        loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=loader.batch_size or 100,
                            num_workers=loader.num_workers)
    was_training = net.training
    net.eval()
    correct = total = 0
    for x, y in loader:
        logits = net(x.to(device))[0]
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += int(y.numel())
    net.train(was_training)
    correct, total = _all_reduce_sum([correct, total], device)
    return correct / max(total, 1)


# ---------------------------------------------------------------------------------------------- training
def _loader_with(loader: DataLoader, sampler, shuffle: bool = False) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      shuffle=shuffle if sampler is None else None, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def _run_epoch(net: ProtoPNet, wrapped: nn.Module, loader, optimizer, device, desc: str, progress: bool) -> dict:
    """One pass of optimizer steps; returns summed counts/terms and the timing split of this process."""
    from tqdm.auto import tqdm

    rank, _ = _dist()
    timing: Dict[str, float] = {}
    net.timing = timing
    correct = total = 0
    loss_sum = 0.0
    term_sums: Dict[str, float] = {}
    head_backward = backbone_backward = step_s = loss_s = 0.0
    wrapped.train()
    try:
        for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress or rank != 0, dynamic_ncols=True):
            x, y = x.to(device), y.to(device)
            logits, min_distances, z = wrapped(x, return_features=True)
            t0 = time.perf_counter()
            loss, terms = net.loss(logits, min_distances, y, z)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            stamp = timing.pop("_features_grad_at", None)
            if stamp is None:                       # nothing before the head requires grad (last-layer phase)
                head_backward += t2 - t1
            else:
                head_backward += stamp - t1
                backbone_backward += t2 - stamp
            optimizer.step()
            step_s += time.perf_counter() - t2
            loss_s += t1 - t0
            n = int(y.numel())
            correct += int((logits.detach().argmax(1) == y).sum())
            total += n
            loss_sum += float(loss.detach()) * n
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + float(v) * n
    finally:
        net.timing = None
    return dict(correct=correct, total=total, loss_sum=loss_sum, term_sums=term_sums,
                backbone_s=timing.get("backbone_forward", 0.0) + backbone_backward,
                head_s=timing.get("head_forward", 0.0) + loss_s + head_backward, step_s=step_s)


def _wrap(model: ProtoPNet, device) -> nn.Module:
    if _dist()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def train_protopnet(model: ProtoPNet, train_loader: DataLoader, test_loader: DataLoader, epochs: int,
                    loss: Optional[str] = None, *, warm_epochs: int = 1, push_epochs: Optional[Sequence[int]] = None,
                    last_layer_iters: int = 5, push_loader: Optional[DataLoader] = None,
                    lrs: Optional[Dict[str, float]] = None, lr_scale: float = 1.0,
                    joint_lr_step: Optional[int] = None, joint_lr_gamma: float = 0.1, device=None,
                    progress: bool = True, log: Optional[Callable[[str], None]] = print, seed: int = 0,
                    push_kwargs: Optional[dict] = None) -> TrainResult:
    """Train a :class:`~protofast.models.ProtoPNet` with the original warm / joint / push / last-layer schedule.

    Args:
        model: the ProtoPNet (moved to ``device``).
        train_loader / test_loader: ``(images [B, 3, S, S], labels [B])`` loaders. Under torch.distributed the
            train loader is re-made with a DistributedSampler (shuffled, ``seed``), same batch size per process.
        epochs: number of warm + joint epochs.
        loss: ``"minmax"`` or ``"mean"`` sets ``model.loss_mode``; ``None`` keeps the model's.
        warm_epochs: the first ``warm_epochs`` epochs train only the add-on layers and prototypes.
        push_epochs: 0-based epochs after which to push and train the last layer; default: the last epoch only.
        last_layer_iters: passes over the train loader training only the last layer after each push
            (the original: 20).
        push_loader: the unaugmented train set in a fixed order (default: ``train_loader.dataset``, same batch
            size, ``shuffle=False``; a DistributedSampler without shuffling under torch.distributed).
        lrs, lr_scale: learning rates per parameter group (``features, add_on_layers, prototype_vectors,
            last_layer``; defaults: the original's) and a common factor, see :meth:`ProtoPNet.phase`.
        joint_lr_step, joint_lr_gamma: StepLR of the joint optimizer (the original: 5, 0.1; default off),
            stepped at the start of each joint epoch after the first.
        device: default: the model's device.
        progress: tqdm bars over batches (rank 0 only). log: per-epoch line sink (rank 0 only; None: silent).
        push_kwargs: extra keyword arguments of :func:`protofast.push_prototypes`.

    Returns:
        :class:`TrainResult` (history per epoch, final test accuracy, seconds, push results).
    """
    if not isinstance(model, ProtoPNet):
        raise TypeError(f"model must be a protofast.models.ProtoPNet, got {type(model).__name__}")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if loss is not None:
        if loss not in ("minmax", "mean"):
            raise ValueError(f"loss must be 'minmax' or 'mean', got {loss!r}")
        model.loss_mode = loss
    if push_epochs is None:
        push_epochs = [epochs - 1] if epochs > 0 else []
    push_epochs = sorted(set(push_epochs))
    if any(not 0 <= e < epochs for e in push_epochs):
        raise ValueError(f"push_epochs must lie in [0, {epochs}), got {push_epochs}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    rank, world = _dist()
    say = (log if log is not None and rank == 0 else (lambda _msg: None))

    if world > 1:
        if not isinstance(train_loader.sampler, DistributedSampler):
            train_loader = _loader_with(train_loader, DistributedSampler(train_loader.dataset, shuffle=True,
                                                                          seed=seed))
        if push_loader is None:
            push_loader = _loader_with(train_loader, DistributedSampler(train_loader.dataset, shuffle=False))
    elif push_loader is None:
        push_loader = _loader_with(train_loader, None, shuffle=False)

    history: List[dict] = []
    push_results = []
    start = time.perf_counter()

    def record(epoch, phase, stats, seconds):
        c, n, ls, bb, hd, st = _all_reduce_sum([stats["correct"], stats["total"], stats["loss_sum"],
                                                stats["backbone_s"], stats["head_s"], stats["step_s"]], device)
        keys = sorted(stats["term_sums"])
        sums = _all_reduce_sum([stats["term_sums"][k] for k in keys], device) if keys else []
        test_acc = evaluate(model, test_loader, device)
        row = dict(epoch=epoch, phase=phase, train_acc=c / max(n, 1), train_loss=ls / max(n, 1), test_acc=test_acc,
                   seconds=seconds, backbone_s=bb / world, head_s=hd / world, step_s=st / world,
                   **{k: s / max(n, 1) for k, s in zip(keys, sums)})
        history.append(row)
        say(f"epoch {epoch + 1:>3}/{epochs} {phase:<10} train acc {row['train_acc']:.3f} loss {row['train_loss']:.4f}"
            f"  test acc {test_acc:.3f}  {seconds:5.1f} s (backbone {row['backbone_s']:.2f} s, "
            f"head {row['head_s']:.2f} s, step {row['step_s']:.2f} s)")
        return row

    current_phase, optimizer, scheduler, wrapped = None, None, None, model
    for epoch in range(epochs):
        phase = "warm" if epoch < warm_epochs else "joint"
        if phase != current_phase:
            optimizer = model.phase(phase, lrs=lrs, lr_scale=lr_scale)
            scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, joint_lr_step, joint_lr_gamma)
                         if phase == "joint" and joint_lr_step else None)
            wrapped, current_phase = _wrap(model, device), phase
        elif scheduler is not None:
            scheduler.step()
        if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        stats = _run_epoch(model, wrapped, train_loader, optimizer, device, f"epoch {epoch + 1} {phase}", progress)
        record(epoch, phase, stats, time.perf_counter() - t0)

        if epoch in push_epochs:
            from .push import push_prototypes

            t0 = time.perf_counter()
            result = push_prototypes(model, push_loader, progress=progress and rank == 0, device=device,
                                     **(push_kwargs or {}))
            push_results.append(result)
            acc = evaluate(model, test_loader, device)
            history.append(dict(epoch=epoch, phase="push", test_acc=acc, seconds=time.perf_counter() - t0))
            say(f"push after epoch {epoch + 1}: test acc {acc:.3f}  {time.perf_counter() - t0:5.1f} s")
            if last_layer_iters:
                last_opt = model.phase("last_layer", lrs=lrs, lr_scale=lr_scale)
                last_wrapped = _wrap(model, device)
                for it in range(last_layer_iters):
                    if isinstance(getattr(train_loader, "sampler", None), DistributedSampler):
                        train_loader.sampler.set_epoch(epochs + epoch * last_layer_iters + it)
                    t0 = time.perf_counter()
                    stats = _run_epoch(model, last_wrapped, train_loader, last_opt, device,
                                       f"last layer {it + 1}", progress)
                    record(epoch, f"last {it + 1}", stats, time.perf_counter() - t0)
                current_phase = None                 # the next epoch rebuilds its optimizer and wrapper
    test_acc = history[-1]["test_acc"] if history else evaluate(model, test_loader, device)
    return TrainResult(history=history, test_acc=test_acc, seconds=time.perf_counter() - start,
                       push_results=push_results)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: ProtoPNet, directory: str, extra: Optional[dict] = None) -> str:
    """Write ``directory/model.pt`` (the ``state_dict``: plain tensors, loadable with ``weights_only=True``)
    and ``directory/config.json`` (``{"model": model.config(), ...extra}``). Returns the directory."""
    model = _unwrap(model)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(directory, WEIGHTS_FILE))
    from ._version import __version__

    config = {"format": "protofast.ProtoPNet/1", "protofast": __version__, "model": model.config(), **(extra or {})}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, default=str)
    return directory


def load_checkpoint(directory: str, backbone: Optional[nn.Module] = None, map_location="cpu") -> ProtoPNet:
    """Rebuild the model saved by :func:`save_checkpoint` (``torch.load(..., weights_only=True)``), in eval mode.
    ``backbone``: a fresh backbone module when the saved spec names none that protofast can build."""
    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {directory!r} a protofast checkpoint directory?")
    with open(config_path) as f:
        config = json.load(f)
    if "model" not in config:
        raise ValueError(f"{config_path} has no 'model' entry")
    model = ProtoPNet.from_config(config["model"], backbone=backbone)
    state = torch.load(weights_path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------------------------- figures
@torch.no_grad()
def nearest_patches(model: ProtoPNet, loader, device=None):
    """For every prototype m, its nearest patch among the images of its own class (class k(m) = argmax of
    ``prototype_class_identity[m]``), over ``loader`` in order (ties: earliest image, then earliest position).

    Returns ``(image_index [M] int64, position [M, 2] int64 (i, j) top-left in the distance map, distance [M])``;
    image_index counts images in loader order (−1 where the class never appears)."""
    model = _unwrap(model)
    device = device or next(model.parameters()).device
    cls = model.prototype_class_identity.argmax(1).to(device)                 # [M]
    M = cls.numel()
    best = torch.full((M,), math.inf, device=device, dtype=torch.float64)
    index = torch.full((M,), -1, dtype=torch.long, device=device)
    flat = torch.full((M,), -1, dtype=torch.long, device=device)
    W_map = None
    seen = 0
    was_training = model.training
    model.eval()
    import protofast

    for x, y in loader:
        z = model.conv_features(x.to(device))
        values, argmin = protofast.prototype_min_distances(z, model.prototype_vectors)       # [B, M]
        W_map = z.shape[3] - model.prototype_shape[3] + 1
        own = y.to(device)[:, None] == cls[None, :]
        values = values.double().masked_fill(~own, math.inf)
        v, b = values.min(0)                                                               # first occurrence
        better = v < best
        best = torch.where(better, v, best)
        index = torch.where(better, b + seen, index)
        flat = torch.where(better, argmin.gather(0, b[None])[0], flat)
        seen += x.shape[0]
    model.train(was_training)
    position = torch.stack([flat // W_map, flat % W_map], 1) if W_map else torch.full((M, 2), -1)
    position[index < 0] = -1
    return index.cpu(), position.cpu(), best.cpu()


def _box(i, j, h, w, H, W, S_h, S_w):
    """Feature cells [i, i+h) × [j, j+w) of an H×W map → pixel box (y0, y1, x0, x1) of an S_h×S_w image."""
    return (math.floor(i * S_h / H), math.ceil((i + h) * S_h / H), math.floor(j * S_w / W),
            math.ceil((j + w) * S_w / W))


def _show(ax, image: Tensor):
    img = image.detach().cpu().float()
    img = (img - img.min()) / (img.max() - img.min()) if (img.min() < 0 or img.max() > 1) else img
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[:3].permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def save_prototype_figure(model: ProtoPNet, train_dataset, test_dataset, path: str, n_test: int = 3,
                          batch_size: int = 256, device=None, max_classes: int = 20) -> str:
    """A PNG with one row per class (the first ``max_classes``): for each of the class's prototypes, its nearest
    training patch (:func:`nearest_patches`, the patch a push would pick) boxed on that training image, then
    ``n_test`` test images of the class with the similarity map ``log((d + 1)/(d + ε))`` of the class's most
    activated prototype (bilinearly upsampled) overlaid. Yellow boxes map the nearest patch's feature cells to
    pixels proportionally; dashed cyan boxes are the original ProtoPNet's high-activation crop (pixels at or above
    the 95th percentile of the bicubically upsampled similarity map).
    Needs matplotlib (``pip install protofast[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise ImportError("save_prototype_figure needs matplotlib: pip install 'protofast[plot]'") from exc
    import protofast
    from .compat.protopnet import _upsample, find_high_activation_crop

    model = _unwrap(model)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    M, D, h, w = model.prototype_shape
    K = min(model.num_classes, max_classes)
    ppc = model.prototypes_per_class
    loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=False)
    index, position, distance = nearest_patches(model, loader, device)
    cls = model.prototype_class_identity.argmax(1).cpu()
    test_labels = torch.tensor([int(test_dataset[i][1]) for i in range(len(test_dataset))])

    cols = ppc + n_test
    fig, axes = plt.subplots(K, cols, figsize=(1.5 * cols, 1.6 * K), squeeze=False)
    for k in range(K):
        protos = (cls == k).nonzero().flatten().tolist()[:ppc]
        for c in range(ppc):
            ax = axes[k, c]
            ax.axis("off")
            if c >= len(protos) or index[protos[c]] < 0:
                continue
            m = protos[c]
            image = train_dataset[int(index[m])][0]
            _show(ax, image)
            ax.axis("on")
            z = model.conv_features(image[None].to(device))
            H, W = z.shape[2:]
            y0, y1, x0, x1 = _box(int(position[m, 0]), int(position[m, 1]), h, w, H, W, *image.shape[1:])
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", lw=1.5))
            # the original's "high-activation" box: 95th percentile of the bicubically upsampled similarity map
            maps = protofast.prototype_distance_maps(z, model.prototype_vectors[m:m + 1])[0, 0]
            act = protofast.log_similarity(maps.clamp_min(0), model.epsilon).float().cpu().numpy()
            y0, y1, x0, x1 = find_high_activation_crop(_upsample(act, image.shape[1]), 95)
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", lw=1,
                                   linestyle="--"))
            ax.set_title((f"class {k}: " if c == 0 else "") + f"p{m} d={float(distance[m]):.2f}", fontsize=7)
        test_idx = (test_labels == k).nonzero().flatten().tolist()[:n_test]
        for c in range(n_test):
            ax = axes[k, ppc + c]
            ax.axis("off")
            if c >= len(test_idx) or not protos:
                continue
            image = test_dataset[test_idx[c]][0]
            z, maps = model.push_forward(image[None].to(device))
            sims = protofast.log_similarity(maps[0, protos].clamp_min(0), model.epsilon)    # [ppc, H', W']
            best = int(sims.flatten(1).amax(1).argmax())
            sim = sims[best][None, None].float()
            up = torch.nn.functional.interpolate(sim, size=tuple(image.shape[1:]), mode="bilinear",
                                                 align_corners=False)[0, 0].cpu()
            _show(ax, image)
            ax.axis("on")
            ax.imshow(up.numpy(), cmap="jet", alpha=0.45)
            ax.set_title(f"test: p{protos[best]} s={float(sim.max()):.1f}", fontsize=7)
    fig.suptitle("prototypes: nearest training patch (yellow: its cells, cyan: 95th-percentile activation) | "
                 "similarity heatmaps on test images", fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    model.train(was_training)
    return path

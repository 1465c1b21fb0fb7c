"""DProtoNet's multi-image prototype update (eqs. 9–11, SEMANTICS.md §4.4) and its training schedule.

Multi-image update. For prototype p_m of class k:

1. the source image x is chosen by ProtoPNet's class-specific push rule (§1.5) over the unaugmented set, with the
   I masked vectors as the "patches": the image of class k whose nearest masked vector is nearest to p_m
   (first occurrence in loader order, strict < across batches) — :func:`protofast.push_prototypes` on a
   :class:`~protofast.models.dprotonet.PushView` (``source="nearest"``), or given per prototype
   (``source="given"``);
2. R augmented copies x^1..x^R of x (rotation, shear, scale and perspective, one random homography per copy,
   sampled with ``grid_sample``; :class:`RandomWarp`); ``include_original=True`` makes x itself the first copy;
3. e_r = argmin_i ‖z_i(x^r) − p_m‖ (first occurrence) — the argmins of :func:`protofast.prototype_min_distances`
   on the copies' masked vectors against the current prototypes;
4. p_m ← argmin_p Σ_r ‖z_{e_r}(x^r) − p‖² = (1/R) Σ_r z_{e_r}(x^r).

With R = 1 and no augmentation this is exactly the plain projection (ProtoPNet's push on the masked vectors).
Prototypes whose class never appears keep their value (the paper says nothing; ProtoPNet's push zeroes them).

Training (:func:`train_dprotonet`): warm epochs (backbone frozen; shaping net and prototypes trained), then joint
epochs; after every ``update_every``-th epoch (and the last) the multi-image update, then ``last_layer_iters``
last-layer-only passes (the paper's 5 warm epochs, update every 10 epochs; ProtoPNet's 20 last-layer passes).
The epochs are :mod:`protofast.train`'s (a DProtoNet is a ProtoPNet). Single process.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .models.dprotonet import DProtoNet, PushView, mask_min_distances

__all__ = ["RandomWarp", "UpdateResult", "update_prototypes", "train_dprotonet"]


# ---------------------------------------------------------------------------------------------- augmentation
class RandomWarp:
    """Random rotation, shear, scale and perspective of a batch of images by one homography per image, applied
    with ``grid_sample`` (bilinear, border padding; no torchvision needed).

    For output pixel (u, v) in normalised coordinates [−1, 1], the sampled input point is ``(X/Z, Y/Z)`` with
    ``(X, Y, Z) = Hm · (u, v, 1)``, ``Hm = [[s·cos θ, −s·sin θ + σx, 0], [s·sin θ + σy, s·cos θ, 0], [πx, πy, 1]]``,
    θ ~ U(±rotation°), σ ~ U(±shear), s ~ U(scale), π ~ U(±perspective). All zero (and scale (1, 1)) is the
    identity. ``__call__(images [N, C, S, S], generator) -> [N, C, S, S]``.
    """

    def __init__(self, rotation: float = 15.0, shear: float = 0.15, scale=(0.9, 1.1), perspective: float = 0.1):
        self.rotation, self.shear, self.scale, self.perspective = float(rotation), float(shear), tuple(scale), \
            float(perspective)

    def homographies(self, n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32) -> Tensor:
        u = torch.rand(n, 6, generator=generator, dtype=torch.float64)
        theta = math.radians(self.rotation) * (2 * u[:, 0] - 1)
        sx, sy = self.shear * (2 * u[:, 1] - 1), self.shear * (2 * u[:, 2] - 1)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 3]
        px, py = self.perspective * (2 * u[:, 4] - 1), self.perspective * (2 * u[:, 5] - 1)
        Hm = torch.zeros(n, 3, 3, dtype=torch.float64)
        Hm[:, 0, 0], Hm[:, 0, 1] = s * torch.cos(theta), -s * torch.sin(theta) + sx
        Hm[:, 1, 0], Hm[:, 1, 1] = s * torch.sin(theta) + sy, s * torch.cos(theta)
        Hm[:, 2, 0], Hm[:, 2, 1], Hm[:, 2, 2] = px, py, 1
        return Hm.to(dtype)

    @staticmethod
    def warp(images: Tensor, Hm: Tensor) -> Tensor:
        N, _, Sh, Sw = images.shape
        eye = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(N, 2, 3)
        base = F.affine_grid(eye, [N, 1, Sh, Sw], align_corners=False)                    # [N, Sh, Sw, 2] (u, v)
        ones = torch.ones_like(base[..., :1])
        src = torch.cat([base, ones], -1) @ Hm.to(images).transpose(1, 2)[:, None]      # [N, Sh, Sw, 3]
        grid = src[..., :2] / src[..., 2:].clamp_min(1e-6)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __call__(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.warp(images, self.homographies(images.shape[0], generator))


# ---------------------------------------------------------------------------------------------- update
@dataclasses.dataclass
class UpdateResult:
    """Per prototype m: ``image_index [M]`` (source image, dataset index; −1: not updated), ``mask_index [M, R]``
    (e_r, the nearest mask of each copy; −1 rows when not updated), ``prototype_class [M]``, and with
    ``source="nearest"`` the push's ``distance [M]`` from the old prototype to the source's nearest masked vector."""

    image_index: Tensor
    mask_index: Tensor
    prototype_class: Tensor
    distance: Optional[Tensor] = None

    @property
    def found(self) -> Tensor:
        return self.image_index >= 0


def _views(images: Tensor, R: int, augment: Optional[Callable], include_original: bool,
           generator: torch.Generator) -> Tensor:
    """[U, C, S, S] -> [U·R, C, S, S], image-major (row u·R + r is copy r of image u)."""
    rep = images.repeat_interleave(R, dim=0)
    if augment is None:
        return rep
    out = augment(rep, generator)
    if include_original:
        out = out.view(images.shape[0], R, *images.shape[1:]).clone()
        out[:, 0] = images
        out = out.view(-1, *images.shape[1:])
    return out


@torch.no_grad()
def update_prototypes(model: DProtoNet, loader, R: int = 40, augment: Union[str, Callable, None] = "default",
                      include_original: bool = False, source: str = "nearest",
                      source_indices: Optional[Tensor] = None, dataset=None, batch_size: int = 80, seed: int = 0,
                      progress: bool = True, device=None) -> UpdateResult:
    """Multi-image prototype update of a :class:`~protofast.models.DProtoNet`, in place (see the module docstring).

    Args:
        model: the DProtoNet (run in eval mode; its mode is restored).
        loader: the unaugmented training set in dataset order (``shuffle=False``), yielding ``(images, labels)``;
            with ``source="nearest"`` the push over it picks each prototype's source image.
        R: augmented copies per source image (the paper's best: 40; R = 1 without augmentation = projection).
        augment: ``"default"`` (:class:`RandomWarp`), ``None`` (identical copies) or a callable
            ``(images [N, C, S, S], generator) -> images``.
        include_original: the first of the R copies is the unaugmented source (default no).
        source: ``"nearest"`` (class-specific push rule) or ``"given"`` (``source_indices [M]``: dataset indices,
            −1 to leave a prototype unchanged).
        dataset: where source images are read (``dataset[i][0]``); default ``loader.dataset``.
        batch_size: augmented images per backbone forward (at least R).
        seed: seed of the augmentation generator.

    Returns:
        :class:`UpdateResult`.
    """
    if not isinstance(model, DProtoNet):
        raise TypeError(f"model must be a protofast.models.DProtoNet, got {type(model).__name__}")
    if isinstance(R, bool) or not isinstance(R, int) or R < 1:
        raise ValueError(f"R must be a positive int, got {R!r}")
    if source not in ("nearest", "given"):
        raise ValueError(f"source must be 'nearest' or 'given', got {source!r}")
    if augment == "default":
        augment = RandomWarp()
    elif augment is not None and not callable(augment):
        raise TypeError(f"augment must be 'default', None or a callable, got {augment!r}")
    dataset = dataset if dataset is not None else getattr(loader, "dataset", None)
    if dataset is None:
        raise ValueError("dataset is needed to read the source images (the loader has no .dataset)")
    if isinstance(loader, DataLoader) and source == "nearest" and \
            not isinstance(loader.sampler, torch.utils.data.SequentialSampler):
        raise ValueError("the loader must iterate its dataset in order (shuffle=False): its image positions are "
                         "used as dataset indices")
    device = torch.device(device) if device is not None else model.prototype_vectors.device
    M = model.num_prototypes
    cls = model.prototype_class_identity.argmax(1).cpu()
    distance = None
    if source == "nearest":
        from .push import push_prototypes

        push = push_prototypes(PushView(model), loader, class_specific=True, unseen="keep", progress=progress,
                               device=device)
        image_index, distance = push.image_index.clone(), push.distance
    else:
        if not isinstance(source_indices, Tensor) or source_indices.shape != (M,):
            raise ValueError(f"source='given' needs source_indices, a [M] = [{M}] tensor of dataset indices")
        image_index = source_indices.detach().to("cpu", torch.long).clone()
        if bool((image_index >= len(dataset)).any()):
            raise ValueError(f"source_indices must be < len(dataset) = {len(dataset)}")
    old = model.prototype_vectors.detach().clone()
    new = old.clone()
    mask_index = torch.full((M, R), -1, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    sources = torch.unique(image_index[image_index >= 0])
    per_chunk = max(1, batch_size // R)
    was_training = model.training
    model.eval()
    try:
        chunks = range(0, len(sources), per_chunk)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="prototype update", leave=False)
        for c0 in chunks:
            chunk = sources[c0:c0 + per_chunk]
            images = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in chunk]).to(device)
            views = _views(images, R, augment, include_original, generator).to(device, images.dtype)
            z = model.masked_vectors(model.conv_features(views))                         # [U·R, I, D]
            protos = torch.nonzero(torch.isin(image_index, chunk)).flatten()             # [Mc]
            _, argmin = mask_min_distances(z, old[protos.to(device)].to(z.dtype))
            u = torch.searchsorted(chunk, image_index[protos])                           # position in chunk
            rows = (u[:, None] * R + torch.arange(R)[None, :]).to(device)                # [Mc, R]
            cols = torch.arange(len(protos), device=device)[:, None].expand(-1, R)
            e = argmin[rows, cols]                                                       # [Mc, R] e_r
            new[protos.to(device), :, 0, 0] = z[rows, e].mean(1).to(new.dtype)          # (1/R) Σ_r z_{e_r}(x^r)
            mask_index[protos] = e.cpu()
    finally:
        model.train(was_training)
    model.prototype_vectors.copy_(new)
    return UpdateResult(image_index=image_index, mask_index=mask_index, prototype_class=cls, distance=distance)


# ---------------------------------------------------------------------------------------------- training
def train_dprotonet(model: DProtoNet, train_loader: DataLoader, test_loader: DataLoader, epochs: int, *,
                    warm_epochs: int = 5, update_every: int = 10, update_epochs: Optional[Sequence[int]] = None,
                    R: int = 40, augment: Union[str, Callable, None] = "default", include_original: bool = False,
                    last_layer_iters: int = 20, update_loader: Optional[DataLoader] = None,
                    lrs: Optional[Dict[str, float]] = None, lr_scale: float = 1.0, device=None,
                    progress: bool = True, log: Optional[Callable[[str], None]] = print, seed: int = 0):
    """Train a DProtoNet: warm (backbone frozen) → joint; after each epoch in ``update_epochs`` (default: every
    ``update_every``-th epoch and the last one) the multi-image prototype update (:func:`update_prototypes`,
    R copies) and ``last_layer_iters`` last-layer-only passes over the train loader.

    Learning rates: the paper's (backbone 1e-4, shaping 3e-3, prototypes 3e-3, last layer 1e-4) unless ``lrs``
    overrides groups (``features, add_on_layers, prototype_vectors, last_layer, masks``); all times ``lr_scale``.
    ``update_loader``: the unaugmented train set in order (default: ``train_loader.dataset``, same batch size).
    Returns :class:`protofast.train.TrainResult` (``push_results`` holds the :class:`UpdateResult` of each update).
    """
    from .train import TrainResult, _run_epoch, evaluate

    if not isinstance(model, DProtoNet):
        raise TypeError(f"model must be a protofast.models.DProtoNet, got {type(model).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if update_epochs is None:
        update_epochs = [e for e in range(epochs) if (e + 1) % update_every == 0] + ([epochs - 1] if epochs else [])
    update_epochs = sorted(set(update_epochs))
    if any(not 0 <= e < epochs for e in update_epochs):
        raise ValueError(f"update_epochs must lie in [0, {epochs}), got {update_epochs}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    say = log if log is not None else (lambda _msg: None)
    if update_loader is None:
        update_loader = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size, shuffle=False)
    history: List[dict] = []
    updates = []
    start = time.perf_counter()

    def record(epoch, phase, stats, seconds):
        n = max(stats["total"], 1)
        test_acc = evaluate(model, test_loader, device)
        row = dict(epoch=epoch, phase=phase, train_acc=stats["correct"] / n, train_loss=stats["loss_sum"] / n,
                   test_acc=test_acc, seconds=seconds, backbone_s=stats["backbone_s"], head_s=stats["head_s"],
                   step_s=stats["step_s"], **{k: v / n for k, v in stats["term_sums"].items()})
        history.append(row)
        say(f"epoch {epoch + 1:>3}/{epochs} {phase:<10} train acc {row['train_acc']:.3f} loss {row['train_loss']:.4f}"
            f"  test acc {test_acc:.3f}  {seconds:5.1f} s (backbone {row['backbone_s']:.2f} s, "
            f"head {row['head_s']:.2f} s)")

    current, optimizer = None, None
    for epoch in range(epochs):
        phase = "warm" if epoch < warm_epochs else "joint"
        if phase != current:
            optimizer, current = model.phase(phase, lrs=lrs, lr_scale=lr_scale), phase
        t0 = time.perf_counter()
        stats = _run_epoch(model, model, train_loader, optimizer, device, f"epoch {epoch + 1} {phase}", progress)
        record(epoch, phase, stats, time.perf_counter() - t0)
        if epoch in update_epochs:
            t0 = time.perf_counter()
            result = update_prototypes(model, update_loader, R=R, augment=augment, include_original=include_original,
                                       seed=seed + epoch, progress=progress, device=device)
            updates.append(result)
            acc = evaluate(model, test_loader, device)
            history.append(dict(epoch=epoch, phase="update", test_acc=acc, seconds=time.perf_counter() - t0))
            say(f"prototype update after epoch {epoch + 1} (R={R}): test acc {acc:.3f}  "
                f"{time.perf_counter() - t0:5.1f} s")
            if last_layer_iters:
                last_opt = model.phase("last_layer", lrs=lrs, lr_scale=lr_scale)
                for it in range(last_layer_iters):
                    t0 = time.perf_counter()
                    stats = _run_epoch(model, model, train_loader, last_opt, device, f"last layer {it + 1}", progress)
                    record(epoch, f"last {it + 1}", stats, time.perf_counter() - t0)
                current = None
    test_acc = history[-1]["test_acc"] if history else evaluate(model, test_loader, device)
    return TrainResult(history=history, test_acc=test_acc, seconds=time.perf_counter() - start,
                       push_results=updates)


# ---------------------------------------------------------------------------------------------- checkpoints, CLI
def load_dprotonet(directory: str, backbone=None, map_location="cpu") -> DProtoNet:
    """Rebuild a DProtoNet written by ``protofast train dprotonet`` (``directory/config.json`` + ``model.pt``,
    :func:`protofast.train.save_checkpoint`), in eval mode."""
    import json
    import os

    from .train import CONFIG_FILE, WEIGHTS_FILE

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    model = DProtoNet.from_config(config["model"], backbone=backbone)
    model.load_state_dict(torch.load(os.path.join(directory, WEIGHTS_FILE), map_location=map_location,
                                     weights_only=True))
    return model.eval()


def cli_train(args) -> int:
    """``protofast train dprotonet``: a DProtoNet with a small CNN backbone on the synthetic set (or digits).

    CPU-sized defaults (documented in docs/dprotonet.md): SmallCNN(16, 32, 32) backbone (4×4 map on 32-px
    images), D = 32, ``--num-masks`` I = 64 (the paper: 240 on 7×7×512), 2 prototypes per class, the CLI's
    learning rates (1e-3 for every group: the backbone is trained from scratch), multi-image update with
    ``--copies`` R = 10 every ``--update-every`` epochs and after the last, then ``--last-layer-iters`` passes."""
    import os
    import sys

    from . import data as pf_data
    from .models import SmallCNN
    from .train import save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out == "protofast-protopnet":            # the train subcommand's default directory
        args.out = "protofast-dprotonet"
    try:
        train_set, test_set, _ = pf_data.train_test_datasets(args.dataset, args.train_size, args.test_size,
                                                             seed=args.seed)
    except ImportError as exc:
        print(f"protofast train: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = DProtoNet(SmallCNN(channels=(16, 32, 32)), 10, prototypes_per_class=args.prototypes_per_class,
                      num_masks=args.num_masks, prototype_dim=32, input_shape=(3, 32, 32), mask_seed=args.seed)
    from .cli import TRAIN_LRS

    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=256)
    print(f"protofast train dprotonet: {args.dataset} ({len(train_set)} train / {len(test_set)} test, 10 classes), "
          f"{model.num_prototypes} prototypes of D={model.prototype_shape[1]}, {model.num_masks} masks on a "
          f"{model.feature_size[0]}x{model.feature_size[1]} map, {sum(p.numel() for p in model.parameters())} "
          f"parameters, {torch.get_num_threads()} threads")
    result = train_dprotonet(model, train_loader, test_loader, args.epochs,
                             warm_epochs=min(args.warm_epochs, args.epochs), update_every=args.update_every,
                             R=args.copies, last_layer_iters=args.last_layer_iters,
                             lrs={k: v for k, v in TRAIN_LRS.items()}, lr_scale=args.lr_scale,
                             progress=not args.no_progress, seed=args.seed)
    rows = [r for r in result.history if "backbone_s" in r]
    print(f"final test accuracy {result.test_acc:.4f}; training {result.seconds:.1f} s "
          f"(backbone {sum(r['backbone_s'] for r in rows):.1f} s, prototype head {sum(r['head_s'] for r in rows):.1f} s)")
    extra = {"format": "protofast.DProtoNet/1",
             "train": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
             "test_acc": result.test_acc, "seconds": result.seconds, "history": result.history}
    if result.push_results:           # x^{p_t} of the MDM decoder: each prototype's source image (train index)
        extra["prototype_source_index"] = result.push_results[-1].image_index.tolist()
    save_checkpoint(model, args.out, extra=extra)
    print(f"checkpoint written to {os.path.abspath(args.out)} (model.pt, config.json; "
          "load with protofast.dprotonet_train.load_dprotonet)")
    return 0

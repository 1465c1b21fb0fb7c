"""Training PIP-Net end to end: two-view augmentation, pretrain → (finetune) → train, evaluation with abstention
and explanation size, top-k figure, checkpoints, and the ``protofast train pipnet`` command.

Schedule (M-Nauta/PIPNet, SEMANTICS.md §2.3, scaled by the arguments):

- ``pretrain_epochs`` epochs ``e = 1..P``: ``L = (e/P)·L_A + 5·L_T`` (:func:`protofast.pipnet_losses` with
  ``phase="pretrain"``), backbone and add-on stepped, classifier not;
- ``epochs`` epochs: the first ``finetune_epochs`` (only when ``pretrain_epochs > 0``, as the original) step only
  the classifier on ``2·L_C``; then ``5·L_A + 2·L_T + 2·L_C`` with everything stepped. After every step of this
  phase :meth:`PIPNet.shrink_weights_` (``Wc ← max(Wc − 1e-3, 0)``, ``κ ≥ 1``, ``bias ≥ 0``).

Optimizers: AdamW (weight decay 0), one per phase, parameter groups of :meth:`PIPNet.param_groups`.

Two views (:class:`TwoViewAugment`, plain torch): a geometric transform shared by both views (random shift by up
to ``shift`` pixels, optional horizontal flip) so that location (i, j) of view 1 and view 2 shows the same patch
(the align loss compares them location by location), then per view a small extra shift and colour jitter
(brightness, contrast, per-channel gain, pixel noise). Horizontal flip is off by default: SyntheticParts classes
depend on which quadrant a part is in, and a flip would turn an image into its swap-pair class.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.pipnet import PIPNet, dataset_topk, zero_unused_prototypes

__all__ = ["TwoViewAugment", "PIPNetTrainResult", "train_pipnet", "warmup_backbone", "evaluate_pipnet",
           "save_pipnet_checkpoint", "load_pipnet_checkpoint", "save_topk_figure", "noise_images",
           "cli_train_pipnet"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.pt"


# ---------------------------------------------------------------------------------------------- augmentation
def _shift(x: Tensor, dy: Tensor, dx: Tensor, pad: int) -> Tensor:
    """Per-image integer translation of ``x [B, C, S, S]`` by (dy, dx) ∈ [−pad, pad], border replicated."""
    if pad == 0:
        return x
    B, _, S, T = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    rows = (torch.arange(S, device=x.device)[None, :] + pad - dy[:, None])          # [B, S]
    cols = (torch.arange(T, device=x.device)[None, :] + pad - dx[:, None])          # [B, T]
    idx_r = rows[:, None, :, None].expand(B, x.shape[1], S, padded.shape[3])
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(B, x.shape[1], S, T)
    return out.gather(3, idx_c)


class TwoViewAugment:
    """``views = augment(images [B, 3, S, S])`` → ``[2B, 3, S, S]`` = [view 1; view 2] (images in [0, 1]).

    Args:
        shift: shared random translation (pixels, each axis, uniform in [−shift, shift]).
        view_shift: extra per-view translation (pixels).
        flip: probability of a shared horizontal flip (0 by default, see the module docstring).
        brightness, contrast, gain: per-view colour jitter amplitudes (uniform factors 1 ± amplitude; gain per
            channel); noise: standard deviation of per-view Gaussian pixel noise.
        generator: torch.Generator for reproducible views.
    """

    def __init__(self, shift: int = 3, view_shift: int = 1, flip: float = 0.0, brightness: float = 0.2,
                 contrast: float = 0.2, gain: float = 0.1, noise: float = 0.03,
                 generator: Optional[torch.Generator] = None):
        if shift < 0 or view_shift < 0:
            raise ValueError(f"shift and view_shift must be >= 0, got {shift}, {view_shift}")
        if not 0 <= flip <= 1:
            raise ValueError(f"flip must be a probability, got {flip}")
        self.shift, self.view_shift, self.flip = int(shift), int(view_shift), float(flip)
        self.brightness, self.contrast, self.gain, self.noise = brightness, contrast, gain, noise
        self.generator = generator

    def _rand(self, *shape, device):
        return torch.rand(*shape, generator=self.generator).to(device)

    def _int(self, high: int, n: int, device):
        return torch.randint(-high, high + 1, (n,), generator=self.generator).to(device)

    def _colour(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        d = x.device
        b = 1 + self.brightness * (2 * self._rand(B, 1, 1, 1, device=d) - 1)
        c = 1 + self.contrast * (2 * self._rand(B, 1, 1, 1, device=d) - 1)
        g = 1 + self.gain * (2 * self._rand(B, C, 1, 1, device=d) - 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean) * b * g
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=self.generator).to(d)
        return x.clamp(0, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"images must be [B, C, S, S], got shape {tuple(x.shape)}")
        B, d = x.shape[0], x.device
        base = _shift(x, self._int(self.shift, B, d), self._int(self.shift, B, d), self.shift)
        if self.flip:
            flip = self._rand(B, device=d) < self.flip
            base = torch.where(flip[:, None, None, None], base.flip(3), base)
        views = []
        for _ in range(2):
            v = _shift(base, self._int(self.view_shift, B, d), self._int(self.view_shift, B, d), self.view_shift)
            views.append(self._colour(v))
        return torch.cat(views, dim=0)


def noise_images(n: int, image_size: int = 32, seed: int = 0, kind: str = "uniform", noise: float = 0.1) -> Tensor:
    """``n`` pure-noise images ``[n, 3, S, S]`` in [0, 1] (out-of-distribution inputs, no parts):

    - ``"uniform"``: every pixel uniform in [0, 1];
    - ``"background"``: SyntheticParts' background model without any part: a random base colour in
      [0.25, 0.6) per image and channel plus Gaussian pixel noise of standard deviation ``noise``, clamped.
    """
    if kind not in ("uniform", "background"):
        raise ValueError(f"kind must be 'uniform' or 'background', got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, 3, image_size, image_size, generator=g)
    base = 0.25 + 0.35 * torch.rand(n, 3, 1, 1, generator=g)
    return (base + noise * torch.randn(n, 3, image_size, image_size, generator=g)).clamp_(0, 1)


# ---------------------------------------------------------------------------------------------- backbone warm-up
def warmup_backbone(backbone: nn.Module, loader, num_classes: int, epochs: int = 3, lr: float = 1e-3,
                    device=None, progress: bool = False, log: Optional[Callable[[str], None]] = None) -> List[float]:
    """Supervised warm-up of a from-scratch backbone: ``epochs`` of Adam on cross-entropy of a temporary linear
    head on the globally max-pooled features (``[B, C, H, W] → max over (i, j) → Linear(C, K)``); the head is
    discarded. This is the small-scale stand-in for the ImageNet-pretrained backbone M-Nauta/PIPNet always starts
    from: PIP-Net's self-supervised losses on a random small CNN collapse (one prototype wins every location, the
    channel softmax saturates and the classification gradient vanishes). Returns the train accuracy per epoch."""
    from tqdm.auto import tqdm

    device = device or next(backbone.parameters()).device
    backbone.train()
    C = _infer_channels_of(backbone, loader, device)
    head = nn.Linear(C, num_classes).to(device)
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=lr)
    accs = []
    for e in range(epochs):
        correct = total = 0
        for x, y in tqdm(loader, desc=f"backbone warm-up {e + 1}", leave=False, disable=not progress):
            x, y = x.to(device), y.to(device)
            logits = head(backbone(x).amax(dim=(2, 3)))
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.detach().argmax(1) == y).sum())
            total += int(y.numel())
        accs.append(correct / max(total, 1))
        if log is not None:
            log(f"backbone warm-up {e + 1:>2}/{epochs}  train acc {accs[-1]:.3f}")
    return accs


def _infer_channels_of(backbone: nn.Module, loader, device) -> int:
    channels = getattr(backbone, "out_channels", None)
    if isinstance(channels, int):
        return channels
    x = next(iter(loader))[0][:1].to(device)
    with torch.no_grad():
        return int(backbone(x).shape[1])


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_pipnet(model: PIPNet, loader, device=None, shrink_in_eval: bool = False) -> dict:
    """Inference-mode evaluation (presence scores < 0.1 → 0) over ``loader`` of ``(images, labels)``.

    Returns ``accuracy`` (an abstention counts as wrong), ``abstained`` (fraction of images with an all-zero
    output), mean ``local_size_all`` / ``local_size_predicted`` (per image), ``global_size``, ``sparsity``,
    ``num_prototypes``, ``n``. ``shrink_in_eval=True`` reproduces the original's evaluation, which applies the
    weight shrink once per test batch (SEMANTICS §2.5 ``shrink_in_eval``; it mutates the model)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = correct = abstained = 0
    local_all = local_pred = 0.0
    for batch in loader:
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if shrink_in_eval:
            model.shrink_weights_()
        pred, out, pooled = model.predict(x.to(device))
        sizes = model.local_size(pooled, pred)
        n += int(pred.numel())
        abstained += int((pred < 0).sum())
        if y is not None:
            correct += int((pred.cpu() == y).sum())
        local_all += float(sizes.all_classes.sum())
        local_pred += float(sizes.predicted.sum())
    model.train(was_training)
    n_ = max(n, 1)
    return dict(accuracy=correct / n_, abstained=abstained / n_, local_size_all=local_all / n_,
                local_size_predicted=local_pred / n_, global_size=model.global_size(), sparsity=model.sparsity(),
                num_prototypes=model.num_prototypes, n=n)


# ---------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class PIPNetTrainResult:
    """``history``: one dict per epoch (``epoch, phase, train_loss, align, tanh, classification, train_acc,
    seconds`` and, outside pretraining, the :func:`evaluate_pipnet` keys prefixed ``test_``); ``test``: the final
    evaluation; ``seconds``: wall time of the whole call."""

    history: List[dict]
    test: dict
    seconds: float


def _set_trainable(model: PIPNet, backbone: bool, add_on: bool, classifier: bool) -> None:
    for flag, params in ((backbone, model.backbone.parameters()), (add_on, model.add_on.parameters()),
                         (classifier, [p for p in (model.classification.weight, model.classification.bias)
                                       if p is not None])):
        for p in params:
            p.requires_grad_(flag)


def train_pipnet(model: PIPNet, train_loader, test_loader=None, epochs: int = 10, pretrain_epochs: int = 3,
                 finetune_epochs: int = 1, *, augment: Optional[Callable[[Tensor], Tensor]] = None,
                 lrs: Optional[Dict[str, float]] = None, lr_scale: float = 1.0, device=None, progress: bool = True,
                 log: Optional[Callable[[str], None]] = print, seed: int = 0) -> PIPNetTrainResult:
    """Train ``model`` with the original's pretrain / finetune / train schedule (module docstring).

    Args:
        model: a :class:`~protofast.models.PIPNet`.
        train_loader: ``(images [B, 3, S, S], labels [B])`` batches; each step forwards ``augment(images)``
            (``[2B, ...]``, default :class:`TwoViewAugment` seeded with ``seed``).
        test_loader: evaluated after every epoch outside pretraining (optional).
        epochs / pretrain_epochs / finetune_epochs: see the module docstring.
        lrs, lr_scale: per group (``backbone``, ``add_on``, ``classification``) and a common factor.
        progress: tqdm bars; log: per-epoch line sink (None: silent).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, PIPNet):
        raise TypeError(f"model must be a protofast.models.PIPNet, got {type(model).__name__}")
    for name, v in (("epochs", epochs), ("pretrain_epochs", pretrain_epochs), ("finetune_epochs", finetune_epochs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    augment = augment or TwoViewAugment(generator=torch.Generator().manual_seed(seed))
    say = log if log is not None else (lambda _msg: None)
    history: List[dict] = []
    start = time.perf_counter()

    def run_epoch(phase, optimizer, desc, align_weight=None):
        model.train()
        sums = dict(loss=0.0, align=0.0, tanh=0.0, classification=0.0)
        correct = total = 0
        for x, y in tqdm(train_loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            x, y = x.to(device), y.to(device)
            views = augment(x)
            labels = None if phase == "pretrain" else y
            res = model.losses(views, labels, phase=phase, align_weight=align_weight)
            optimizer.zero_grad(set_to_none=True)
            res.loss.backward()
            optimizer.step()
            if phase != "pretrain":
                model.shrink_weights_()
                correct += int((res.out.detach().argmax(1) == torch.cat([y, y])).sum())
            n = int(y.numel())
            total += n
            for k in sums:
                sums[k] += float(getattr(res, k).detach()) * n
        return {k: v / max(total, 1) for k, v in sums.items()}, correct / max(2 * total, 1)

    if pretrain_epochs:
        _set_trainable(model, True, True, False)
        opt = torch.optim.AdamW([g for g in model.param_groups(lrs, lr_scale) if g["name"] != "classification"])
        for e in range(1, pretrain_epochs + 1):
            t0 = time.perf_counter()
            terms, _ = run_epoch("pretrain", opt, f"pretrain {e}", align_weight=e / pretrain_epochs)
            row = dict(epoch=e, phase="pretrain", train_loss=terms["loss"], align=terms["align"],
                       tanh=terms["tanh"], seconds=time.perf_counter() - t0)
            history.append(row)
            say(f"pretrain {e:>3}/{pretrain_epochs}  loss {row['train_loss']:.4f} (align {row['align']:.4f}, "
                f"tanh {row['tanh']:.4f})  {row['seconds']:5.1f} s")
    test = {}
    current, opt = None, None
    for e in range(1, epochs + 1):
        phase = "finetune" if (pretrain_epochs and e <= finetune_epochs) else "train"
        if phase != current:
            _set_trainable(model, phase == "train", phase == "train", True)
            groups = model.param_groups(lrs, lr_scale)
            if phase == "finetune":
                groups = [g for g in groups if g["name"] == "classification"]
            opt, current = torch.optim.AdamW(groups), phase
        t0 = time.perf_counter()
        terms, acc = run_epoch(phase, opt, f"{phase} {e}")
        row = dict(epoch=e, phase=phase, train_loss=terms["loss"], align=terms["align"], tanh=terms["tanh"],
                   classification=terms["classification"], train_acc=acc, seconds=time.perf_counter() - t0)
        if test_loader is not None:
            test = evaluate_pipnet(model, test_loader, device)
            row.update({f"test_{k}": v for k, v in test.items()})
        history.append(row)
        say(f"{phase:<8} {e:>3}/{epochs}  loss {row['train_loss']:.4f} (LA {row['align']:.3f}, LT {row['tanh']:.3f},"
            f" LC {row['classification']:.3f})  train acc {acc:.3f}"
            + (f"  test acc {test['accuracy']:.3f}, global size {test['global_size']}/{test['num_prototypes']}, "
               f"local size {test['local_size_predicted']:.2f}" if test else "")
            + f"  {row['seconds']:5.1f} s")
    _set_trainable(model, True, True, True)
    return PIPNetTrainResult(history=history, test=test, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_pipnet_checkpoint(model: PIPNet, directory: str, extra: Optional[dict] = None) -> str:
    """``directory/model.pt`` (state_dict) and ``directory/config.json`` (``{"model": model.config(), ...}``)."""
    os.makedirs(directory, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(directory, WEIGHTS_FILE))
    from ._version import __version__

    config = {"format": "protofast.PIPNet/1", "protofast": __version__, "model": model.config(), **(extra or {})}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, default=str)
    return directory


def load_pipnet_checkpoint(directory: str, backbone: Optional[nn.Module] = None, map_location="cpu") -> PIPNet:
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    model = PIPNet.from_config(config["model"], backbone=backbone)
    model.load_state_dict(torch.load(os.path.join(directory, WEIGHTS_FILE), map_location=map_location,
                                     weights_only=True))
    return model.eval()


# ---------------------------------------------------------------------------------------------- figure
def _patch_box(loc: int, H: int, W: int, S: int, patch: int):
    """Feature cell ``loc = i·W + j`` of an H×W map → a ``patch × patch`` pixel box centred on the cell."""
    i, j = divmod(int(loc), W)
    cy, cx = (i + 0.5) * S / H, (j + 0.5) * S / W
    y0 = int(min(max(round(cy - patch / 2), 0), S - patch))
    x0 = int(min(max(round(cx - patch / 2), 0), S - patch))
    return y0, y0 + patch, x0, x0 + patch


def save_topk_figure(topk, images: Tensor, path: str, prototypes=None, patch: Optional[int] = None) -> str:
    """A PNG with one row per prototype in ``prototypes`` (default: the relevant ones whose top score exceeds
    0.1): its top-k image patches (``images [N, 3, S, S]`` indexed by ``topk.image_index``), each the
    ``patch``-pixel square (default 2 feature cells) around the location of the maximum, titled by score.
    Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if prototypes is None:
        prototypes = torch.nonzero(topk.relevant.cpu() & (topk.scores.cpu() > 0.1).any(1)).flatten().tolist()
    H, W = topk.feature_shape
    S = images.shape[-1]
    patch = patch or max(2, min(S, 2 * S // max(H, 1)))
    k = topk.scores.shape[1]
    rows = max(len(prototypes), 1)
    fig, axes = plt.subplots(rows, k, figsize=(1.1 * k, 1.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, p in enumerate(prototypes):
        for c in range(k):
            idx = int(topk.image_index[p, c])
            if idx < 0:
                continue
            y0, y1, x0, x1 = _patch_box(int(topk.location[p, c]), H, W, S, patch)
            axes[r, c].imshow(images[idx, :3, y0:y1, x0:x1].permute(1, 2, 0).clamp(0, 1).cpu().numpy(),
                              interpolation="nearest")
            axes[r, c].set_title(f"{float(topk.scores[p, c]):.2f}", fontsize=6)
        axes[r, 0].text(-0.15, 0.5, f"P{p}", transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def cli_train_pipnet(args) -> int:
    """``protofast train pipnet``: see protofast.cli."""
    import sys

    from torch.utils.data import DataLoader

    from . import data as pf_data
    from .models import SmallCNN

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "synthetic":
        train_set = pf_data.SyntheticParts(args.train_size, num_classes=10, image_size=32, seed=args.seed,
                                           split="train")
        test_set = pf_data.SyntheticParts(args.test_size, num_classes=10, image_size=32, seed=args.seed,
                                          split="test")
        num_classes = train_set.num_classes
    else:
        try:
            train_set = pf_data.load_digits_dataset("train", image_size=32, seed=args.seed)
            test_set = pf_data.load_digits_dataset("test", image_size=32, seed=args.seed)
        except ImportError as exc:
            print(f"protofast train: {exc}", file=sys.stderr)
            return 2
        num_classes = 10
    torch.manual_seed(args.seed)
    D = args.num_prototypes if args.num_prototypes is not None else 32
    shrink = args.weight_shrink if args.weight_shrink is not None else 5e-3
    backbone = SmallCNN(channels=(32, 32))
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=256)
    pretrain = args.pretrain_epochs if args.pretrain_epochs is not None else 0
    warmup = args.backbone_warmup_epochs
    epochs = args.epochs
    if args.out == "protofast-protopnet":                  # the protopnet default of the shared --out option
        args.out = "protofast-pipnet"
    print(f"protofast train pipnet: {args.dataset} ({len(train_set)} train / {len(test_set)} test, {num_classes} "
          f"classes), SmallCNN backbone, D = {D} prototypes, {torch.get_num_threads()} threads; backbone warm-up "
          f"{warmup} + pretrain {pretrain} + train {epochs} epochs")
    t0 = time.perf_counter()
    if warmup:
        warmup_backbone(backbone, train_loader, num_classes, epochs=warmup, lr=1e-3 * args.lr_scale,
                        progress=not args.no_progress, log=print)
    model = PIPNet(backbone, num_classes, num_prototypes=D, weight_shrink=shrink)
    lrs = {"backbone": 1e-3 * args.lr_scale, "add_on": 1e-3 * args.lr_scale, "classification": 0.05 * args.lr_scale}
    result = train_pipnet(model, train_loader, test_loader, epochs=epochs, pretrain_epochs=pretrain,
                          finetune_epochs=min(1, epochs), lrs=lrs, progress=not args.no_progress, seed=args.seed)
    seconds = time.perf_counter() - t0
    proj_loader = DataLoader(train_set, batch_size=256)
    topk = dataset_topk(model, proj_loader, k=10)
    zeroed = zero_unused_prototypes(model, topk)
    test = evaluate_pipnet(model, test_loader)
    with torch.no_grad():
        test_max = torch.cat([model.predict(x)[1].max(1).values for x, _ in test_loader])
    threshold = float(torch.quantile(test_max, 0.05))          # 95 % of the test images score at least this
    ood = {}
    for kind in ("background", "uniform"):
        noise = noise_images(args.test_size, 32, seed=args.seed + 1, kind=kind)
        ood[kind] = evaluate_pipnet(model, DataLoader(noise, batch_size=256))
        with torch.no_grad():
            _, noise_out, noise_pooled = model.predict(noise)
        ood[kind]["max_out"] = float(noise_out.max())
        ood[kind]["mean_max_presence"] = float(noise_pooled.max(1).values.mean())
        ood[kind]["fpr_at_95_tpr"] = float((noise_out.max(1).values >= threshold).float().mean())
    print(f"prototypes never above 0.1 in the training set (columns zeroed): {zeroed.tolist()}")
    print(f"test accuracy {test['accuracy']:.4f} (abstained on {test['abstained']:.2%} of test images)")
    for kind, label in (("background", "part-free noise images (SyntheticParts' background noise)"),
                        ("uniform", "uniform-noise images")):
        print(f"abstention on {args.test_size} pure-noise {label}: {ood[kind]['abstained']:.2%} (max output "
              f"{ood[kind]['max_out']:.3g}, mean of the largest inference presence score "
              f"{ood[kind]['mean_max_presence']:.3g}); with the paper's threshold at 95 % of the test images "
              f"(max output >= {threshold:.3g}) {ood[kind]['fpr_at_95_tpr']:.2%} of them are taken as "
              "in-distribution")
    print(f"global size {test['global_size']} of D = {model.num_prototypes}; local size per test image "
          f"{test['local_size_predicted']:.2f} (predicted class), {test['local_size_all']:.2f} (all classes); "
          f"sparsity {test['sparsity']:.2%}; training {seconds:.1f} s")
    extra = {"train": {k: v for k, v in vars(args).items() if k not in ("func", "argv")}, "test": test,
             "noise": ood, "zeroed_prototypes": zeroed.tolist(), "seconds": seconds,
             "history": result.history}
    save_pipnet_checkpoint(model, args.out, extra=extra)
    print(f"checkpoint written to {os.path.abspath(args.out)} (model.pt, config.json)")
    if not args.no_figure:
        try:
            path = save_topk_figure(topk, train_set[:][0] if hasattr(train_set, "tensors") else train_set.images,
                                    os.path.join(args.out, "prototypes_topk.png"),
                                    prototypes=model.used_prototypes().tolist())
            print(f"figure written to {os.path.abspath(path)}")
        except ImportError as exc:
            print(f"no figure: {exc}")
    return 0

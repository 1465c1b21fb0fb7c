"""PIP-Net presence scores and losses without the softmax map (SEMANTICS.md §2.2–§2.4).

PIP-Net's prototypes are the D channels of a feature map a [2B, D, H, W] (two augmented views, view 1 first).
With N = H·W and a per-location log-sum-exp lse[b, n] = log Σ_d exp a[b, d, n]:

    z[b, d, n]   = exp(a[b, d, n] − lse[b, n])                     channel softmax, recomputed, never stored
    pooled[b, d] = max_n z[b, d, n],  argmax[b, d] (first occurrence; NaN propagates from the last NaN location)
    dot[b, n]    = ⟨z[b, :, n], z[B + b, :, n]⟩                     b < B: the two views at the same location
    L_A          = −mean_{b,n} log(dot[b, n] + 1e-12)                (value of the symmetrised, detached form)

Gradients (upstream g_pooled [2B, D], g_A): the detach makes view 1 receive only the first half of the
symmetrised term and view 2 only the second, so with c = −g_A / (2·B·N) and w[b, n] = c / (dot[b, n] + 1e-12)

    G[b, d, n]   = g_pooled[b, d]·1[n = argmax[b, d]] + w[b', n]·z[other view, d, n]
    ∂L/∂a        = z · (G − Σ_d z·G),   Σ_d z·G = s_pool[b, n] + w·dot,   s_pool[b, n] = Σ_{d: argmax = n} pooled·g_pooled

so the backward needs only a, lse [2B, N], argmax, pooled and dot [B, N]: it recomputes z tile by tile and
writes ∂L/∂a once. The tanh term (on pooled [2B, D]) and the classification term (on out [2B, K]) are small and
run as ordinary autograd-tracked torch ops on the op's pooled output.

Operators (namespace ``protofast``):

    pipnet_forward(features, align) -> (pooled, argmax, align_loss, lse, dot)   (C++ on CPU, Triton on CUDA, else torch)
    pipnet_backward(grad_pooled, grad_align, features, lse, pooled, argmax, dot, align) -> grad_features

fp16 / bf16 features are computed in fp32: pooled, lse, dot and the losses are fp32, the gradient has the
features' dtype.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import backend_for
from .._validation import check_label_values, check_tensor
from ..reference.pipnet import PHASE_WEIGHTS, PIPNetLosses

EPS_A = 1e-12
EPS_T = 1e-8
_CHUNK_ELEMENTS = 1 << 23  # elements of the [chunk, D, H·W] temporaries of the torch path (32 MB in fp32): fewer,
# larger chunks matter on a loaded machine (each eager op is one OpenMP region), 2 x 32 views: 1<<22 -> 1<<23 halved
# the time, 1<<24 would cost the memory target (peak 0.50x of the original)

__all__ = ["pipnet_presence", "pipnet_losses", "PIPNetLosses"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _use_cpp(features: Tensor) -> bool:
    return backend_for(features.device) == "cpp"


def _use_triton(features: Tensor) -> bool:
    """The Triton kernels take float32 / float16 / bfloat16; float64 on CUDA runs the torch path."""
    return backend_for(features.device) == "triton" and features.dtype != torch.float64


def _rows_per_chunk(D: int, N: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, D * N))


# --------------------------------------------------------------------------------------------- torch path
def _softmax_chunk(x: Tensor, acc: torch.dtype):
    """x [n, D, N] -> (z, lse [n, N]): z = softmax over D (torch's fused kernel), and lse recovered from it as
    lse = max_d x − log max_d z (the largest z is 1/Σ exp(x − max), so this is max + log Σ exp(x − max))."""
    x = x.to(acc)
    z = torch.softmax(x, dim=1)
    lse = x.amax(dim=1) - torch.log(z.amax(dim=1))
    return z, lse


def _recompute_chunk(x: Tensor, lse: Tensor, acc: torch.dtype) -> Tensor:
    """z = exp(x − lse) for x [n, D, N], lse [n, N] (one temporary, exp in place)."""
    z = x.to(acc) - lse[:, None, :]
    return z.exp_()


def _max_over_locations(z: Tensor):
    """(max, argmax) over the last axis of z [n, D, N], as ``adaptive_max_pool2d`` (the original) computes them:
    first occurrence on ties, NaN wins (the last NaN location, PyTorch's pooling rule)."""
    v, i = F.adaptive_max_pool1d(z, 1, return_indices=True)
    return v[..., 0], i[..., 0]


def _forward_torch(a: Tensor, align: bool):
    S, D, H, W = a.shape
    N = H * W
    acc = _acc_dtype(a.dtype)
    x = a.reshape(S, D, N)
    pooled = torch.empty(S, D, dtype=acc, device=a.device)
    argmax = torch.empty(S, D, dtype=torch.long, device=a.device)
    lse = torch.empty(S, N, dtype=acc, device=a.device)
    if not align:
        step = _rows_per_chunk(D, N)
        for s0 in range(0, S, step):
            z, l = _softmax_chunk(x[s0:s0 + step], acc)
            lse[s0:s0 + step] = l
            pooled[s0:s0 + step], argmax[s0:s0 + step] = _max_over_locations(z)
        return pooled, argmax, pooled.new_zeros(()), lse, pooled.new_empty(0)
    B = S // 2
    dot = torch.empty(B, N, dtype=acc, device=a.device)
    step = max(1, _rows_per_chunk(D, N) // 2)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        for v in (0, 1):
            z, l = _softmax_chunk(x[v * B + b0:v * B + b1], acc)
            lse[v * B + b0:v * B + b1] = l
            pooled[v * B + b0:v * B + b1], argmax[v * B + b0:v * B + b1] = _max_over_locations(z)
            if v == 0:
                z1 = z
        dot[b0:b1] = z1.mul_(z).sum(1)
        del z1, z
    align_loss = -torch.log(dot + EPS_A).mean()
    return pooled, argmax, align_loss, lse, dot


def _backward_torch(g_pooled: Tensor, g_align: Tensor, a: Tensor, lse: Tensor, argmax: Tensor, dot: Tensor,
                    align: bool) -> Tensor:
    """grad = z·(w·(z_other − dot) − sp) + [n = argmax]·z·g (module docstring), chunk by chunk, with sp and the
    one-hot term as scatters of the [n, D] values z[argmax]·g."""
    S, D, H, W = a.shape
    N = H * W
    acc = lse.dtype
    x = a.reshape(S, D, N)
    grad = torch.empty(S, D, N, dtype=acc, device=a.device)
    g_pooled = g_pooled.to(acc)

    def pooled_terms(z, s0, s1):
        """(sp [n, N], zg [n, D, 1]) with zg = z[argmax]·g."""
        idx = argmax[s0:s1, :, None]
        zg = z.gather(2, idx) * g_pooled[s0:s1, :, None]
        sp = torch.zeros(s1 - s0, N, dtype=acc, device=a.device).scatter_add_(1, idx[..., 0], zg[..., 0])
        return sp, zg

    if not align:
        step = _rows_per_chunk(D, N)
        for s0 in range(0, S, step):
            s1 = min(S, s0 + step)
            z = _recompute_chunk(x[s0:s1], lse[s0:s1], acc)
            sp, zg = pooled_terms(z, s0, s1)
            out = torch.mul(z, sp.neg_()[:, None, :], out=grad[s0:s1])
            out.scatter_add_(2, argmax[s0:s1, :, None], zg)
        return grad.reshape(a.shape).to(a.dtype)
    B = S // 2
    c = -g_align.to(acc) / (2 * B * N)
    w = c / (dot + EPS_A)                                   # [B, N]
    wd = w * dot
    step = max(1, _rows_per_chunk(D, N) // 2)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        z1 = _recompute_chunk(x[b0:b1], lse[b0:b1], acc)
        z2 = _recompute_chunk(x[B + b0:B + b1], lse[B + b0:B + b1], acc)
        wb = w[b0:b1, None, :]
        for s0, s1, z, zo in ((b0, b1, z1, z2), (B + b0, B + b1, z2, z1)):
            sp, zg = pooled_terms(z, s0, s1)
            out = torch.mul(zo, wb, out=grad[s0:s1])
            out.sub_((wd[b0:b1] + sp)[:, None, :]).mul_(z)
            out.scatter_add_(2, argmax[s0:s1, :, None], zg)
        del z1, z2
    return grad.reshape(a.shape).to(a.dtype)


# --------------------------------------------------------------------------------------------- registered ops
@torch.library.custom_op("protofast::pipnet_forward", mutates_args=())
def pipnet_forward(features: Tensor, align: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(pooled [S, D], argmax [S, D] int64, align_loss [], lse [S, H·W], dot [S/2, H·W] or [0])."""
    if _use_cpp(features):
        a = features if features.dtype in (torch.float32, torch.float64) else features.float()
        return tuple(torch.ops.protofast_cpu.pipnet_forward(a.contiguous(), align))
    if _use_triton(features):
        from ..kernels import pipnet as tk

        return tk.pipnet_forward(features.contiguous(), align)
    return _forward_torch(features, align)


@pipnet_forward.register_fake
def _(features, align):
    S, D, H, W = features.shape
    acc = _acc_dtype(features.dtype)
    pooled = features.new_empty(S, D, dtype=acc)
    argmax = features.new_empty(S, D, dtype=torch.long)
    dot = features.new_empty(S // 2, H * W, dtype=acc) if align else features.new_empty(0, dtype=acc)
    return pooled, argmax, features.new_empty((), dtype=acc), features.new_empty(S, H * W, dtype=acc), dot


@torch.library.custom_op("protofast::pipnet_backward", mutates_args=())
def pipnet_backward(grad_pooled: Tensor, grad_align: Tensor, features: Tensor, lse: Tensor, pooled: Tensor,
                    argmax: Tensor, dot: Tensor, align: bool) -> Tensor:
    """∂L/∂features [S, D, H, W] from the upstream gradients of pooled and of the align loss."""
    if _use_cpp(features):
        a = features if features.dtype in (torch.float32, torch.float64) else features.float()
        g = torch.ops.protofast_cpu.pipnet_backward(grad_pooled.to(lse.dtype).contiguous(), grad_align.to(lse.dtype),
                                                    a.contiguous(), lse.contiguous(), pooled.contiguous(),
                                                    argmax.contiguous(), dot.contiguous(), align)
        return g.to(features.dtype)
    if _use_triton(features):
        from ..kernels import pipnet as tk

        return tk.pipnet_backward(grad_pooled.contiguous(), grad_align, features.contiguous(), lse.contiguous(),
                                  pooled.contiguous(), argmax.contiguous(), dot.contiguous(), align)
    return _backward_torch(grad_pooled, grad_align, features, lse, argmax, dot, align)


@pipnet_backward.register_fake
def _(grad_pooled, grad_align, features, lse, pooled, argmax, dot, align):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    features, align = inputs
    pooled, argmax, _, lse, dot = output
    ctx.save_for_backward(features, lse, pooled, argmax, dot)
    ctx.align = align
    ctx.mark_non_differentiable(argmax, lse, dot)


def _backward(ctx, g_pooled, _g_argmax, g_align, _g_lse, _g_dot):
    features, lse, pooled, argmax, dot = ctx.saved_tensors
    if g_pooled is None:
        g_pooled = torch.zeros_like(pooled)
    if g_align is None:
        g_align = pooled.new_zeros(())
    return pipnet_backward(g_pooled, g_align, features, lse, pooled, argmax, dot, ctx.align), None


pipnet_forward.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------- public API
def _check_features(features, *, pairs: bool) -> None:
    check_tensor("features", features)
    if features.dim() != 4:
        raise ValueError(f"features must be [B, D, H, W], got a {features.dim()}-d tensor of shape "
                         f"{tuple(features.shape)}")
    S, D, H, W = features.shape
    if S == 0 or D == 0 or H == 0 or W == 0:
        raise ValueError(f"features must be non-empty [B, D, H, W] with B, D, H, W >= 1, got shape "
                         f"{tuple(features.shape)}")
    if pairs and S % 2:
        raise ValueError(f"features must hold two views [2B, D, H, W] (an even batch), got {S} samples; pass "
                         "odd_batch='drop_last' to drop the last one")


def pipnet_presence(features: Tensor) -> tuple[Tensor, Tensor]:
    """PIP-Net presence scores: channel softmax at every location, then the global max over locations.

    Args:
        features: ``[B, D, H, W]`` pre-softmax features a (fp32 / fp64; fp16 / bf16 are computed in fp32).

    Returns:
        ``(pooled [B, D], argmax [B, D])`` with ``pooled[b, d] = max_{i,j} softmax_d(a[b, :, i, j])[d]`` and
        ``argmax`` the flat location ``i·W + j`` (int64, first occurrence on ties; NaN propagates).
        ``pooled`` is differentiable w.r.t. ``features`` (gradient to the argmax location through the softmax
        Jacobian). The softmax map is never materialised.
    """
    _check_features(features, pairs=False)
    pooled, argmax, *_ = pipnet_forward(features, False)
    return pooled, argmax


def _check_weight(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    return float(value)


def _check_optional_vector(name: str, t, size: int, size_name: str, device) -> None:
    if t is None:
        return
    check_tensor(name, t)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{name} must be [{size_name}] = [{size}], got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the features' device {device}, got {t.device}")


def _tanh_loss(pooled: Tensor) -> Tensor:
    p1, p2 = pooled.chunk(2)
    return -0.5 * (torch.log(torch.tanh(p1.sum(0)) + EPS_T).mean() + torch.log(torch.tanh(p2.sum(0)) + EPS_T).mean())


def pipnet_losses(features: Tensor, labels: Optional[Tensor] = None, classifier_weight: Optional[Tensor] = None,
                  classifier_bias: Optional[Tensor] = None, normalization_multiplier=2.0, phase: str = "train",
                  align_weight=None, tanh_weight=None, class_weight: Optional[Tensor] = None,
                  odd_batch: str = "error") -> PIPNetLosses:
    """PIP-Net's training loss on the two-view batch, fused (SEMANTICS.md §2.3).

    Args:
        features: ``[2B, D, H, W]`` pre-softmax features of ``[view 1; view 2]``.
        labels: ``[B]`` class indices of one view (the op uses ``[y; y]``), or ``[2B]`` used as given; None
            skips the classification term.
        classifier_weight: raw ``Wc [K, D]``; ``out = pooled · relu(Wc)ᵀ + bias`` (no gradient where Wc ≤ 0).
        classifier_bias: ``[K]`` or None.
        normalization_multiplier: κ in ``log1p(out^κ)`` (a number or a 0-dim tensor).
        phase: ``"pretrain"`` | ``"train"`` | ``"finetune"``: default weights (align, tanh, classification) =
            (1, 5, 0) | (5, 2, 2) | (0, 0, 2). In pretraining pass ``align_weight = epoch / epochs_pretrain``.
        align_weight, tanh_weight: override the phase's weights.
        class_weight: ``[K]`` class weights (weighted mean, as ``F.nll_loss(weight=...)``).
        odd_batch: ``"error"`` (ValueError) or ``"drop_last"`` (quanproto: drop the last sample).

    Returns:
        :class:`PIPNetLosses` ``(loss, align, tanh, classification, pooled [2B, D], out [2B, K] or None)``.
        ``loss = λ_A·L_A + λ_T·L_T + λ_C·L_C`` where terms of weight 0 are left out (as in the original).
        ``classification`` is a 0-dim zero and ``out`` None when the classifier (resp. labels) is not given.
    """
    check_tensor("features", features)
    if odd_batch not in ("error", "drop_last"):
        raise ValueError(f"odd_batch must be 'error' or 'drop_last', got {odd_batch!r}")
    if phase not in PHASE_WEIGHTS:
        raise ValueError(f"phase must be one of {tuple(PHASE_WEIGHTS)}, got {phase!r}")
    if features.dim() == 4 and features.shape[0] % 2 and odd_batch == "drop_last":
        features = features[:-1]
        if isinstance(labels, Tensor) and labels.dim() == 1 and labels.shape[0] == features.shape[0] + 1:
            labels = labels[:-1]
    _check_features(features, pairs=True)
    S, D = features.shape[:2]
    B = S // 2
    wa, wt, wc = PHASE_WEIGHTS[phase]
    align_weight, tanh_weight = _check_weight("align_weight", align_weight), _check_weight("tanh_weight",
                                                                                           tanh_weight)
    wa = wa if align_weight is None else align_weight
    wt = wt if tanh_weight is None else tanh_weight
    kappa = normalization_multiplier
    if isinstance(kappa, Tensor):
        if kappa.dim() != 0:
            raise ValueError(f"normalization_multiplier must be a number or a 0-dim tensor, got shape "
                             f"{tuple(kappa.shape)}")
    elif isinstance(kappa, bool) or not isinstance(kappa, numbers.Real):
        raise TypeError(f"normalization_multiplier must be a number or a 0-dim tensor, got {type(kappa).__name__}")
    K = None
    if classifier_weight is not None:
        check_tensor("classifier_weight", classifier_weight)
        if classifier_weight.dim() != 2 or classifier_weight.shape[1] != D or classifier_weight.shape[0] == 0:
            raise ValueError(f"classifier_weight must be [K, D] = [K, {D}] with K >= 1, got shape "
                             f"{tuple(classifier_weight.shape)}")
        if classifier_weight.device != features.device:
            raise ValueError(f"classifier_weight must be on the features' device {features.device}, got "
                             f"{classifier_weight.device}")
        K = classifier_weight.shape[0]
        _check_optional_vector("classifier_bias", classifier_bias, K, "K", features.device)
        _check_optional_vector("class_weight", class_weight, K, "K", features.device)
    elif classifier_bias is not None:
        raise ValueError("classifier_bias was given without classifier_weight")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integer class indices, got dtype {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] not in (B, S):
            raise ValueError(f"labels must be [B] = [{B}] (one view) or [2B] = [{S}], got shape "
                             f"{tuple(labels.shape)}")
        if labels.device != features.device:
            raise ValueError(f"labels must be on the features' device {features.device}, got {labels.device}")

    pooled, _argmax, align, _lse, _dot = pipnet_forward(features, True)
    tanh = _tanh_loss(pooled)
    classification = pooled.new_zeros(())
    out = None
    if classifier_weight is not None:
        weight = torch.relu(classifier_weight).to(pooled.dtype)
        bias = None if classifier_bias is None else classifier_bias.to(pooled.dtype)
        out = F.linear(pooled, weight, bias)
        if labels is not None:
            labels2 = (labels if labels.shape[0] == S else torch.cat([labels, labels])).long()
            if not torch.compiler.is_compiling():
                check_label_values(labels2, K)
            cw = None if class_weight is None else class_weight.to(pooled.dtype)
            classification = F.nll_loss(F.log_softmax(torch.log1p(out ** kappa), dim=1), labels2, weight=cw)
    loss = pooled.new_zeros(())
    for w, term in ((wa, align), (wt, tanh), (wc, classification)):
        if w != 0:
            loss = loss + w * term
    return PIPNetLosses(loss, align, tanh, classification, pooled, out)

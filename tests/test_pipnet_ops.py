"""protofast.pipnet_presence and protofast.pipnet_losses against the float64 reference (SEMANTICS.md §2.2–§2.4).

Values and all gradients (features, classifier weight, bias) with non-trivial upstream gradients, on every CPU
backend; ties in the max-pool (saturated softmax = exactly 1.0, constant channels), NaN, tiny and odd sizes,
the detach semantics of the align term per view, phase weights, the sparsity of relu(Wc), gradcheck, opcheck,
torch.compile and bad inputs.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protofast
import protofast.ops.pipnet as pipnet_ops
from conftest import _require_cpp, assert_close
from protofast.reference import pipnet as ref

ops = torch.ops.protofast


@pytest.fixture(params=("torch", "cpp"))
def backend(request, monkeypatch):
    _require_cpp(request.param)
    monkeypatch.setenv("PROTOFAST_BACKEND", request.param)
    return request.param


def _z_gap(a: torch.Tensor) -> float:
    """Smallest gap between the two largest softmax values of any (sample, channel) column (inf for N = 1, and
    for D = 1 where z = 1 everywhere: every location ties and the softmax has zero gradient)."""
    z = torch.softmax(a.detach().double(), dim=1).flatten(2)
    if z.shape[2] == 1 or z.shape[1] == 1:
        return float("inf")
    two = z.topk(2, dim=2).values
    return float((two[..., 0] - two[..., 1]).min())


def features(shape, dtype=torch.float64, seed=0, scale=2.0, min_gap=1e-4):
    """Random normal pre-softmax features whose max-pool has no near-ties (argmax unambiguous in any dtype)."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed + 1000 * attempt)
        a = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
        if _z_gap(a) >= min_gap:
            return a.requires_grad_()
    raise AssertionError("could not draw tie-free features")


def leaf64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def upstream(t, seed):
    """A non-trivial upstream gradient for output t (float64)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(t.shape, generator=g, dtype=torch.float64) * 2 - 0.5).to(t.dtype)


def classifier(K, D, dtype=torch.float64, seed=1, bias=False):
    g = torch.Generator().manual_seed(seed)
    W = (1.0 + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64)).to(dtype)
    W[0, : max(1, D // 3)] = -0.3          # pruned / negative weights: relu'd, no gradient
    if D > 1:
        W[min(1, K - 1), 1] = 0.0           # exactly 0: no gradient either (PyTorch's relu convention)
    W.requires_grad_()
    b = (0.1 * torch.rand(K, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    return W, b


SHAPES = [
    pytest.param((4, 7, 5, 4), id="4x7x5x4"),
    pytest.param((6, 13, 3, 7), id="odd"),
    pytest.param((2, 1, 3, 3), id="D1"),
    pytest.param((2, 9, 1, 1), id="HW1"),
    pytest.param((2, 40, 6, 6), id="D40"),
]


# --------------------------------------------------------------------------------------------- presence
def check_presence(a, dtype=None, rule_rows=()):
    """Values, argmax and gradient against the reference. ``rule_rows``: samples whose locations are exact copies
    of each other; their argmax is checked against the first-occurrence rule (0) instead of the oracle, because
    torch.softmax over a non-last dim is not bitwise equal across identical columns (vector body vs tail)."""
    dtype = dtype or a.dtype
    pooled, argmax = protofast.pipnet_presence(a)
    acc = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    assert pooled.dtype == acc and argmax.dtype == torch.long and pooled.shape == a.shape[:2]
    ar = leaf64(a)
    rp, ri = ref.pipnet_presence(ar)
    assert_close(pooled, rp, dtype, "pooled")
    rows = [r for r in range(a.shape[0]) if r not in rule_rows]
    assert torch.equal(argmax[rows], ri[rows]), "argmax differs from the first-occurrence reference"
    for r in rule_rows:
        assert torch.equal(argmax[r], torch.zeros_like(argmax[r])), "copies: the first location must win"
        ri[r] = 0
    up = upstream(rp, 5)
    (ga,) = torch.autograd.grad(pooled, a, up.to(pooled.dtype))
    if rule_rows:  # the oracle's gradient routed by the rule: recompute with the pooled values at location 0
        z = torch.softmax(ar, dim=1).flatten(2)
        rp = z.gather(2, ri[..., None])[..., 0]
    (gr,) = torch.autograd.grad(rp, ar, up)
    assert ga.dtype == a.dtype and ga.shape == a.shape
    assert_close(ga, gr, dtype, "grad features")
    return pooled, argmax, ga


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_presence_parity(backend, shape, dtype):
    check_presence(features(shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_presence_half_inputs_accumulate_in_fp32(backend, dtype):
    check_presence(features((3, 6, 4, 5), dtype, scale=1.0, min_gap=5e-3))


def test_presence_b1(backend):
    check_presence(features((1, 5, 4, 3)))


def test_presence_ties_first_occurrence(backend):
    """Saturated softmax (exactly 1.0 at several locations of a channel) and constant channels (every location
    ties): the argmax is the first location, and the gradient reaches only it."""
    for dtype in (torch.float32, torch.float64):
        a = features((3, 5, 4, 4), dtype, seed=3).detach().clone()
        # sample 0, channel 2: saturated at locations 5, 9, 14 (z = 1.0 exactly in fp32 and fp64)
        for loc in (14, 5, 9):
            a[0, :, loc // 4, loc % 4] = 0.0
            a[0, 2, loc // 4, loc % 4] = 1000.0
        # sample 1: every location has the same channel vector -> all 16 locations tie for every channel
        a[1] = torch.linspace(-1.0, 1.5, 5, dtype=dtype)[:, None, None]
        a.requires_grad_()
        pooled, argmax, ga = check_presence(a, rule_rows=(1,))
        assert pooled[0, 2].item() == 1.0 and argmax[0, 2].item() == 5
        assert torch.equal(argmax[1], torch.zeros(5, dtype=torch.long))
        # constant sample: the gradient reaches location (0, 0) only
        assert ga[1, :, 0, 0].abs().sum() > 0
        assert torch.count_nonzero(ga[1].flatten(1)[:, 1:]) == 0


def test_presence_nan_propagates(backend):
    for dtype in (torch.float32, torch.float64):
        a = features((2, 4, 3, 3), dtype, seed=4).detach().clone()
        a[1, 2, 1, 2] = float("nan")       # location 5 of sample 1 is NaN in every channel after the softmax
        a[1, 0, 2, 0] = float("nan")       # and location 6: PyTorch's pooling (the original) picks the last NaN
        pooled, argmax = protofast.pipnet_presence(a)
        rp, ri = ref.pipnet_presence(a.double())
        assert torch.isnan(pooled[1]).all() and not torch.isnan(pooled[0]).any()
        assert_close(pooled, rp, dtype)
        assert torch.equal(argmax, ri) and torch.equal(argmax[1], torch.full((4,), 6))


def test_presence_many_chunks(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "torch")
    monkeypatch.setattr(pipnet_ops, "_CHUNK_ELEMENTS", 16)
    check_presence(features((5, 6, 3, 4)))


def test_gradcheck_presence(backend):
    a = features((2, 4, 3, 2), seed=7, min_gap=1e-3)
    assert torch.autograd.gradcheck(lambda x: protofast.pipnet_presence(x)[0], (a,))


# --------------------------------------------------------------------------------------------- losses
def run_losses(a, labels, W, b, dtype, upstream_seed=11, **kwargs):
    """Compares every output and the gradients of a random combination of all outputs w.r.t. features,
    classifier weight and bias."""
    got = protofast.pipnet_losses(a, labels, W, b, **kwargs)
    ar, Wr, br = leaf64(a), leaf64(W), leaf64(b)
    cw = kwargs.pop("class_weight", None)
    want = ref.pipnet_losses(ar, labels, Wr, br, class_weight=None if cw is None else cw.double(), **kwargs)
    assert isinstance(got, protofast.PIPNetLosses)
    for name in ("loss", "align", "tanh", "classification", "pooled", "out"):
        x, r = getattr(got, name), getattr(want, name)
        if r is None:
            assert x is None, name
            continue
        assert_close(x, r, dtype, name)
    inputs = [t for t in (a, W, b) if t is not None and t.requires_grad]
    refs = [t for t in (ar, Wr, br) if t is not None and t.requires_grad]
    pairs = [(x, r) for x, r in zip(got, want) if r is not None and r.requires_grad]
    ups = [upstream(r, upstream_seed + i) for i, (_, r) in enumerate(pairs)]
    g = torch.autograd.grad([x for x, _ in pairs], inputs, [u.to(x.dtype) for u, (x, _) in zip(ups, pairs)],
                            allow_unused=True)
    gr = torch.autograd.grad([r for _, r in pairs], refs, ups, allow_unused=True)
    for name, x, r in zip(("features", "classifier_weight", "classifier_bias"), g, gr):
        if r is None:
            assert x is None or torch.count_nonzero(x) == 0, name
            continue
        assert x.dtype == (a.dtype if name == "features" else r.dtype if x is None else x.dtype)
        assert_close(x, r, dtype, f"grad {name}")
    return got, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_losses_parity(backend, shape, dtype):
    a = features(shape, dtype)
    K = 3
    W, b = classifier(K, shape[1], dtype, bias=True)
    labels = torch.arange(shape[0] // 2) % K
    run_losses(a, labels, W, b, dtype)


@pytest.mark.parametrize("phase", ["pretrain", "train", "finetune"])
def test_losses_phases(backend, phase):
    a = features((4, 6, 3, 5), torch.float64, seed=2)
    W, _ = classifier(4, 6)
    got, _ = run_losses(a, torch.tensor([1, 3]), W, None, torch.float64, phase=phase,
                        align_weight=0.3 if phase == "pretrain" else None)
    wa, wt, wc = {"pretrain": (0.3, 5, 0), "train": (5, 2, 2), "finetune": (0, 0, 2)}[phase]
    expected = wa * got.align + wt * got.tanh + wc * got.classification
    torch.testing.assert_close(got.loss, expected)


def test_losses_weight_overrides_labels_2b_kappa_tensor_class_weight(backend):
    a = features((6, 8, 4, 3), torch.float32, seed=5)
    W, b = classifier(5, 8, torch.float32, bias=True)
    labels = torch.tensor([4, 0, 2, 1, 3, 0])                       # [2B]: used as given
    cw = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.25])
    run_losses(a, labels, W, b, torch.float32, normalization_multiplier=torch.tensor(1.5), align_weight=0.7,
               tanh_weight=3.0, class_weight=cw)


def test_losses_half_inputs(backend):
    a = features((4, 6, 3, 4), torch.float16, scale=1.0, min_gap=5e-3)
    W, _ = classifier(3, 6, torch.float32)
    got, g = run_losses(a, torch.tensor([0, 2]), W, None, torch.float16)
    assert got.pooled.dtype == torch.float32 and got.loss.dtype == torch.float32 and g[0].dtype == torch.float16


def test_losses_without_classifier(backend):
    a = features((4, 5, 3, 3), torch.float64)
    got, _ = run_losses(a, None, None, None, torch.float64)
    assert got.out is None and got.classification.item() == 0.0
    got, _ = run_losses(a, None, classifier(3, 5)[0], None, torch.float64)   # out without labels
    assert got.out.shape == (4, 3) and got.classification.item() == 0.0


def test_losses_ties_and_nan(backend):
    """Saturated / constant locations in both views: values and gradients still equal the reference (the
    first-occurrence argmax decides which location gets the pooled gradient)."""
    a = features((4, 5, 4, 4), torch.float64, seed=9).detach().clone()   # N = 16: no vector tail in the oracle
    for loc in (7, 2, 4):
        a[2, :, loc // 4, loc % 4] = 0.0
        a[2, 1, loc // 4, loc % 4] = 1000.0                          # view 2, sample 0: z[1] = 1.0 at 2, 4, 7
    a[1] = torch.linspace(0.5, -1.0, 5, dtype=torch.float64)[:, None, None]   # view 1: all locations tie
    a.requires_grad_()
    W, _ = classifier(3, 5)
    got, _ = run_losses(a, torch.tensor([0, 1]), W, None, torch.float64)
    assert got.pooled[2, 1].item() == 1.0
    bad = a.detach().clone()
    bad[3, 0, 1, 1] = float("nan")
    got = protofast.pipnet_losses(bad, torch.tensor([0, 1]), W.detach())
    want = ref.pipnet_losses(bad, torch.tensor([0, 1]), W.detach())
    for name in ("loss", "align", "tanh", "pooled"):
        assert_close(getattr(got, name), getattr(want, name), torch.float64, name)
    assert torch.isnan(got.loss) and torch.isnan(got.pooled[3]).all()


def test_align_gradient_detach_per_view(backend):
    """∂L_A reaches view 1 only through ⟨r1, sg(r2)⟩ and view 2 only through ⟨r2, sg(r1)⟩: per view, the
    gradient equals half the gradient of the undetached −mean log(⟨r1, r2⟩ + eps) (dropping the detach would
    double it), and each view's half matches the reference's term exactly."""
    a = features((4, 6, 3, 4), torch.float64, seed=12)
    got = protofast.pipnet_losses(a)
    (ga,) = torch.autograd.grad(got.align, a)
    ar = leaf64(a)
    z = torch.softmax(ar, dim=1)
    z1, z2 = z.chunk(2)
    r1 = z1.permute(0, 2, 3, 1).reshape(-1, 6)
    r2 = z2.permute(0, 2, 3, 1).reshape(-1, 6)
    first = -torch.log((r1 * r2.detach()).sum(1) + 1e-12).mean()
    second = -torch.log((r2 * r1.detach()).sum(1) + 1e-12).mean()
    (g1,) = torch.autograd.grad(0.5 * first, ar, retain_graph=True)
    (g2,) = torch.autograd.grad(0.5 * second, ar, retain_graph=True)
    assert torch.count_nonzero(g1[2:]) == 0 and torch.count_nonzero(g2[:2]) == 0
    torch.testing.assert_close(ga[:2], g1[:2], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ga[2:], g2[2:], rtol=1e-10, atol=1e-13)
    undetached = -torch.log((r1 * r2).sum(1) + 1e-12).mean()
    (gu,) = torch.autograd.grad(undetached, ar)
    torch.testing.assert_close(ga, 0.5 * gu, rtol=1e-10, atol=1e-13)


def test_zero_and_negative_classifier_weights_get_no_gradient(backend):
    a = features((4, 6, 3, 3), torch.float64, seed=13)
    W, b = classifier(4, 6, bias=True)
    _, (_, gW, _) = run_losses(a, torch.tensor([0, 3]), W, b, torch.float64)
    dead = W.detach() <= 0
    assert dead.sum() >= 3 and torch.count_nonzero(gW[dead]) == 0
    assert torch.count_nonzero(gW[~dead]) == int((~dead).sum())


def test_odd_batch():
    a = features((5, 4, 3, 3), torch.float64, seed=14)
    with pytest.raises(ValueError, match="features"):
        protofast.pipnet_losses(a)
    W, _ = classifier(3, 4)
    got = protofast.pipnet_losses(a, torch.tensor([0, 1, 2, 0, 1]), W, odd_batch="drop_last")
    want = ref.pipnet_losses(a.detach()[:4], torch.tensor([0, 1, 2, 0]), W.detach())
    assert got.pooled.shape == (4, 4)
    for name in ("loss", "align", "tanh", "classification"):
        assert_close(getattr(got, name), getattr(want, name), torch.float64, name)


def test_losses_many_chunks(monkeypatch):
    monkeypatch.setenv("PROTOFAST_BACKEND", "torch")
    monkeypatch.setattr(pipnet_ops, "_CHUNK_ELEMENTS", 16)
    a = features((6, 5, 3, 3), torch.float64, seed=15)
    W, b = classifier(3, 5, bias=True)
    run_losses(a, torch.tensor([0, 1, 2]), W, b, torch.float64)


@pytest.mark.parametrize("phase", ["pretrain", "train", "finetune"])
def test_original_formulation_equals_oracle(phase):
    """The benchmark's eager original (M-Nauta/PIPNet's forward + calculate_loss) equals the oracle."""
    a = features((4, 6, 3, 4), torch.float64, seed=16)
    W, _ = classifier(3, 6)
    y = torch.tensor([2, 0])
    wa, wt, wc = {"pretrain": (0.4, 5.0, 0.0), "train": (5.0, 2.0, 2.0), "finetune": (0.0, 0.0, 2.0)}[phase]
    pf, pooled, out = ref.original_forward(a, W)
    loss = ref.original_calculate_loss(pf, pooled, out, y, wa, wt, wc, 2.0, phase == "pretrain",
                                       phase == "finetune", torch.nn.NLLLoss())
    ar, Wr = leaf64(a), leaf64(W)
    want = ref.pipnet_losses(ar, y, Wr, phase=phase, align_weight=wa if phase == "pretrain" else None)
    torch.testing.assert_close(loss, want.loss, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss, (a, W), allow_unused=True)
    gr = torch.autograd.grad(want.loss, (ar, Wr), allow_unused=True)
    for x, r in zip(g, gr):
        if r is None:
            assert x is None
        else:
            torch.testing.assert_close(x, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_losses(backend):
    a = features((4, 3, 2, 3), seed=17, min_gap=1e-3)
    W, b = classifier(3, 3, bias=True)
    W = (W.detach() + 0.05).requires_grad_()      # away from the relu kink
    y = torch.tensor([0, 2])
    # tanh + classification (+ pooled): plain gradients
    assert torch.autograd.gradcheck(
        lambda x, w, c: protofast.pipnet_losses(x, y, w, c, align_weight=0.0).loss, (a, W, b))
    # align: the detach halves the gradient of the value's function, so check 2·L_A − sg(L_A) (value L_A,
    # gradient twice ours = the undetached derivative that finite differences see)
    def align(x):
        value = protofast.pipnet_losses(x).align
        return 2 * value - value.detach()
    assert torch.autograd.gradcheck(align, (a,))


# --------------------------------------------------------------------------------------------- registration
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("align", [False, True], ids=["presence", "align"])
def test_opcheck(backend, align, dtype):
    a = features((4, 5, 3, 2), dtype, seed=18)
    torch.library.opcheck(ops.pipnet_forward.default, (a, align))
    pooled, argmax, _, lse, dot = ops.pipnet_forward(a.detach(), align)
    gp = upstream(pooled, 1).to(pooled.dtype)
    torch.library.opcheck(ops.pipnet_backward.default,
                          (gp, torch.tensor(0.7, dtype=pooled.dtype), a.detach(), lse, pooled, argmax, dot, align))


def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    try:
        a = features((4, 5, 3, 3), torch.float32, seed=19)
        W, b = classifier(3, 5, torch.float32, bias=True)
        y = torch.tensor([1, 2])

        def fn(x, w, c):
            out = protofast.pipnet_losses(x, y, w, c)
            return out.loss + out.pooled.sum() * 0.1 + protofast.pipnet_presence(x)[0].mean()

        def run(f):
            leaves = [t.detach().clone().requires_grad_() for t in (a, W, b)]
            v = f(*leaves)
            return v, torch.autograd.grad(v, leaves)

        v, g = run(fn)
        vc, gc = run(torch.compile(fn, fullgraph=True))
        torch.testing.assert_close(vc, v)
        for x, r in zip(gc, g):
            torch.testing.assert_close(x, r)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    a = torch.randn(4, 5, 3, 3)
    W = torch.ones(3, 5)
    y = torch.tensor([0, 1])
    cases = [
        (TypeError, "features", lambda: protofast.pipnet_presence(a.numpy())),
        (TypeError, "features", lambda: protofast.pipnet_presence(a.long())),
        (ValueError, "features", lambda: protofast.pipnet_presence(a[0])),
        (ValueError, "features", lambda: protofast.pipnet_presence(a[:0])),
        (ValueError, "features", lambda: protofast.pipnet_presence(a[:, :, :0])),
        (ValueError, "features", lambda: protofast.pipnet_losses(a[:3])),
        (ValueError, "odd_batch", lambda: protofast.pipnet_losses(a, odd_batch="drop")),
        (ValueError, "phase", lambda: protofast.pipnet_losses(a, phase="warmup")),
        (ValueError, "classifier_weight", lambda: protofast.pipnet_losses(a, y, torch.ones(3, 4))),
        (TypeError, "classifier_weight", lambda: protofast.pipnet_losses(a, y, torch.ones(3, 5, dtype=torch.long))),
        (ValueError, "classifier_bias", lambda: protofast.pipnet_losses(a, y, W, torch.ones(4))),
        (ValueError, "class_weight", lambda: protofast.pipnet_losses(a, y, W, class_weight=torch.ones(2))),
        (ValueError, "labels", lambda: protofast.pipnet_losses(a, torch.tensor([0, 1, 2]), W)),
        (TypeError, "labels", lambda: protofast.pipnet_losses(a, torch.tensor([0.0, 1.0]), W)),
        (TypeError, "labels", lambda: protofast.pipnet_losses(a, [0, 1], W)),
        (ValueError, "labels", lambda: protofast.pipnet_losses(a, torch.tensor([0, 3]), W)),
        (TypeError, "normalization_multiplier", lambda: protofast.pipnet_losses(a, y, W, normalization_multiplier="2")),
        (ValueError, "normalization_multiplier",
         lambda: protofast.pipnet_losses(a, y, W, normalization_multiplier=torch.ones(2))),
        (TypeError, "align_weight", lambda: protofast.pipnet_losses(a, align_weight="5")),
        (TypeError, "tanh_weight", lambda: protofast.pipnet_losses(a, tanh_weight=torch.ones(2))),
    ]
    for exc, name, fn in cases:
        with pytest.raises(exc, match=name):
            fn()


# --------------------------------------------------------------------------------------------- many tiles
def test_many_location_tiles_ties_and_nan(backend):
    """H·W = 144 > the C++ kernel's 64-location tile: parity across tiles, first occurrence across tile borders
    (ties at locations 130, 70, 5 -> 5; a constant sample -> 0), the last NaN across tiles (10, 100 -> 100).
    N is a multiple of 16 so that the oracle's torch.softmax gives bitwise-equal copies (no vector tail)."""
    for dtype in (torch.float32, torch.float64):
        a = features((4, 9, 12, 12), dtype, seed=21)
        W, b = classifier(3, 9, dtype, bias=True)
        run_losses(a, torch.tensor([2, 0]), W, b, dtype)
        a = a.detach().clone()
        for loc in (130, 70, 5):
            a[3, :, loc // 12, loc % 12] = 0.0
            a[3, 4, loc // 12, loc % 12] = 1000.0
        a[0] = torch.linspace(-0.5, 1.0, 9, dtype=dtype)[:, None, None]
        a.requires_grad_()
        pooled, argmax, ga = check_presence(a, rule_rows=(0,))
        assert argmax[3, 4].item() == 5 and pooled[3, 4].item() == 1.0
        assert torch.equal(argmax[0], torch.zeros(9, dtype=torch.long))
        assert torch.count_nonzero(ga[0].flatten(1)[:, 1:]) == 0
        run_losses(a, torch.tensor([2, 0]), W, b, dtype)
        bad = a.detach().clone()
        bad[1, 3, 10 // 12, 10 % 12] = float("nan")
        bad[1, 7, 100 // 12, 100 % 12] = float("nan")
        pooled, argmax = protofast.pipnet_presence(bad)
        assert torch.equal(argmax[1], torch.full((9,), 100)) and torch.isnan(pooled[1]).all()
        assert torch.equal(argmax, ref.pipnet_presence(bad.double())[1])


def test_non_contiguous_features(backend):
    """channels_last maps (a conv backbone's output) and strided views give the same values and gradients."""
    base = features((4, 6, 5, 6), torch.float64, seed=23).detach()
    W, b = classifier(3, 6, bias=True)
    want = protofast.pipnet_losses(base.clone().requires_grad_(), torch.tensor([0, 2]), W, b)
    for a in (base.to(memory_format=torch.channels_last), torch.stack([base, base], -1)[..., 0]):
        assert not a.is_contiguous()
        a = a.requires_grad_()
        got = protofast.pipnet_losses(a, torch.tensor([0, 2]), W, b)
        for name in ("loss", "align", "tanh", "classification", "pooled", "out"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-14)
        (g,) = torch.autograd.grad(got.loss, a)
        run_losses(a, torch.tensor([0, 2]), W, b, torch.float64)
        assert g.shape == a.shape


# --------------------------------------------------------------------------------------------- properties
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), D=st.integers(1, 12), H=st.integers(1, 9), W=st.integers(1, 9), K=st.integers(1, 4),
       seed=st.integers(0, 10_000), integer=st.booleans())
def test_property_random_shapes(backend, B, D, H, W, K, seed, integer):
    """Random shapes (including 64-location tiles and their tails) against the float64 oracle; integer-valued
    features create exact ties everywhere, where the loss values and the pooled values must still match."""
    g = torch.Generator().manual_seed(seed)
    shape = (2 * B, D, H, W)
    if integer:
        a = torch.randint(-2, 3, shape, generator=g).double()
        got = protofast.pipnet_losses(a, torch.arange(B) % K, torch.rand(K, D, generator=g, dtype=torch.float64))
        want = ref.pipnet_losses(a)
        for name in ("align", "tanh", "pooled"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-12)
        return
    a = features(shape, torch.float64, seed=seed, min_gap=1e-6)
    W_, b_ = classifier(K, D, bias=True, seed=seed + 1)
    run_losses(a, torch.arange(B) % K, W_, b_, torch.float64, upstream_seed=seed)

"""ProtoNMF conversion of a small trained CNN on protofast.data.SyntheticParts (SEMANTICS.md §5.2)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from protofast.data import SyntheticParts
from protofast.models import ProtoNMF, SmallCNN
from protofast.models.protonmf import protopnet_style_prototypes, reconstruction_error

K = 4


@pytest.fixture(scope="module")
def trained():
    """A small CNN + linear head on GAP features, trained for a few steps (the black box)."""
    torch.manual_seed(0)
    data = SyntheticParts(160, num_classes=K, image_size=32, seed=0)
    backbone = SmallCNN(channels=(16, 32), coords=False)
    head = nn.Linear(backbone.out_channels, K)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
    x, y = data.images, data.labels
    for step in range(60):
        idx = torch.randint(len(data), (32,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(head(backbone(x[idx]).mean((2, 3))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    loader = [(x[i:i + 40], y[i:i + 40]) for i in range(0, len(data), 40)]
    with torch.no_grad():
        acc = float((head(backbone(x).mean((2, 3))).argmax(1) == y).float().mean())
    return backbone, head, loader, data, acc


@pytest.fixture(scope="module")
def converted(trained):
    backbone, head, loader, _, _ = trained
    return ProtoNMF.from_classifier(backbone, head, loader, rank=3)


def class_features(model, loader, c):
    rows = []
    with torch.no_grad():
        for x, y in loader:
            f = model.backbone(x[y == c])
            rows.append(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]))
    return torch.cat(rows).double().clamp(min=0)


def test_logits_equal_original_head(trained, converted):
    backbone, head, loader, data, acc = trained
    assert acc > 0.35, f"the black box should have learnt something (accuracy {acc}, chance 0.25)"
    x = data.images[:64]
    with torch.no_grad():
        out = converted(x)
        original = head(backbone(x).mean((2, 3)))
    assert out.logits.dtype == torch.float32
    assert float((out.logits - original).abs().max()) <= 1e-4
    # contributions: a_i · mean_hw(f_hw · b_i), and the parts add up to the logit
    with torch.no_grad():
        f = backbone(x).double()
    sim = torch.einsum("bdhw,kpd->bkphw", f, converted.prototypes).mean((3, 4))
    torch.testing.assert_close(out.contributions.double(), sim * converted.coefficients, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.contributions.sum(2) + out.residual + head.bias.detach(), out.logits,
                               rtol=1e-5, atol=1e-5)


def test_head_reconstruction_and_residual(trained, converted):
    _, head, loader, _, _ = trained
    V = head.weight.detach().double()
    B, C, R = converted.prototypes, converted.coefficients, converted.residual_prototypes
    assert B.shape == (K, 3, 32) and C.shape == (K, 3) and R.shape == (K, 32)
    assert bool((B >= 0).all())
    torch.testing.assert_close(torch.einsum("kp,kpd->kd", C, B) + R, V, rtol=1e-12, atol=1e-12)
    # C is the least-squares optimum: the residual is orthogonal to every prototype (normal equations)
    torch.testing.assert_close(torch.einsum("kpd,kd->kp", B, R), torch.zeros(K, 3, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    # augmented prototypes: V = Σ a_i b'_i
    torch.testing.assert_close(torch.einsum("kp,kpd->kd", C, converted.augmented_prototypes), V, rtol=1e-9,
                               atol=1e-9)


def test_nmf_and_heatmaps_match_per_class_definitions(trained, converted):
    _, _, loader, _, _ = trained
    conv = converted.conversion
    assert conv["images_per_class"] == [int((y == c).sum()) for c in range(K) for y in
                                        [torch.cat([b[1] for b in loader])]]
    for c in (0, K - 1):
        A = class_features(converted, loader, c)
        E = conv["encodings"][c].double()
        B = converted.prototypes[c]
        assert E.shape == (A.shape[0], 3)
        assert abs(float(torch.linalg.norm(A - E @ B)) - float(conv["nmf_error"][c])) <= 1e-4 * float(
            torch.linalg.norm(A))
        # eq. 6: H = argmin ‖A − E B − H R‖² (least squares per row)
        R = converted.residual_prototypes[c]
        H = torch.linalg.lstsq(R[:, None], (A - E @ B).t()).solution.t()[:, 0]
        torch.testing.assert_close(conv["residual_heatmaps"][c].reshape(-1), H, rtol=1e-6, atol=1e-8)
        assert conv["residual_heatmaps"][c].shape == (conv["images_per_class"][c], 8, 8)
        # eq. 9: E' = argmin ‖A − E' B'‖²
        Bp = converted.augmented_prototypes[c]
        Ep = conv["augmented_encodings"][c]
        grad = (Ep @ Bp - A) @ Bp.t()                                   # normal equations hold at the optimum
        assert float(grad.abs().max()) <= 1e-6 * float(A.abs().max() * Bp.abs().max() * Bp.shape[1])


def test_table1_nmf_prototypes_reconstruct_better_than_protopnet_style(trained, converted):
    """The paper's Table 1 on the synthetic set: per class, min_E≥0 ‖A − E P‖/‖A‖ with the p NMF prototypes
    vs p ProtoPNet-style prototypes (nearest class patches to k-means centres), same encoder for both."""
    _, _, loader, _, _ = trained
    nmf_err, ppn_err = [], []
    for c in range(K):
        A = class_features(converted, loader, c)
        nmf_err.append(reconstruction_error(A, converted.prototypes[c]))
        ppn_err.append(reconstruction_error(A, protopnet_style_prototypes(A, 3, seed=0)))
    print(f"\nTable 1 (synthetic, p=3): NMF {sum(nmf_err) / K:.4f} vs ProtoPNet-style {sum(ppn_err) / K:.4f} "
          f"(relative reconstruction error, mean over {K} classes)")
    assert all(a < b for a, b in zip(nmf_err, ppn_err)), (nmf_err, ppn_err)


def test_protopnet_style_prototypes_are_class_patches():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(50, 6, generator=g, dtype=torch.float64)
    P = protopnet_style_prototypes(A, 4, seed=1)
    assert P.shape == (4, 6)
    hits = (P[:, None, :] == A[None]).all(2)
    assert bool(hits.any(1).all()) and int(hits.any(0).sum()) == 4        # 4 distinct rows of A
    with pytest.raises(ValueError, match="p must be"):
        protopnet_style_prototypes(A, 51)


def test_presence_maps_and_png(trained, converted, tmp_path):
    _, _, _, data, _ = trained
    x = data.images[:3]
    maps = converted.presence_maps(x, class_index=data.labels[:3])
    assert maps.shape == (3, 3, 8, 8) and bool((maps >= 0).all())
    # the presence maps are the fixed-basis NMF encodings of each image's features
    with torch.no_grad():
        f = converted.backbone(x[:1])
    rows = f.flatten(2).transpose(1, 2)[0].double().clamp(min=0)
    from protofast import nmf_encode

    E = nmf_encode([rows], converted.prototypes[int(data.labels[0])]).E[0]
    torch.testing.assert_close(maps[0].reshape(3, -1).t().double(), E, rtol=1e-5, atol=1e-6)
    sim = converted.similarity_maps(x)
    assert sim.shape == (3, K, 3, 8, 8)
    pytest.importorskip("matplotlib")
    path = tmp_path / "presence.png"
    converted.save_presence_png(x, path)
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="class_index"):
        converted.presence_maps(x, class_index=K)


def test_png_without_matplotlib(trained, converted, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        converted.save_presence_png(trained[3].images[:1], tmp_path / "x.png")


def test_sum_a_zero_raises_unless_eps(trained):
    """A head row of zeros gives a = 0 exactly, so Σ a_i = 0 and b_i + R/Σ a_i is undefined."""
    backbone, head, loader, _, _ = trained
    zero = nn.Linear(head.in_features, K)
    with torch.no_grad():
        zero.weight.copy_(head.weight)
        zero.weight[1] = 0
    with pytest.raises(ValueError, match=r"classes \[1\] have head coefficients summing to exactly 0"):
        ProtoNMF.from_classifier(backbone, zero, loader, rank=2)
    m = ProtoNMF.from_classifier(backbone, zero, loader, rank=2, sum_a_eps=1e-3)
    assert bool(torch.isfinite(m.augmented_prototypes).all())
    torch.testing.assert_close(m.augmented_prototypes[1], m.prototypes[1])          # R = 0 for a zero row
    x = trained[3].images[:8]
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, zero(backbone(x).mean((2, 3))), rtol=0, atol=1e-4)


def test_conversion_bad_inputs(trained):
    backbone, head, loader, _, _ = trained
    with pytest.raises(TypeError, match="head must be an nn.Linear"):
        ProtoNMF.from_classifier(backbone, nn.Sequential(head), loader)
    with pytest.raises(ValueError, match="in_features"):
        ProtoNMF.from_classifier(backbone, nn.Linear(7, K), loader)
    with pytest.raises(ValueError, match="no images of classes"):
        ProtoNMF.from_classifier(backbone, nn.Linear(head.in_features, K + 1), loader)
    with pytest.raises(ValueError, match="sum_a_eps"):
        ProtoNMF.from_classifier(backbone, head, loader, rank=2, sum_a_eps=-1.0)

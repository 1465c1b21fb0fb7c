"""protofast.pipnet_train: two-view augmentation, the pretrain/finetune/train schedule with the shrink, evaluation
with abstention, checkpoints, the top-k figure and a smoke test of ``protofast train pipnet`` (all tiny)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from protofast.cli import main
from protofast.data import SyntheticParts
from protofast.models import PIPNet, SmallCNN, dataset_topk
from protofast.pipnet_train import (CLI_TRIVIAL_OPS, TRIVIAL_OPS, TwoViewAugment, _shift, classification_loss, evaluate_pipnet,
                                    load_pipnet_checkpoint, noise_images, pooled_scores, prototype_firing,
                                    save_pipnet_checkpoint,
                                    save_topk_figure, train_classifier_cached, train_pipnet, warmup_backbone,
                                    parse_trivial_ops, trivial_augment_no_shape, trivial_ops,
                                    zero_class_independent_prototypes)


def _tiny(seed=0, D=8):
    torch.manual_seed(seed)
    return PIPNet(SmallCNN(channels=(8,)), 4, num_prototypes=D)


def _data(n=48):
    return SyntheticParts(n, num_classes=4, image_size=16, part_size=4, seed=0, split="train")


# ---------------------------------------------------------------------------------------------- augmentation
def test_shift_translates_each_image_and_replicates_the_border():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = _shift(x, torch.tensor([1, -2]), torch.tensor([0, 1]), pad=2)
    assert torch.equal(out[0, 0, 1:], x[0, 0, :-1]) and torch.equal(out[0, 0, 0], x[0, 0, 0])
    assert torch.equal(out[1, 0, :3, 1:], x[1, 0, 2:, :-1])
    assert torch.equal(out[1, 0, 3:, 1:], x[1, 0, 4:, :-1].expand(2, 4))      # bottom rows replicated
    assert torch.equal(_shift(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 2), x)


def test_two_views_share_the_geometry_and_differ_in_colour():
    x = _data(6).images
    plain = TwoViewAugment(shift=3, view_shift=0, brightness=0, contrast=0, gain=0, noise=0,
                           generator=torch.Generator().manual_seed(0))
    v = plain(x)
    assert v.shape == (12, 3, 16, 16) and torch.equal(v[:6], v[6:]) and not torch.equal(v[:6], x)
    aug = TwoViewAugment(generator=torch.Generator().manual_seed(0))
    v1 = aug(x)
    v2 = TwoViewAugment(generator=torch.Generator().manual_seed(0))(x)
    assert torch.equal(v1, v2) and not torch.equal(v1[:6], v1[6:])
    assert float(v1.min()) >= 0 and float(v1.max()) <= 1
    flipped = TwoViewAugment(shift=0, view_shift=0, flip=1.0, brightness=0, contrast=0, gain=0, noise=0)(x)
    torch.testing.assert_close(flipped[:6], x.flip(3))
    with pytest.raises(ValueError, match="flip"):
        TwoViewAugment(flip=2.0)
    with pytest.raises(ValueError, match="images"):
        aug(x[0])


def _pil_ops(img, bin_, sign):
    """The original's ops through PIL, on one ``[3, S, T]`` image in [0, 1] → name → ``[3, S, T]``."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps
    im = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    f = {name: 1 + sign * bin_ * m / 30 for name, m in
         (("brightness", 0.5), ("color", 0.02), ("contrast", 0.5), ("sharpness", 0.5))}
    out = {"identity": im,
           "brightness": ImageEnhance.Brightness(im).enhance(f["brightness"]),
           "color": ImageEnhance.Color(im).enhance(f["color"]),
           "contrast": ImageEnhance.Contrast(im).enhance(f["contrast"]),
           "sharpness": ImageEnhance.Sharpness(im).enhance(f["sharpness"]),
           "posterize": ImageOps.posterize(im, 8 - round(bin_ / 5)),
           "autocontrast": ImageOps.autocontrast(im),
           "equalize": ImageOps.equalize(im)}
    return {k: torch.from_numpy(np.asarray(v).astype("float32") / 255).permute(2, 0, 1) for k, v in out.items()}


@pytest.mark.parametrize("bin_,sign", [(0, 1.0), (7, -1.0), (30, 1.0), (30, -1.0), (13, 1.0)])
def test_trivial_ops_match_pil(bin_, sign):
    x = _data(3).images
    x = (x * 255).round() / 255                                 # 8-bit images, as PIL sees them
    ours = trivial_ops(x, torch.full((3,), bin_), torch.full((3,), sign))
    assert set(ours) == set(TRIVIAL_OPS)
    for i in range(3):
        ref = _pil_ops(x[i], bin_, sign)
        for name in TRIVIAL_OPS:
            tol = 0 if name in ("identity", "posterize", "equalize") else 2 / 255    # PIL rounds to 8 bits
            assert (ours[name][i] - ref[name]).abs().max() <= tol + 1e-6, (name, i)


def test_equalize_turns_a_noisy_background_into_full_range_noise():
    bg = noise_images(4, 32, seed=0, kind="background")
    eq = trivial_ops(bg, torch.zeros(4, dtype=torch.long), torch.ones(4))["equalize"]
    assert float(bg.std(dim=(2, 3)).max()) < 0.11 and float(eq.std(dim=(2, 3)).min()) > 0.27    # uniform: 0.289
    flat = torch.full((1, 3, 8, 8), 0.4)                        # one level: step 0, unchanged
    assert torch.equal(trivial_ops(flat, torch.zeros(1, dtype=torch.long), torch.ones(1))["equalize"],
                       (flat * 255).round() / 255)


def test_trivial_augment_picks_one_op_per_image():
    x = _data(48).images
    g = torch.Generator().manual_seed(3)
    out = trivial_augment_no_shape(x, g)
    g = torch.Generator().manual_seed(3)                        # replay the draws
    op = torch.randint(0, len(TRIVIAL_OPS), (48,), generator=g)
    bin_ = torch.randint(0, 31, (48,), generator=g)
    sign = torch.where(torch.rand(48, generator=g) < 0.5, -1.0, 1.0)
    ref = trivial_ops(x, bin_, sign)
    for i in range(48):
        assert torch.equal(out[i], ref[TRIVIAL_OPS[int(op[i])]][i])
    assert len(set(op.tolist())) == len(TRIVIAL_OPS)
    views = TwoViewAugment(trivial_ops=TRIVIAL_OPS, generator=torch.Generator().manual_seed(0))(x)
    assert views.shape == (96, 3, 16, 16) and 0 <= float(views.min()) and float(views.max()) <= 1
    with pytest.raises(ValueError, match="images"):
        trivial_augment_no_shape(x[:, :1])


def test_trivial_augment_op_subsets_and_parsing():
    x = _data(64).images
    ops = ("identity", "equalize", "equalize")                  # equalize drawn twice as often
    out = trivial_augment_no_shape(x, torch.Generator().manual_seed(1), ops=ops)
    g = torch.Generator().manual_seed(1)
    op = torch.randint(0, 3, (64,), generator=g)
    eq = trivial_ops(x, torch.zeros(64, dtype=torch.long), torch.ones(64), ops=("equalize",))
    assert set(eq) == {"equalize"}
    for i in range(64):
        assert torch.equal(out[i], x[i] if int(op[i]) == 0 else eq["equalize"][i])
    assert 30 <= int((op > 0).sum()) <= 55
    for bad in (("identity", "blur"), ()):
        with pytest.raises(ValueError, match="TrivialAugment ops"):
            trivial_augment_no_shape(x, ops=bad)
    with pytest.raises(ValueError, match="TrivialAugment ops"):
        TwoViewAugment(trivial_ops=("solarise",))
    assert parse_trivial_ops("original") == TRIVIAL_OPS and parse_trivial_ops("none") == ()
    assert parse_trivial_ops("Identity, equalize,equalize") == ops
    assert parse_trivial_ops(None) == tuple(CLI_TRIVIAL_OPS)
    with pytest.raises(ValueError, match="TrivialAugment ops"):
        parse_trivial_ops("identity,sharpen")


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _tiny()
    data = _data()
    w0 = model.classification.weight.detach().clone()
    lines = []
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    pre = {}

    class Spy(list):
        def __call__(self, msg):
            if msg.startswith("pretrain") and "w" not in pre:
                pre["w"] = model.classification.weight.detach().clone()
            self.append(msg)

    spy = Spy()
    result = train_pipnet(model, loader, DataLoader(data, batch_size=48), epochs=2, pretrain_epochs=1,
                          finetune_epochs=1, progress=False, log=spy)
    torch.set_num_threads(threads)
    return model, result, spy, w0, pre["w"], data


def test_schedule_shrink_and_history(trained):
    model, result, lines, w0, w_after_pretrain, _ = trained
    assert [r["phase"] for r in result.history] == ["pretrain", "finetune", "train"]
    assert torch.equal(w_after_pretrain, w0)                           # the classifier is not stepped in pretraining
    w = model.classification.weight.detach()
    assert float(w.min()) >= 0 and not torch.equal(w, w0)
    assert float(model.classification.normalization_multiplier) == 2.0
    for row in result.history:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("train_loss", "align", "tanh"))
    assert result.history[0]["tanh"] > 0 and "test_accuracy" in result.history[-1]
    assert len(lines) == 3 and lines[1].startswith("finetune")
    assert set(result.test) >= {"accuracy", "abstained", "local_size_all", "local_size_predicted", "global_size",
                                "sparsity"}
    assert all(p.requires_grad for p in model.parameters() if p is not model.classification.normalization_multiplier)


def test_finetune_steps_only_the_classifier():
    torch.manual_seed(1)
    model = _tiny(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = DataLoader(_data(32), batch_size=16)
    train_pipnet(model, loader, None, epochs=1, pretrain_epochs=0, finetune_epochs=1, progress=False, log=None)
    # without pretraining there is no finetune phase (the original): everything moves
    assert not torch.equal(model.backbone.stages[0][0].weight, before["backbone.stages.0.0.weight"])
    model2 = _tiny(2)
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    res = train_pipnet(model2, loader, None, epochs=1, pretrain_epochs=1, finetune_epochs=1, progress=False, log=None)
    assert [r["phase"] for r in res.history] == ["pretrain", "finetune"]
    w = model2.classification.weight.detach()
    assert not torch.equal(w, before["classification.weight"])


def test_backbone_warmup_trains_the_backbone_only():
    torch.manual_seed(0)
    backbone = SmallCNN(channels=(8,))
    before = [p.detach().clone() for p in backbone.parameters()]
    lines = []
    accs = warmup_backbone(backbone, DataLoader(_data(32), batch_size=16), 4, epochs=2, log=lines.append)
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs) and len(lines) == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))


# ---------------------------------------------------------------------------------------------- classifier only
def test_classification_loss_is_the_classification_term_of_pipnet_losses():
    model = _tiny(3)
    with torch.no_grad():
        model.classification.weight.uniform_(-0.5, 2.0)                       # some weights <= 0 (relu)
    x = torch.rand(12, 3, 16, 16)                                             # two views of 6 images
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    res = model.losses(x, y, phase="finetune")
    torch.testing.assert_close(classification_loss(model, res.pooled, torch.cat([y, y])), res.classification)
    torch.testing.assert_close(res.loss, 2 * res.classification)


def test_pooled_scores_are_the_presence_scores_of_every_batch():
    model = _tiny(4)
    data = _data(20)
    pooled, labels = pooled_scores(model, DataLoader(data, batch_size=7))
    with torch.no_grad():
        ref = model.presence(data.images)[0]
        ref_inf = model.presence(data.images, inference=True)[0]
    torch.testing.assert_close(pooled, ref)
    torch.testing.assert_close(pooled_scores(model, DataLoader(data, batch_size=7), inference=True)[0], ref_inf)
    assert torch.equal(labels, data.labels)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_classifier_only_phase_steps_only_the_classifier_and_shrinks(optimizer):
    torch.manual_seed(5)
    model = _tiny(5, D=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    pooled = torch.rand(40, 6, generator=g) * 0.2
    pooled[torch.arange(40), labels] = 1.0                                   # prototype k marks class k
    pooled[:, 5] = 0.0                                                        # never present: zero gradient
    w5 = float(model.classification.weight.detach()[:, 5].min())
    r = train_classifier_cached(model, pooled, labels, epochs=3, batch_size=8, optimizer=optimizer, lr=0.05,
                                weight_decay=1e-4, weight_shrink=0.01, seed=0)
    assert r["steps"] == 3 * 5 and r["train_acc"] == 1.0 and r["loss"] > 0
    for n, p in model.named_parameters():
        if n == "classification.weight":
            assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n                               # backbone, add-on, kappa frozen
    W = model.classification.weight.detach()
    assert float(W.min()) >= 0
    # the never-present prototype gets no classification gradient: only the shrink (15 steps × 0.01) and, for
    # SGD, the L2 decay (at most a factor (1 - 0.05·1e-4)^15·…) move it
    expected = (before["classification.weight"][:, 5] - 0.15).clamp(min=0)
    torch.testing.assert_close(W[:, 5], expected, atol=2e-3, rtol=0)
    assert w5 > 0.15
    assert model.weight_shrink == 1e-3                                       # restored
    assert model.classification.weight.requires_grad


def test_zero_class_independent_prototypes():
    model = _tiny(8, D=5)                                                     # 4 classes
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    pooled = torch.zeros(10, 5)
    pooled[:, 0] = 0.5                                                        # on every image: zeroed
    pooled[:, 1] = 0.5
    pooled[9, 1] = 0.05                                                       # missing on 1 of 4 class-3 images
    pooled[labels == 2, 2] = 1.0                                              # class-specific
    pooled[:, 3] = 0.1                                                        # exactly at the threshold: present
    pooled[:, 4] = 0.0999
    w0 = model.classification.weight.detach().clone()
    cols = zero_class_independent_prototypes(model, pooled, labels, fraction=0.99)
    assert cols.tolist() == [0, 3]
    W = model.classification.weight.detach()
    assert float(W[:, [0, 3]].abs().max()) == 0.0 and torch.equal(W[:, [1, 2, 4]], w0[:, [1, 2, 4]])
    assert zero_class_independent_prototypes(model, pooled, labels, fraction=0.75).tolist() == [0, 1, 3]
    # a class without images does not count; threshold override
    assert zero_class_independent_prototypes(_tiny(8, D=5), pooled[:4], labels[:4], threshold=0.09).tolist() == \
        [0, 1, 3, 4]
    with pytest.raises(ValueError, match="fraction"):
        zero_class_independent_prototypes(model, pooled, labels, fraction=0.0)
    with pytest.raises(ValueError, match="pooled"):
        zero_class_independent_prototypes(model, pooled[:, :3], labels)
    with pytest.raises(ValueError, match="labels"):
        zero_class_independent_prototypes(model, pooled, labels[:3])


def test_classifier_only_phase_rejects_bad_arguments():
    model = _tiny(7, D=4)
    pooled, labels = torch.rand(8, 4), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier_cached(model, pooled, labels, epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        train_classifier_cached(model, pooled, labels, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier_cached(model, pooled, labels, epochs=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="pooled"):
        train_classifier_cached(model, torch.rand(8, 3), labels, epochs=1)
    with pytest.raises(ValueError, match="labels"):
        train_classifier_cached(model, pooled, labels[:5], epochs=1)
    with pytest.raises(ValueError, match="weight_shrink"):
        train_classifier_cached(model, pooled, labels, epochs=1, weight_shrink=-1.0)


def test_train_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        train_pipnet(torch.nn.Linear(2, 2), [], epochs=1)
    with pytest.raises(ValueError, match="pretrain_epochs"):
        train_pipnet(_tiny(), [], epochs=1, pretrain_epochs=-1)


def test_evaluate_counts_abstentions_on_noise():
    model = _tiny(3)
    noise = noise_images(8, 16, seed=0)
    assert noise.shape == (8, 3, 16, 16) and torch.equal(noise, noise_images(8, 16, seed=0))
    background = noise_images(8, 16, seed=0, kind="background")
    assert float(background.min()) >= 0 and float(background.max()) <= 1
    assert float(background.mean(dim=(2, 3)).std(0).max()) < 0.2 < float(noise.std())   # flat colour + small noise
    with pytest.raises(ValueError, match="kind"):
        noise_images(2, kind="gaussian")
    res = evaluate_pipnet(model, DataLoader(noise, batch_size=4))
    assert res["abstained"] == 0.0 and res["n"] == 8
    with torch.no_grad():
        model.classification.weight.zero_()
    res = evaluate_pipnet(model, DataLoader(noise, batch_size=4))
    assert res["abstained"] == 1.0 and res["global_size"] == 0 and res["sparsity"] == 1.0
    assert res["local_size_predicted"] == 0.0 and res["local_size_all"] == 0.0
    w = torch.full_like(model.classification.weight, 0.0025)
    with torch.no_grad():
        model.classification.weight.copy_(w)
    evaluate_pipnet(model, DataLoader(noise, batch_size=4), shrink_in_eval=True)       # the original's quirk
    torch.testing.assert_close(model.classification.weight.detach(), torch.full_like(w, 0.0005))


def test_prototype_firing_counts_cells_and_matches_abstention():
    model = _tiny(5)
    with torch.no_grad():       # sharper softmax maps; prototypes 0, 2, 3 rarer; only 0, 2, 3 carry a weight
        model.add_on.weight.mul_(6.0)
        model.add_on.bias[[0, 2, 3]] -= torch.tensor([1.5, 3.0, 2.5])
        model.classification.weight.abs_()
        model.classification.weight[:, [1, 4, 5, 6, 7]] = 0
    x = torch.cat([noise_images(12, 16, seed=1), noise_images(12, 16, seed=2, kind="background"), _data(12).images])
    res = prototype_firing(model, DataLoader(x, batch_size=5))
    assert res == prototype_firing(model, DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=36))
    with torch.no_grad():                        # dense count from the full softmax maps
        fires = model.softmax_maps(x)[:, [0, 2, 3]] >= 0.1                # [N, 3, H, W]
    assert res["cells"] == fires.shape[2] * fires.shape[3] and res["n"] == 36
    assert res["cell_rate"] == pytest.approx(float(fires.any(1).float().mean()))
    per = fires.flatten(2).any(2).float().mean(0)
    assert res["per_prototype"] == pytest.approx({d: float(r) for d, r in zip([0, 2, 3], per) if r > 0})
    assert list(res["per_prototype"].values()) == sorted(res["per_prototype"].values(), reverse=True)
    assert set(res["per_prototype"]) == {0, 2, 3}
    assert 0 < res["cell_rate"] < res["image_rate"] < 1, res
    # bias-free classifier: an image abstains iff no used prototype fires anywhere
    assert res["image_rate"] == pytest.approx(1 - evaluate_pipnet(model, DataLoader(x, batch_size=8))["abstained"])
    with torch.no_grad():
        model.classification.weight.zero_()
    none = prototype_firing(model, DataLoader(x, batch_size=8))
    assert none["cell_rate"] == none["image_rate"] == 0 and none["per_prototype"] == {}


def test_checkpoint_round_trip_and_figure(trained, tmp_path):
    model, _, _, _, _, data = trained
    save_pipnet_checkpoint(model, str(tmp_path / "ck"), extra={"note": 1})
    loaded = load_pipnet_checkpoint(str(tmp_path / "ck"))
    x = data.images[:5]
    model.eval()
    for a, b in zip(model(x, inference=True), loaded(x, inference=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert json.load(open(tmp_path / "ck" / "config.json"))["note"] == 1
    topk = dataset_topk(model, DataLoader(data, batch_size=20), k=4)
    path = save_topk_figure(topk, data.images, str(tmp_path / "topk.png"), prototypes=[0, 1, 2])
    assert os.path.getsize(path) > 1000


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "pipnet", "--epochs", "1", "--pretrain-epochs", "1", "--train-size", "64",
                   "--test-size", "32", "--batch-size", "32", "--num-prototypes", "8", "--threads", "1",
                   "--backbone-warmup-epochs", "1", "--weight-shrink", "0.01",
                   "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert rc == 0
    for key in ("test accuracy", "pure-noise part-free", "uniform-noise", "global size", "of D = 8", "local size",
                "sparsity", "backbone warm-up  1/1", "taken as in-distribution"):
        assert key in text, text
    assert (out / "model.pt").is_file() and (out / "prototypes_topk.png").is_file()
    config = json.load(open(out / "config.json"))
    assert config["model"]["num_prototypes"] == 8 and config["model"]["weight_shrink"] == 0.01
    assert set(config["noise"]) == {"background", "uniform"}
    assert 0 <= config["noise"]["uniform"]["fpr_at_95_tpr"] <= 1
    for kind in ("background", "uniform"):
        ood = config["noise"][kind]
        assert ood["firing"]["image_rate"] == pytest.approx(1 - ood["abstained"])
        assert 0 <= ood["max_out_vs_test_median"]["0.5"] <= ood["max_out_vs_test_median"]["0.95"]
    assert "largest output / median largest test output" in text


def test_cli_classifier_only_phase(tmp_path, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "pipnet", "--epochs", "1", "--train-size", "64", "--test-size", "32",
                   "--batch-size", "32", "--num-prototypes", "8", "--threads", "1", "--backbone-warmup-epochs", "1",
                   "--classifier-only-epochs", "3", "--classifier-only-optimizer", "sgd",
                   "--classifier-only-weight-decay", "1e-4", "--classifier-only-shrink", "2e-3",
                   "--zero-class-independent", "0.99",
                   "--no-progress", "--no-figure", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert rc == 0 and "classifier-only phase: 6 steps of sgd" in text and "shrink 0.002" in text, text
    assert "training images of every class (columns zeroed): [" in text
    config = json.load(open(out / "config.json"))
    assert config["classifier_only"]["steps"] == 6 and config["train"]["classifier_only_optimizer"] == "sgd"
    assert config["model"]["weight_shrink"] == 1e-3                      # the phase's shrink is not stored


# ---------------------------------------------------------------------------------------------- data
def test_synthetic_part_sets_classes_are_part_sets_at_random_places():
    from protofast.pipnet_train import SyntheticPartSets

    d = SyntheticPartSets(144, num_classes=6, num_parts=5, parts_per_class=2, seed=3, split="train")
    assert d.images.shape == (144, 3, 32, 32) and d.num_classes == 6 and len(d) == 144
    assert len(set(d.class_part_sets)) == 6 and all(len(s) == 2 for s in d.class_part_sets)
    assert torch.equal(d.labels.bincount(), torch.full((6,), 24))          # 144 = 2 × 6 classes × 12 layouts
    regions = {k: set() for k in range(6)}
    for i in range(144):
        boxes = d.part_locations(i)
        k = int(d.labels[i])
        class_boxes = boxes[boxes[:, 0] < d.num_parts]
        assert set(class_boxes[:, 0].tolist()) == set(d.class_part_sets[k])   # the class's parts, nothing else
        for p, top, left, _, _ in class_boxes.tolist():
            regions[k].add((p, (top // 16) * 2 + left // 16))
    assert all(len(r) == 8 for r in regions.values())                     # each part seen in all 4 quadrants
    assert d.config()["num_classes"] == 6 and "SyntheticPartSets(" in repr(d)
    again = SyntheticPartSets(**d.config())
    assert torch.equal(again.images, d.images) and torch.equal(again.labels, d.labels)
    test = SyntheticPartSets(24, num_classes=6, num_parts=5, seed=3, split="test")
    assert test.class_part_sets == d.class_part_sets and not torch.equal(test.images, d.images[:24])
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticPartSets(10, num_classes=11, num_parts=5, parts_per_class=2)
    with pytest.raises(ValueError, match="parts_per_class"):
        SyntheticPartSets(10, parts_per_class=5)


def test_cli_part_sets_uses_the_part_set_data_and_no_coordinates(tmp_path, capsys):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        rc = main(["train", "pipnet", "--part-sets", "--epochs", "1", "--train-size", "64", "--test-size", "32",
                   "--batch-size", "32", "--num-prototypes", "8", "--threads", "1", "--backbone-warmup-epochs", "1",
                   "--no-progress", "--no-figure", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert rc == 0 and "SyntheticPartSets(" in text and "8 classes" in text and "no coordinate channels" in text
    config = json.load(open(out / "config.json"))
    assert config["model"]["backbone"]["kwargs"]["coords"] is False and config["model"]["num_classes"] == 8
    assert config["train"]["part_sets"] is True


def _train_once(**kwargs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _tiny()
        loader = DataLoader(_data(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        result = train_pipnet(model, loader, None, epochs=2, pretrain_epochs=0, progress=False, log=None, **kwargs)
    finally:
        torch.set_num_threads(threads)
    return model, result


def test_train_phase_align_weight():
    default, res = _train_once()
    five, _ = _train_once(align_weight=5.0)
    none, res0 = _train_once(align_weight=0.0)
    for a, b in zip(default.parameters(), five.parameters()):
        assert torch.equal(a, b)                                   # None is the original's λ_A = 5
    assert not torch.equal(default.add_on.weight, none.add_on.weight)
    # the reported align term is the unweighted L_A; the loss changes with its weight
    assert res0.history[0]["align"] > 0
    assert res0.history[0]["train_loss"] < res.history[0]["train_loss"]


def test_zero_class_independent_during_training():
    model, res = _train_once(zero_class_independent=0.001, zero_class_independent_start=2)
    assert "zeroed" not in res.history[0]                          # epoch 1 < start
    zeroed = res.history[1]["zeroed"]
    assert zeroed                                                  # F = 0.001: every prototype seen in every class
    pooled, labels = pooled_scores(model, DataLoader(_data(), batch_size=48))
    present = pooled >= model.inference_clamp
    every = torch.stack([present[labels == k].float().mean(0) for k in labels.unique()]).min(0).values >= 0.001
    assert set(torch.nonzero(every).flatten().tolist()) == set(zeroed)
    assert float(model.classification.weight.detach()[:, zeroed].abs().max()) == 0.0
    off, res_off = _train_once()
    assert all("zeroed" not in row for row in res_off.history)


def test_cli_defaults_to_part_sets_and_no_part_sets_uses_quadrant_classes(tmp_path, capsys):
    args = ["train", "pipnet", "--epochs", "1", "--train-size", "64", "--test-size", "32", "--batch-size", "32",
            "--num-prototypes", "8", "--threads", "1", "--backbone-warmup-epochs", "1", "--no-progress", "--no-figure",
            "--classifier-only-epochs", "1"]
    threads = torch.get_num_threads()
    try:
        assert main(args + ["--out", str(tmp_path / "a")]) == 0
        text = capsys.readouterr().out
        assert "SyntheticPartSets(" in text and "align weight 0.1" in text and "clutter=0" in text
        assert f"TrivialAugment colour ops {','.join(CLI_TRIVIAL_OPS)})" in text
        assert "own part prototypes per class" in text and "classes without" in text
        assert main(args + ["--out", str(tmp_path / "b"), "--no-part-sets", "--align-weight", "5", "--clutter", "3",
                            "--augment-noise", "0.1", "--trivial-ops", "none"]) == 0
        text = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert "SyntheticParts(" in text and "with coordinate channels" in text and "align weight 5" in text
    assert "clutter=3" in text and "TrivialAugment colour ops none" in text
    assert json.load(open(tmp_path / "a" / "config.json"))["train"]["trivial_ops"] == list(CLI_TRIVIAL_OPS)
    config = json.load(open(tmp_path / "b" / "config.json"))
    assert config["train"]["part_sets"] is False and config["train"]["augment_noise"] == 0.1
    assert config["train"]["trivial_ops"] == []


def test_class_part_prototypes():
    from protofast.pipnet_train import class_part_prototypes
    model = PIPNet(SmallCNN(channels=(8,)), 3, num_prototypes=5)
    with torch.no_grad():
        model.classification.weight.zero_()
        model.classification.weight[:, :4] = 1.0                  # prototype 4 has no weight: never "own"
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    pooled = torch.zeros(30, 5)
    pooled[:10, 0] = 0.9                                           # P0: every class-0 image, no other → own of 0
    pooled[:10, 4] = 0.9                                           # P4: same pattern but unused
    pooled[:, 1] = 0.5                                             # P1: every image → nobody's own
    pooled[10:19, 2] = 0.3                                         # P2: 9 of 10 class-1 images (= 0.9) → own of 1
    pooled[20:28, 3] = 0.3                                         # P3: 8 of 10 class-2 images → below 0.9
    pooled[:4, 3] = 0.3                                            # ... and 40 % of class 0 (< 0.5)
    own = class_part_prototypes(model, pooled, labels)
    assert own == {0: [0], 1: [2], 2: []}
    assert class_part_prototypes(model, pooled, labels, own=0.8) == {0: [0], 1: [2], 2: [3]}
    assert class_part_prototypes(model, pooled, labels, own=0.8, other=0.4) == {0: [0], 1: [2], 2: []}
    assert class_part_prototypes(model, pooled, labels, threshold=0.4) == {0: [0], 1: [], 2: []}
    assert class_part_prototypes(model, pooled[:20], labels[:20]) == {0: [0], 1: [2], 2: []}   # class 2 absent
    with pytest.raises(ValueError, match="pooled"):
        class_part_prototypes(model, pooled[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        class_part_prototypes(model, pooled, labels[:5])

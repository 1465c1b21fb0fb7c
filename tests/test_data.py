"""protofast.data: the seeded synthetic parts dataset and the optional digits loader."""
from __future__ import annotations

import time

import pytest
import torch

from protofast.data import SyntheticParts, load_digits_dataset


def test_deterministic_and_split_dependent():
    a = SyntheticParts(40, seed=3)
    b = SyntheticParts(40, seed=3)
    test = SyntheticParts(40, seed=3, split="test")
    other = SyntheticParts(40, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, test.images)
    assert a.class_parts == test.class_parts                 # both splits share the class definitions
    assert not torch.equal(a.images, other.images)
    x, y = a[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int) and y == int(a.labels[5])
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    assert torch.equal(torch.bincount(a.labels, minlength=10), torch.full((10,), 4))     # balanced
    assert SyntheticParts(**a.config()).images.equal(a.images)


def test_classes_depend_on_part_identity_and_location():
    ds = SyntheticParts(10, num_classes=10, seed=0)
    classes = ds.class_parts
    assert len(set(classes)) == 10
    pairs = [c for cls in classes for c in cls]
    assert len(pairs) == len(set(pairs))                     # no (part, region) pair shared by two classes
    for j in range(0, 10, 2):                                 # swap pairs: same parts, other regions
        parts_a = sorted(p for p, _ in classes[j])
        parts_b = sorted(p for p, _ in classes[j + 1])
        assert parts_a == parts_b and classes[j] != classes[j + 1]
    # some part appears in two classes at different places, and some region hosts different parts
    by_part, by_region = {}, {}
    for k, cls in enumerate(classes):
        for p, r in cls:
            by_part.setdefault(p, set()).add(k)
            by_region.setdefault(r, set()).add(k)
    assert any(len(ks) > 1 for ks in by_part.values()) and any(len(ks) > 1 for ks in by_region.values())


def test_part_locations_are_where_the_parts_are():
    ds = SyntheticParts(30, image_size=32, part_size=6, noise=0.0, distractors=1, seed=1)
    half = 16
    saw_distractor = False
    for i in range(len(ds)):
        boxes = ds.part_locations(i)
        label = int(ds.labels[i])
        cls = ds.class_parts[label]
        assert boxes.shape[1] == 5 and boxes.shape[0] >= len(cls)
        for n, (p, top, left, bottom, right) in enumerate(boxes.tolist()):
            assert bottom - top == 6 and right - left == 6
            region = (top // half) * 2 + left // half
            assert (bottom - 1) // half * 2 + (right - 1) // half == region         # inside one quadrant
            if n < len(cls):
                assert (p, region) == cls[n]
            else:
                assert p >= ds.num_parts and region not in {r for _, r in cls}
                saw_distractor = True
            # with no noise, the pattern's "on" pixels carry the part colour (up to the colour jitter)
            on = ds.part_textures[p] > 0
            pixels = ds.images[i, :, top:bottom, left:right][:, on]                # [3, n_on]
            colour = ds.part_colours[p][:, None]
            assert torch.all((pixels - colour).abs() <= 0.15 + 1e-6)
    assert saw_distractor
    with pytest.raises(IndexError):
        ds.part_locations(30)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticParts(4, split="val")
    with pytest.raises(ValueError, match="n_images"):
        SyntheticParts(0)
    with pytest.raises(ValueError, match="part_size"):
        SyntheticParts(4, image_size=8, part_size=6)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticParts(4, num_classes=13, num_parts=6, parts_per_class=2)


def test_generation_is_fast():
    start = time.process_time()                   # CPU time: robust to other processes sharing the machine
    SyntheticParts(2000, seed=5)
    assert time.process_time() - start < 2.0


def test_digits():
    pytest.importorskip("sklearn")
    train, test = load_digits_dataset("train", image_size=16), load_digits_dataset("test", image_size=16)
    assert len(train) + len(test) == 1797
    x, y = train[0]
    assert x.shape == (3, 16, 16) and 0 <= int(y) < 10


def test_digits_without_sklearn(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_dataset()


def test_train_test_datasets_for_the_cli():
    from protofast.data import SyntheticParts, train_test_datasets

    train_set, test_set, k = train_test_datasets("synthetic", 12, 8, seed=3)
    assert isinstance(train_set, SyntheticParts) and len(train_set) == 12 and len(test_set) == 8 and k == 10
    with pytest.raises(ValueError, match="dataset must be"):
        train_test_datasets("cifar")


def test_clutter_paints_the_background_and_leaves_everything_else_unchanged():
    plain = SyntheticParts(40, seed=2)
    assert torch.equal(SyntheticParts(40, seed=2, clutter=0).images, plain.images)     # the option is opt-in
    ds = SyntheticParts(40, seed=2, clutter=6)
    again = SyntheticParts(40, seed=2, clutter=6)
    assert torch.equal(ds.images, again.images)                                          # seeded
    assert not torch.equal(SyntheticParts(40, seed=2, clutter=6, split="test").images[:40], ds.images)
    assert torch.equal(ds.labels, plain.labels) and ds._boxes == plain._boxes             # same classes and layout
    changed = (ds.images != plain.images).any(1)                                          # [N, S, S]
    assert 0.1 < float(changed.float().mean()) < 0.9
    for i in range(len(ds)):                                                              # parts are pasted on top
        for p, top, left, bottom, right in ds.part_locations(i).tolist():
            on = ds.part_textures[p] > 0
            assert torch.equal(ds.images[i, :, top:bottom, left:right][:, on],
                               plain.images[i, :, top:bottom, left:right][:, on])
    # clutter rectangles are flat: many more neighbouring pixels share one colour than on the noisy background
    def flat(x):
        return float((x[:, :, :, 1:] == x[:, :, :, :-1]).all(1).float().mean())
    assert flat(ds.images) > flat(plain.images) + 0.1
    assert ds.config()["clutter"] == 6 and SyntheticParts(**ds.config()).images.equal(ds.images)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="clutter"):
            SyntheticParts(4, clutter=bad)


def test_random_colours_recolour_the_parts_only():
    plain = SyntheticParts(60, seed=3)
    ds = SyntheticParts(60, seed=3, random_colours=True)
    assert torch.equal(SyntheticParts(60, seed=3, random_colours=False).images, plain.images)   # opt-in
    assert torch.equal(ds.images, SyntheticParts(60, seed=3, random_colours=True).images)      # seeded
    assert torch.equal(ds.labels, plain.labels) and ds._boxes == plain._boxes                   # same classes, layout
    palette = ds.part_colours                                                                   # [P + 2, 3]
    colours_of_part = {}
    for i in range(len(ds)):
        outside = torch.ones(ds.image_size, ds.image_size, dtype=torch.bool)
        for p, top, left, bottom, right in ds.part_locations(i).tolist():
            on = ds.part_textures[p] > 0
            outside[top:bottom, left:right] &= ~on
            pix = ds.images[i, :, top:bottom, left:right][:, on]                                # [3, n_on]
            # one palette colour per pasted part, times the per-channel jitter in [0.85, 1]
            ratio = pix.mean(1, keepdim=True).T / palette.clamp_min(1e-6)                      # [P + 2, 3]
            fits = ((ratio >= 0.85 - 1e-4) & (ratio <= 1 + 1e-4)) | (palette < 1e-6)
            candidates = fits.all(1).nonzero().flatten().tolist()
            assert candidates, (i, p, pix.mean(1))
            colours_of_part.setdefault(p, set()).update(candidates)
        assert torch.equal(ds.images[i][:, outside], plain.images[i][:, outside])              # background unchanged
    assert all(len(c) >= 3 for c in colours_of_part.values()), colours_of_part                 # colour is not the part
    assert ds.config()["random_colours"] is True and SyntheticParts(**ds.config()).images.equal(ds.images)

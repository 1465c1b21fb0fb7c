"""Datasets for ProtoPNet-style models: a synthetic set with ground-truth parts, and scikit-learn's digits.

:class:`SyntheticParts` is protofast's embedded default dataset. Every image is generated from the seed, so no
download is needed and prototypes have a ground truth:

- a library of ``num_parts`` *class parts*: small ``part_size × part_size`` patterns, each a distinct texture
  (checkerboard, stripes, cross, ring, ...) in a distinct colour, plus ``num_distractor_parts`` distractor parts
  that no class uses;
- the image is split into a 2 × 2 grid of coarse regions (quadrants); class ``k`` is defined by
  ``parts_per_class`` (part, region) pairs: which parts appear, and where. Classes come in pairs that use the same
  parts in swapped regions, and other classes use the same parts or regions in other combinations, so the class
  depends on part identity *and* location; no (part, region) pair belongs to two classes;
- an image of class ``k`` is a noisy background (random base colour, Gaussian pixel noise) with each of the
  class's parts pasted at a uniformly jittered position inside its region, colour-jittered, plus up to
  ``distractors`` distractor parts in free regions.

``part_locations(i)`` returns the pixel boxes of the parts of image ``i`` (class parts and distractors), for a
purity metric ("does prototype m's nearest patch lie on part p?").
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["SyntheticParts", "load_digits_dataset"]

_SPLIT_STREAM = {"train": 0, "test": 1}
# distinct, saturated part colours (RGB in [0, 1]); the distractors take the last entries
_PALETTE = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.1), (0.15, 0.3, 1.0), (1.0, 0.9, 0.1), (1.0, 0.2, 1.0), (0.1, 0.95, 1.0),
            (1.0, 0.55, 0.0), (0.6, 0.2, 1.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.5, 1.0, 0.5), (0.6, 0.3, 0.1)]


def _texture(kind: int, size: int) -> Tensor:
    """A 0/1 ``[size, size]`` texture; kinds 0..7 are visually distinct patterns."""
    i = torch.arange(size).view(-1, 1).expand(size, size)
    j = torch.arange(size).view(1, -1).expand(size, size)
    c = (size - 1) / 2
    r2 = (i - c) ** 2 + (j - c) ** 2
    kinds = [
        ((i + j) % 2 == 0),                                  # checkerboard
        (i % 2 == 0),                                        # horizontal stripes
        (j % 2 == 0),                                        # vertical stripes
        ((i - c).abs() < 1) | ((j - c).abs() < 1),           # cross
        (r2 >= (c - 1) ** 2) & (r2 <= (c + 0.5) ** 2),       # ring
        (i == j) | (i + j == size - 1),                      # X (diagonals)
        torch.ones(size, size, dtype=torch.bool),            # solid square
        ((i // 2 + j // 2) % 2 == 0),                        # coarse checkerboard
    ]
    return kinds[kind % len(kinds)].float()


class SyntheticParts(Dataset):
    """Seeded synthetic images whose classes are defined by which parts appear in which region.

    Args:
        n_images: number of images N.
        num_classes: K (even numbers give complete swap pairs; at most ``4·num_parts / parts_per_class``).
        image_size: S; the image is ``[3, S, S]``, the regions are its four ``S/2 × S/2`` quadrants.
        part_size: side of a part (pixels); must fit in a quadrant (``part_size <= S // 2``).
        num_parts: number of class parts in the library (≤ 8 distinct textures/colours).
        parts_per_class: (part, region) pairs per class (1..4, distinct regions, distinct parts).
        distractors: maximum number of distractor parts per image (each present with probability 1/2, placed in
            regions the class does not use).
        noise: standard deviation of the background pixel noise.
        clutter: number of random rectangles (random sizes, positions and colours; bars, lines and blocks) painted
            into each image's background before the parts, like the clutter around the object in a natural
            photo; 0 (default) gives the plain noisy background.
        random_colours: if True, every pasted part (class part or distractor) takes a colour drawn uniformly from
            the ``num_parts + 2`` part colours, so a part is known by its texture only and colour carries no class
            information; False (default): each part has its own colour.
        seed: defines the classes (shared by both splits) and, with ``split``, the images.
        split: ``"train"`` or ``"test"``: independent image streams for the same classes.

    ``dataset[i]`` is ``(image float32 [3, S, S] in about [0, 1], label int)``. ``images`` ``[N, 3, S, S]`` and
    ``labels`` ``[N]`` hold the whole set (generated at construction: 2000 images of 32 px take ~0.1 s).
    """

    def __init__(self, n_images: int, num_classes: int = 10, image_size: int = 32, part_size: int = 6,
                 num_parts: int = 6, parts_per_class: int = 2, distractors: int = 1, noise: float = 0.1,
                 seed: int = 0, split: str = "train", clutter: int = 0, random_colours: bool = False):
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"n_images must be a positive int, got {n_images!r}")
        if not 1 <= parts_per_class <= 4:
            raise ValueError(f"parts_per_class must be in 1..4, got {parts_per_class}")
        if not 2 <= num_parts <= 8:
            raise ValueError(f"num_parts must be in 2..8, got {num_parts}")
        if isinstance(clutter, bool) or not isinstance(clutter, int) or clutter < 0:
            raise ValueError(f"clutter must be a non-negative int, got {clutter!r}")
        if part_size < 2 or part_size > image_size // 2:
            raise ValueError(f"part_size must be in 2..image_size//2 = {image_size // 2}, got {part_size}")
        max_classes = (4 * num_parts) // parts_per_class     # (part, region) pairs are not shared by classes
        if not 2 <= num_classes <= max_classes:
            raise ValueError(f"num_classes must be in 2..{max_classes} for {num_parts} parts and "
                             f"{parts_per_class} parts per class, got {num_classes}")
        self.n_images, self.num_classes, self.image_size = n_images, num_classes, image_size
        self.part_size, self.num_parts, self.parts_per_class = part_size, num_parts, parts_per_class
        self.distractors, self.noise, self.seed, self.split = distractors, noise, seed, split
        self.clutter = clutter
        self.random_colours = bool(random_colours)
        self.num_distractor_parts = 2
        self.class_parts = self._design_classes()
        self.part_textures = torch.stack([_texture(p, part_size) for p in range(num_parts + 2)])
        self.part_colours = torch.tensor(_PALETTE[:num_parts] + _PALETTE[-2:])
        self.images, self.labels, self._boxes = self._generate()

    # ------------------------------------------------------------------------------------------ classes
    def _design_classes(self) -> List[Tuple[Tuple[int, int], ...]]:
        """K tuples of sorted (part, region) pairs. Class 2j+1 uses class 2j's parts in permuted regions (so
        location matters), and no (part, region) pair belongs to two classes (so one prototype per class can
        find it): randomised greedy draws from the seed, restarted until K classes fit."""
        g = torch.Generator().manual_seed(10_007 * self.seed + 17)
        for _ in range(1000):
            classes, used = [], set()
            for _ in range(200):
                if len(classes) >= self.num_classes:
                    break
                parts = torch.randperm(self.num_parts, generator=g)[:self.parts_per_class].tolist()
                regions = torch.randperm(4, generator=g)[:self.parts_per_class].tolist()
                if self.parts_per_class == 1:
                    free = [r for r in range(4) if r != regions[0]]
                    partner = [free[int(torch.randint(len(free), (1,), generator=g))]]
                else:
                    partner = regions[1:] + regions[:1]
                pair = [tuple(sorted(zip(parts, regions))), tuple(sorted(zip(parts, partner)))]
                pair = pair[:self.num_classes - len(classes)]
                combos = [c for cls in pair for c in cls]
                if len(set(combos)) == len(combos) and not used.intersection(combos):
                    classes += pair
                    used.update(combos)
            if len(classes) == self.num_classes:
                return classes
        raise ValueError(f"could not design {self.num_classes} classes with {self.parts_per_class} parts each from "
                         f"{self.num_parts} parts in 4 regions without sharing a (part, region) pair; "
                         "use fewer classes or more parts")

    # ------------------------------------------------------------------------------------------ images
    def _generate(self):
        N, S, ps = self.n_images, self.image_size, self.part_size
        g = torch.Generator().manual_seed(1_000_003 * self.seed + 7919 * (_SPLIT_STREAM[self.split] + 1))
        labels = (torch.arange(N) % self.num_classes)[torch.randperm(N, generator=g)]
        base = 0.25 + 0.35 * torch.rand(N, 3, 1, 1, generator=g)
        images = base + self.noise * torch.randn(N, 3, S, S, generator=g)
        if self.clutter:
            self._add_clutter(images)
        half = S // 2
        slack = half - ps                                # jitter range inside a quadrant
        # per image: the class parts, then the candidate distractors
        n_slots = self.parts_per_class + self.distractors
        offsets = torch.randint(0, slack + 1, (N, n_slots, 2), generator=g)
        colour_jitter = 0.85 + 0.15 * torch.rand(N, n_slots, 3, generator=g)
        present = torch.rand(N, max(self.distractors, 1), generator=g) < 0.5
        distractor_kind = torch.randint(0, self.num_distractor_parts, (N, max(self.distractors, 1)), generator=g)
        region_perm = torch.argsort(torch.rand(N, 4, generator=g), dim=1)
        patches = self.part_colours[:, :, None, None] * self.part_textures[:, None]          # [P+2, 3, ps, ps]
        masks = self.part_textures[:, None]                                                    # [P+2, 1, ps, ps]
        boxes: List[List[Tuple[int, int, int, int, int]]] = []
        colour_of = None
        if self.random_colours:             # a separate stream: the other draws (and fixed-colour images) unchanged
            gc = torch.Generator().manual_seed(3_000_017 * self.seed + 15_485_863 * (_SPLIT_STREAM[self.split] + 1))
            colour_of = torch.randint(0, len(self.part_colours), (N, n_slots), generator=gc).tolist()
        labels_list = labels.tolist()
        offsets_list = offsets.tolist()
        for n in range(N):
            parts = self.class_parts[labels_list[n]]
            used = {r for _, r in parts}
            items = [(p, r) for p, r in parts]
            free = [r for r in region_perm[n].tolist() if r not in used]
            for d in range(self.distractors):
                if present[n, d] and d < len(free):
                    items.append((self.num_parts + int(distractor_kind[n, d]), free[d]))
            img_boxes = []
            for slot, (p, r) in enumerate(items):
                if colour_of is not None:
                    patch = masks[p] * self.part_colours[colour_of[n][slot]][:, None, None]
                else:
                    patch = patches[p]
                top = (r // 2) * half + offsets_list[n][slot][0]
                left = (r % 2) * half + offsets_list[n][slot][1]
                region = images[n, :, top:top + ps, left:left + ps]
                m = masks[p]
                region.mul_(1 - m).add_(m * patch * colour_jitter[n, slot, :, None, None])
                img_boxes.append((p, top, left, top + ps, left + ps))
            boxes.append(img_boxes)
        return images.clamp_(0, 1).contiguous(), labels, boxes

    def _add_clutter(self, images: Tensor) -> None:
        """Paint ``clutter`` random rectangles per image into the background, in place (before the parts are
        pasted, so parts stay intact): sides uniform in 1..S/2 (independently, so most are bars or lines), any
        position (clipped at the border), colour uniform in [0, 1]³. Drawn from a separate generator, so images
        without clutter are bit-identical to before the option existed."""
        N, _, S, _ = images.shape
        g = torch.Generator().manual_seed(2_000_029 * self.seed + 104_729 * (_SPLIT_STREAM[self.split] + 1) + 3)
        size = torch.randint(1, S // 2 + 1, (N, self.clutter, 2), generator=g).tolist()
        corner = torch.randint(-S // 4, S, (N, self.clutter, 2), generator=g).tolist()
        colour = torch.rand(N, self.clutter, 3, generator=g)
        for n in range(N):
            for c in range(self.clutter):
                top, left = max(corner[n][c][0], 0), max(corner[n][c][1], 0)
                bottom, right = corner[n][c][0] + size[n][c][0], corner[n][c][1] + size[n][c][1]
                if bottom > top and right > left:
                    images[n, :, top:bottom, left:right] = colour[n, c, :, None, None]

    # ------------------------------------------------------------------------------------------ API
    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def part_locations(self, index: int) -> Tensor:
        """Pixel boxes of the parts pasted into image ``index``: int64 ``[n_parts, 5]`` with columns
        ``(part, top, left, bottom, right)`` (bottom/right exclusive). ``part < num_parts`` are the class's parts
        (in ``class_parts[label]`` order), ``part >= num_parts`` distractors."""
        if not -self.n_images <= index < self.n_images:
            raise IndexError(f"index {index} out of range for {self.n_images} images")
        return torch.tensor(self._boxes[index], dtype=torch.long).view(-1, 5)

    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable): ``SyntheticParts(**config)`` rebuilds the same images."""
        return dict(n_images=self.n_images, num_classes=self.num_classes, image_size=self.image_size,
                    part_size=self.part_size, num_parts=self.num_parts, parts_per_class=self.parts_per_class,
                    distractors=self.distractors, noise=self.noise, seed=self.seed, split=self.split,
                    clutter=self.clutter, random_colours=self.random_colours)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"SyntheticParts({args})"


def load_digits_dataset(split: str = "train", image_size: int = 32, test_fraction: float = 0.25,
                        seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes) as a ``TensorDataset`` of
    ``(image float32 [3, image_size, image_size] in [0, 1], label int64)`` — grey levels replicated on three
    channels, bilinearly upsampled. The split is a seeded random permutation: the last
    ``test_fraction`` of it is the test split. Needs scikit-learn (not a protofast dependency)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("load_digits_dataset needs scikit-learn: pip install scikit-learn") from exc
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0          # [N, 1, 8, 8]
    y = torch.as_tensor(digits.target, dtype=torch.long)
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    idx = perm[len(y) - n_test:] if split == "test" else perm[:len(y) - n_test]
    return TensorDataset(x[idx], y[idx])


def train_test_datasets(dataset: str, train_size: int = 2000, test_size: int = 1000, seed: int = 0,
                        image_size: int = 32, num_classes: int = 10):
    """``(train_set, test_set, num_classes)`` for the ``protofast train`` CLIs' ``--dataset`` choice:
    ``"synthetic"`` (:class:`SyntheticParts`, ``train_size`` / ``test_size`` images of ``num_classes`` classes) or
    ``"digits"`` (:func:`load_digits_dataset`; raises ImportError without scikit-learn)."""
    if dataset == "synthetic":
        train_set = SyntheticParts(train_size, num_classes=num_classes, image_size=image_size, seed=seed,
                                   split="train")
        test_set = SyntheticParts(test_size, num_classes=num_classes, image_size=image_size, seed=seed,
                                  split="test")
        return train_set, test_set, train_set.num_classes
    if dataset == "digits":
        return (load_digits_dataset("train", image_size=image_size, seed=seed),
                load_digits_dataset("test", image_size=image_size, seed=seed), 10)
    raise ValueError(f"dataset must be 'synthetic' or 'digits', got {dataset!r}")

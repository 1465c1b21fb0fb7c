"""Part purity (protofast.metrics) on a hand-built model and dataset whose answer is known."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from protofast.metrics import part_purity


class _Identity(nn.Module):
    """conv_features = the image itself (1×1 prototypes compare pixels)."""

    def __init__(self, prototypes, classes, K):
        super().__init__()
        self.prototype_vectors = nn.Parameter(prototypes[:, :, None, None])
        ident = torch.zeros(len(classes), K)
        ident[torch.arange(len(classes)), torch.tensor(classes)] = 1
        self.register_buffer("prototype_class_identity", ident)

    def conv_features(self, x):
        return x


class _Parts(torch.utils.data.Dataset):
    """n images 3×8×8 of noise in [0, 1]; class c has part c: one pixel of value 5 + 4c at a seeded spot."""

    num_parts = 2
    class_parts = [[(0, 0)], [(1, 0)]]

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 8, 8, generator=g)
        self.labels = torch.arange(n) % 2
        self.spots = torch.randint(0, 8, (n, 2), generator=g)
        for i in range(n):
            c = int(self.labels[i])
            self.images[i, :, self.spots[i, 0], self.spots[i, 1]] = 5.0 + 4 * c

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def part_locations(self, i):
        c, (t, l) = int(self.labels[i]), self.spots[i].tolist()
        return torch.tensor([[c, t, l, t + 1, l + 1]])


def test_purity_of_part_and_background_prototypes():
    ds = _Parts(12)
    protos = torch.tensor([[5.0] * 3, [-5.0] * 3, [9.0] * 3, [-5.0] * 3])
    model = _Identity(protos, classes=[0, 0, 1, 1], K=2)
    r = part_purity(model, ds, k=4, batch_size=5)                 # batches cross the class images
    # prototypes 0 and 2 sit on their class's part; 1 and 3 are nearest to background pixels
    torch.testing.assert_close(r.purity, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(r.on_class_part, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert r.part.tolist() == [0, -1, 1, -1]
    assert r.mean_purity == pytest.approx(0.5)
    # the k nearest patches of prototype 0 are the part pixels of the first four class-0 images (all at distance 0:
    # ties go to the earliest image), at the part's position
    assert r.image_index[0].tolist() == [0, 2, 4, 6]
    assert r.position[0].tolist() == ds.spots[[0, 2, 4, 6]].tolist()
    assert torch.all(r.distance[0] == 0)


def test_fewer_patches_than_k_and_bad_input():
    ds = _Parts(2)                                                    # one image per class: 64 patches each
    model = _Identity(torch.tensor([[5.0] * 3]), classes=[0], K=2)
    r = part_purity(model, ds, k=70)
    assert (r.image_index[0] == 0).sum() == 64 and (r.image_index[0] == -1).sum() == 6
    assert r.purity[0] == pytest.approx(1 / 70)
    with pytest.raises(ValueError, match="k must be"):
        part_purity(model, ds, k=0)
    with pytest.raises(TypeError, match="part_locations"):
        part_purity(model, torch.utils.data.TensorDataset(ds.images, ds.labels))

import pytest
import torch

import modeconn as mc
from modeconn.data import crop_flip_transform


def test_digits_split_and_standardisation(digits):
    assert digits.x_train.shape == (1438, 1, 8, 8) and digits.x_test.shape == (359, 1, 8, 8)
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    assert abs(float(digits.x_train.mean())) < 1e-4 and abs(float(digits.x_train.std()) - 1) < 1e-3
    again = mc.get_dataset("digits", seed=123)  # the split is fixed whatever the seed
    assert torch.equal(again.x_test, digits.x_test)


def test_loader_epochs_are_permutations_and_reproducible(digits):
    loader = digits.train_loader(100, seed=7)
    seen = torch.cat([y for _, y in loader])
    assert len(loader) == 15 and len(seen) == 1438
    assert torch.equal(seen.sort().values, digits.y_train.sort().values)
    loader.set_epoch(1)
    e1 = torch.cat([x for x, _ in loader])
    loader.set_epoch(2)
    e2 = torch.cat([x for x, _ in loader])
    loader.set_epoch(1)
    assert torch.equal(torch.cat([x for x, _ in loader]), e1)
    assert not torch.equal(e1, e2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_unshuffled_batches_are_views_and_the_rest_are_copies(drop_last):
    """Unshuffled, one process, no transform: the batches are slices of the held tensors (no copy) with
    the same samples, sizes and count as the general path; shuffled or transformed batches are new
    tensors, so an in-place transform cannot change the dataset."""
    x, y = torch.arange(22.0).view(11, 2), torch.arange(11)
    loader = mc.TensorLoader(x, y, 4, drop_last=drop_last)
    batches = list(loader)
    expected = [(0, 4), (4, 8)] + ([] if drop_last else [(8, 11)])
    assert len(batches) == len(loader) == len(expected)
    for (xb, yb), (lo, hi) in zip(batches, expected):
        assert torch.equal(yb, torch.arange(lo, hi)) and torch.equal(xb, x[lo:hi])
        assert xb.data_ptr() == x[lo].data_ptr() and yb.data_ptr() == y[lo].data_ptr()   # views
    keep = x.clone()
    for xb, _ in mc.TensorLoader(x, y, 4, transform=lambda b, g: b.mul_(-1)):
        assert xb.data_ptr() != x.data_ptr()
    for xb, _ in mc.TensorLoader(x, y, 4, shuffle=True, seed=0):
        xb.mul_(-1)
    for rank in (0, 1):
        for xb, _ in mc.TensorLoader(x, y, 2, rank=rank, world_size=2):
            xb.mul_(-1)
    assert torch.equal(x, keep)


def test_sharded_loader_splits_the_epoch(digits):
    # global batch k of a one-process loader (batch 64) = rank 0's batch k + rank 1's batch k (32 each)
    shards = [list(digits.train_loader(32, seed=1, rank=r, world_size=2, augment=False)) for r in (0, 1)]
    single = list(digits.train_loader(64, seed=1, augment=False))
    assert len(shards[0]) == len(shards[1]) == len(single) == 23  # 1438 = 22 * 64 + 30
    for (x0, y0), (x1, y1), (x, y) in zip(*shards, single):
        assert len(y0) == len(y1) == len(y) // 2  # the last global batch of 30 splits 15 + 15
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    assert sum(len(y) for _, y in shards[0]) == 719
    # an odd number of samples: the one at the end of the permutation is left out, shards stay equal
    x, y = torch.arange(11.0).view(11, 1), torch.arange(11)
    parts = [torch.cat([b for _, b in mc.TensorLoader(x, y, 2, shuffle=True, seed=3, rank=r, world_size=2)])
             for r in (0, 1)]
    whole = torch.cat([b for _, b in mc.TensorLoader(x, y, 4, shuffle=True, seed=3)])
    assert len(parts[0]) == len(parts[1]) == 5
    interleaved = [parts[0][:2], parts[1][:2], parts[0][2:4], parts[1][2:4], parts[0][4:], parts[1][4:]]
    assert torch.equal(torch.cat(interleaved), whole[:10])
    with pytest.raises(ValueError, match="rank"):
        mc.TensorLoader(x, y, 2, rank=2, world_size=2)


@pytest.mark.parametrize("name", ["moons", "spirals"])
def test_synthetic_sets_are_seeded(name):
    a, b, c = mc.get_dataset(name, seed=0), mc.get_dataset(name, seed=0), mc.get_dataset(name, seed=1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert a.input_shape == (2,) and a.num_classes == 2


def test_crop_flip_is_a_shifted_or_flipped_copy():
    x = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    norm = crop_flip_transform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), pad=0)
    out = norm(x, torch.Generator().manual_seed(0))
    ref = x.float() / 255
    same = (out == ref).flatten(1).all(1)
    flipped = (out == ref.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()
    shifted = crop_flip_transform((0.0,) * 3, (1.0,) * 3, pad=2)(x, torch.Generator().manual_seed(0))
    assert shifted.shape == (64, 3, 8, 8)


def test_missing_torchvision_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="--download"):
        mc.get_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        mc.get_dataset("imagenet")

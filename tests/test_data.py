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


def test_sharded_loader_splits_the_epoch(digits):
    shards = [torch.cat([y for _, y in digits.train_loader(64, seed=1, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 719
    full = torch.cat([y for _, y in digits.train_loader(1438, seed=1)])
    assert torch.equal(torch.cat(shards), full[:1438])


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

"""Data that do not fit in memory: a torch ``Dataset`` streamed through ``torch.utils.data.DataLoader``.

:class:`StreamLoader` visits the samples in exactly the order a
:class:`~modeconn.data.TensorLoader` over the same data would (the index plan
of :func:`~modeconn.data.datasets.epoch_indices`: a permutation drawn from
``(seed, epoch)``, every rank its slice of every global batch), so a resumed
run, a run under torchrun and a one-process run see the same batches. Random
per-sample transforms (crops, flips) draw from a generator seeded by
``(seed, epoch, sample index)``, so they too do not depend on the worker, the
rank or the number of processes. Sharding is this index plan rather than
``DistributedSampler``, which pads ranks by repeating samples and so would
make the multi-process epoch differ from the one-process epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from modeconn.data.datasets import epoch_generator, epoch_indices

__all__ = ["StreamLoader", "StreamDataset", "SeededTransforms"]


class SeededTransforms(torch.utils.data.Dataset):
    """A dataset whose random per-sample transforms draw from a generator seeded by (seed, epoch, index).

    The global RNG is forked around each sample, so nothing outside changes.
    """

    def __init__(self, dataset, seed: int = 0):
        """Wrap ``dataset``; :meth:`set_epoch` selects the epoch."""
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose random transforms the next samples get."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples in the wrapped dataset."""
        return len(self.dataset)

    def __getitem__(self, i: int):
        """Sample ``i`` with its transforms drawn for this (seed, epoch)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 9_973 + int(i) * 31 + 7) % (2**63 - 1))
            return self.dataset[i]


class StreamLoader:
    """Mini-batches ``(x, y)`` of a torch ``Dataset`` through a ``DataLoader`` (workers, pinned memory).

    The arguments and attributes are those of :class:`~modeconn.data.TensorLoader`
    (``batch_size``, ``shuffle``, ``seed``, ``drop_last``, ``rank``,
    ``world_size``, ``set_epoch``, ``len``, ``num_samples``, ``to(device)``),
    plus ``num_workers`` and ``pin_memory``. Samples must be ``(tensor, label)``.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> from modeconn.data import TensorLoader
        >>> x, y = torch.randn(10, 3), torch.arange(10)
        >>> a = StreamLoader(TensorDataset(x, y), batch_size=4, shuffle=True, seed=1)
        >>> b = TensorLoader(x, y, batch_size=4, shuffle=True, seed=1)
        >>> all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, b))   # the same batches
        True
    """

    def __init__(self, dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False):
        """See the class docstring."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), bool(shuffle), int(seed), drop_last
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.device, self.epoch = torch.device("cpu"), 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation (and random transforms) the next pass uses."""
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        """This rank's sample indices of the current epoch, in order."""
        return epoch_indices(len(self.dataset), self.batch_size, self.shuffle, self.seed, self.epoch,
                             self.drop_last, self.rank, self.world_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self._indices())

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.num_samples // self.batch_size)

    def to(self, device) -> "StreamLoader":
        """Deliver batches on ``device`` (returns self)."""
        self.device = torch.device(device)
        return self

    def full_pass(self, batch_size: int) -> "StreamLoader":
        """All samples in a fixed order, on every rank (e.g. for BN statistics)."""
        return StreamLoader(self.dataset, batch_size, num_workers=self.num_workers,
                            pin_memory=self.pin_memory).to(self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches, moved to the device."""
        if isinstance(self.dataset, SeededTransforms):
            self.dataset.set_epoch(self.epoch)
        idx = self._indices().tolist()
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        # its own generator: the DataLoader draws its workers' base seed from it, not from the global RNG
        # (which dropout uses, and which a resumed run restores)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and self.device.type == "cuda",
                            generator=epoch_generator(self.seed, self.epoch, stream=1 + self.rank))
        for xb, yb in loader:
            yield (xb.to(self.device, non_blocking=True),
                   torch.as_tensor(yb, dtype=torch.long).to(self.device, non_blocking=True))


@dataclass
class StreamDataset:
    """A dataset read sample by sample: the streamed counterpart of :class:`~modeconn.data.Dataset`.

    ``train_set`` yields training samples with their random transforms,
    ``train_eval_set`` the same samples without (BN statistics, evaluation),
    ``test_set`` the test samples.
    """

    name: str
    train_set: torch.utils.data.Dataset
    train_eval_set: torch.utils.data.Dataset
    test_set: torch.utils.data.Dataset
    num_classes: int
    input_shape: Tuple[int, ...]
    num_workers: int = 0
    info: dict = field(default_factory=dict)
    vocab_size: Optional[int] = None  # streamed data are float inputs (token data are held in memory)

    def train_loader(self, batch_size: int = 128, seed: int = 0, shuffle: bool = True, augment: bool = True,
                     **kw) -> StreamLoader:
        """Loader for training: shuffled, with the random transforms seeded per (seed, epoch, sample)."""
        data = SeededTransforms(self.train_set, seed) if augment else self.train_eval_set
        return StreamLoader(data, batch_size, shuffle, seed, num_workers=self.num_workers, pin_memory=True, **kw)

    def eval_loader(self, split: str = "test", batch_size: int = 1024, samples: Optional[int] = None,
                    seed: Optional[int] = None) -> StreamLoader:
        """Loader for evaluation and BN statistics: fixed order, no augmentation; ``samples`` of them
        (the first ones, or drawn at random when ``seed`` is given)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = self.train_eval_set if split == "train" else self.test_set
        if samples is not None and samples < len(data):
            keep = (torch.arange(samples) if seed is None else
                    torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples])
            data = torch.utils.data.Subset(data, keep.tolist())
        return StreamLoader(data, batch_size, num_workers=self.num_workers, pin_memory=True)

"""Datasets held as tensors, batched by index; nothing downloaded by default.

Embedded (no files needed): ``digits`` (scikit-learn's 8x8 handwritten digits,
real data, the default), ``moons`` and ``spirals`` (synthetic, seeded),
``mnist1d`` (procedural 1-D digits, :mod:`modeconn.data.mnist1d`), and
``majority`` (token sequences for transformers, synthetic, seeded).
Torchvision datasets (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``)
are read from ``data_dir`` when their files are there; downloading (``download``) is
an opt-in for machines with internet.

A :class:`TensorLoader` shuffles with a permutation drawn from
``(seed, epoch)`` (like ``DistributedSampler.set_epoch``), so an epoch's batch
order is a pure function of the seed and the epoch: a resumed run sees the
same batches as an uninterrupted one, and ranks can shard it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

Transform = Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]

EMBEDDED = ("digits", "moons", "spirals", "mnist1d", "majority")
TORCHVISION = ("mnist", "fashion_mnist", "cifar10", "cifar100")
DATASETS = EMBEDDED + TORCHVISION


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 9_973 + int(stream)) % (2**63 - 1))
    return g


def epoch_indices(n: int, batch_size: int, shuffle: bool, seed: int, epoch: int, drop_last: bool = False,
                  rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The sample indices one rank visits in one epoch, in order (see :class:`TensorLoader` for the plan).

    Example:
        >>> epoch_indices(10, 4, False, 0, 0).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        >>> epoch_indices(10, 2, False, 0, 0, rank=1, world_size=2).tolist()   # 2nd half of each global batch
        [2, 3, 6, 7, 9]
    """
    length = n - n % world_size
    if drop_last:
        length -= length % (batch_size * world_size)
    idx = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
    idx = idx[:length]
    if world_size > 1:  # rank r: the r-th slice of every global batch
        B = batch_size * world_size
        full = len(idx) // B
        head = idx[: full * B].view(full, world_size, batch_size)[:, rank].reshape(-1)
        rest = idx[full * B:]  # the last, smaller global batch (may be empty)
        idx = torch.cat([head, rest.view(world_size, len(rest) // world_size)[rank]])
    return idx


class TensorLoader:
    """Mini-batches ``(x, y)`` by index over tensors; no per-sample Python.

    Args:
        x, y: full tensors (first dimension = samples).
        batch_size: samples per batch.
        shuffle: draw a new permutation each epoch from ``(seed, epoch)``.
        transform: ``f(x_batch, generator) -> x_batch`` applied per batch
            (normalisation, augmentation); the generator is the epoch's.
        drop_last: drop the last incomplete batch.
            Unshuffled, on one process and without ``transform``, batches
            are views of ``x`` and ``y`` (no copy): do not change them in
            place. Otherwise they are new tensors.
        rank, world_size: shard of this process for data-parallel training.
            ``batch_size`` is then the per-process batch and the global batch
            is ``B = batch_size * world_size``: global batch k is
            ``perm[k*B:(k+1)*B]`` of the epoch's permutation (exactly batch k
            of a one-process loader with ``batch_size=B``) and rank r takes
            its r-th of ``world_size`` equal slices. Every rank gets the same
            number of batches of the same size; the ``n % world_size`` samples
            at the end of the permutation are left out of the epoch (and,
            with ``drop_last``, the last incomplete global batch).

    Example:
        >>> x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
        >>> loader = TensorLoader(x, y, batch_size=4)
        >>> len(loader), [yb.tolist() for _, yb in loader]
        (3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])
        >>> shuffled = TensorLoader(x, y, batch_size=4, shuffle=True, seed=0)
        >>> epoch0 = [yb.tolist() for _, yb in shuffled]
        >>> epoch0 == [yb.tolist() for _, yb in shuffled]   # the order depends only on (seed, epoch)
        True
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = False,
                 seed: int = 0, transform: Optional[Transform] = None, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.transform, self.drop_last = transform, bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return self._epoch_length() // self.world_size

    def _epoch_length(self) -> int:
        """Samples of the epoch's permutation used by all ranks together."""
        n = len(self.x)
        n -= n % self.world_size
        if self.drop_last:
            n -= n % (self.batch_size * self.world_size)
        return n

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def to(self, device) -> "TensorLoader":
        """Move the held tensors to ``device`` (returns self)."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def full_pass(self, batch_size: int) -> "TensorLoader":
        """All samples in a fixed order with the same transform, on every rank (e.g. for BN statistics)."""
        return TensorLoader(self.x, self.y, batch_size, shuffle=False, seed=self.seed, transform=self.transform)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if not self.shuffle and self.world_size == 1 and self.transform is None:
            # the indices are 0, 1, ..., n-1: slices of the held tensors, not copies (an evaluation
            # pass over a digits-sized split copied per batch ran 6 % slower, measured on a 21x21 grid)
            n = self._epoch_length()
            for i in range(0, n, self.batch_size):
                yield self.x[i:min(n, i + self.batch_size)], self.y[i:min(n, i + self.batch_size)]
            return
        idx = epoch_indices(len(self.x), self.batch_size, self.shuffle, self.seed, self.epoch, self.drop_last,
                            self.rank, self.world_size).to(self.x.device)
        aug = epoch_generator(self.seed, self.epoch, stream=1 + self.rank)
        for i in range(0, len(idx), self.batch_size):
            b = idx[i:i + self.batch_size]
            xb = self.x.index_select(0, b)
            if self.transform is not None:
                xb = self.transform(xb, aug)
            yield xb, self.y.index_select(0, b)


@dataclass
class Dataset:
    """A dataset held as tensors, with the transforms that turn a batch into model input."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: Tuple[int, ...]
    train_transform: Optional[Transform] = None  # augmentation + normalisation
    eval_transform: Optional[Transform] = None   # normalisation only
    info: dict = field(default_factory=dict)
    vocab_size: Optional[int] = None  # token datasets: inputs are ids in [0, vocab_size); None for float inputs

    def train_loader(self, batch_size: int = 128, seed: int = 0, shuffle: bool = True,
                     augment: bool = True, **kw) -> TensorLoader:
        """Loader for training: shuffled, augmented where the dataset has augmentation."""
        tf = self.train_transform if augment else self.eval_transform
        return TensorLoader(self.x_train, self.y_train, batch_size, shuffle, seed, tf, **kw)

    def eval_loader(self, split: str = "test", batch_size: int = 1024, samples: Optional[int] = None,
                    seed: Optional[int] = None, **kw) -> TensorLoader:
        """Loader for evaluation and BN statistics: fixed order, no augmentation; ``samples`` of them
        (the first ones, or drawn at random when ``seed`` is given)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        if samples is not None and samples < len(y):
            keep = (torch.arange(samples) if seed is None else
                    torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples])
            x, y = x[keep], y[keep]
        return TensorLoader(x, y, batch_size, False, 0, self.eval_transform, **kw)


# --------------------------------------------------------------------- embedded
def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.RandomState(seed)
    idx = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    return x[idx[n_test:]], y[idx[n_test:]], x[idx[:n_test]], y[idx[:n_test]]


def _digits(seed: int = 0, **_) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None]  # [N, 1, 8, 8], values 0..16
    y = d.target.astype(np.int64)
    # the split is part of the dataset's definition: fixed, whatever the run's seed
    xtr, ytr, xte, yte = _split(x, y, 0.2, seed=0)
    mean, std = float(xtr.mean()), float(xtr.std())
    norm = lambda a: torch.from_numpy((a - mean) / std)
    return Dataset("digits", norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte),
                   10, (1, 8, 8), info={"mean": mean, "std": std, "split_seed": 0,
                                        "n_train": len(xtr), "n_test": len(xte)})


def _points(name: str, x: np.ndarray, y: np.ndarray, seed: int) -> Dataset:
    xtr, ytr, xte, yte = _split(x.astype(np.float32), y.astype(np.int64), 0.5, seed)
    mean, std = xtr.mean(0), xtr.std(0)
    norm = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))
    return Dataset(name, norm(xtr), torch.from_numpy(ytr), norm(xte), torch.from_numpy(yte),
                   int(y.max()) + 1, (2,), info={"seed": seed, "n_train": len(xtr), "n_test": len(xte)})


def _moons(seed: int = 0, n_samples: int = 2000, noise: float = 0.2, **_) -> Dataset:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return _points("moons", x, y, seed)


def _spirals(seed: int = 0, n_samples: int = 2000, noise: float = 0.3, turns: float = 1.5, **_) -> Dataset:
    rng = np.random.RandomState(seed)
    n = n_samples // 2
    r = np.sqrt(rng.rand(n)) * turns * 2 * np.pi
    arm = np.stack([r * np.cos(r), r * np.sin(r)], 1)
    x = np.concatenate([arm, -arm]) + rng.randn(2 * n, 2) * noise
    y = np.concatenate([np.zeros(n), np.ones(n)])
    return _points("spirals", x, y, seed)


def _majority(seed: int = 0, n_train: int = 4000, n_test: int = 1000, vocab: int = 8, length: int = 16,
              **_) -> Dataset:
    """Token sequences labelled by their most frequent token (a unique one: ties are never drawn).

    ``x`` long ``[N, length]`` uniform in ``[0, vocab)``, ``y`` the token that
    occurs most often (``vocab`` classes). The classifier must count across
    the whole sequence, which a causal decoder does by attending from the
    last position; two trainings from different seeds find solutions with a
    high straight-line barrier between them.
    """
    rng = np.random.RandomState(seed)
    xs, need = [], n_train + n_test
    while need > 0:  # rejection: keep sequences whose most frequent token is unique
        x = rng.randint(0, vocab, size=(2 * need + 16, length))
        counts = np.sort(np.stack([(x == v).sum(1) for v in range(vocab)], 1), 1)
        x = x[counts[:, -1] > counts[:, -2]][:need]
        xs.append(x)
        need -= len(x)
    x = np.concatenate(xs).astype(np.int64)
    y = np.stack([(x == v).sum(1) for v in range(vocab)], 1).argmax(1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return Dataset("majority", t(x[:n_train]), t(y[:n_train]), t(x[n_train:]), t(y[n_train:]), vocab, (length,),
                   info={"seed": seed, "n_train": n_train, "n_test": n_test, "vocab": vocab, "length": length},
                   vocab_size=vocab)


# ------------------------------------------------------------------ torchvision
_TV = {
    # name: (torchvision class, mean, std, classes, folder torchvision looks for)
    "mnist": ("MNIST", (0.1307,), (0.3081,), 10, "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", (0.2860,), (0.3530,), 10, "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, "cifar-100-python"),
}


def normalize_transform(mean, std) -> Transform:
    """uint8 [N, C, H, W] -> normalised float."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def f(xb: torch.Tensor, g: Optional[torch.Generator] = None) -> torch.Tensor:
        x = xb.float().div_(255.0)
        return (x - m.to(x.device)) / s.to(x.device)

    return f


def crop_flip_transform(mean, std, pad: int = 4) -> Transform:
    """Random crop with zero padding and random horizontal flip, then normalise (batched)."""
    norm = normalize_transform(mean, std)

    def f(xb: torch.Tensor, g: Optional[torch.Generator] = None) -> torch.Tensor:
        x = norm(xb)
        n, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).to(x.device)
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # [n, h]
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # [n, w]
        cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
        bi = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[bi, ci, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    return f


def _torchvision(name: str, data_dir, download: bool = False, **_) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, mean, std, classes, folder = _TV[name]
    cls = getattr(tvd, cls_name)
    root = Path(data_dir)
    try:
        tr = cls(str(root), train=True, download=download)
        te = cls(str(root), train=False, download=download)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"dataset {name!r} not found under {root.resolve()} (torchvision looks for {root / folder}). "
            f"Copy the files there, or pass --download on a machine with internet. ({e})"
        ) from None

    def to_tensor(ds):
        data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
        if data.dim() == 3:
            data = data.unsqueeze(1)           # [N, 1, 28, 28]
        elif data.shape[-1] in (1, 3):
            data = data.permute(0, 3, 1, 2)    # NHWC -> NCHW
        return data.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)

    xtr, ytr = to_tensor(tr)
    xte, yte = to_tensor(te)
    augment = crop_flip_transform(mean, std) if name.startswith("cifar") else normalize_transform(mean, std)
    return Dataset(name, xtr, ytr, xte, yte, classes, tuple(xtr.shape[1:]),
                   train_transform=augment, eval_transform=normalize_transform(mean, std),
                   info={"data_dir": str(root.resolve())})


def get_dataset(name: str = "digits", data_dir: Optional[str] = "data", download: bool = False,
                seed: int = 0, **kwargs) -> Dataset:
    """Load a dataset by name as tensors.

    ``seed`` only matters for synthetic sets (their sampling and split); the
    digits split is fixed. Token datasets (``majority``) hold long ids and
    name their ``vocab_size``; the others hold float inputs (``vocab_size`` None).

    Example:
        >>> data = get_dataset("digits")
        >>> data.input_shape, data.num_classes, len(data.x_train), len(data.x_test)
        ((1, 8, 8), 10, 1438, 359)
        >>> x, y = next(iter(data.train_loader(batch_size=32)))
        >>> x.shape, y.shape
        (torch.Size([32, 1, 8, 8]), torch.Size([32]))
        >>> get_dataset("moons", n_samples=200).input_shape   # synthetic 2-D points
        (2,)
        >>> seq = get_dataset("majority", seed=1)   # token ids for transformers
        >>> seq.x_train.dtype, seq.input_shape, seq.vocab_size, seq.num_classes
        (torch.int64, (16,), 8, 8)
    """
    if ":" in name:  # a spec: imagefolder:PATH, pkg.module:factory, file.py:factory
        from modeconn.data.external import external_dataset
        return external_dataset(name, seed, **kwargs)
    key = name.lower().replace("-", "_")
    if key == "digits":
        return _digits(seed, **kwargs)
    if key == "moons":
        return _moons(seed, **kwargs)
    if key == "spirals":
        return _spirals(seed, **kwargs)
    if key == "mnist1d":  # its own module: the generator is the mnist1d package's
        from modeconn.data.mnist1d import mnist1d_dataset

        return mnist1d_dataset(seed, **kwargs)
    if key == "majority":
        return _majority(seed, **kwargs)
    if key in _TV:
        return _torchvision(key, data_dir or "data", download, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}, or a spec: imagefolder:PATH, "
                     "pkg.module:factory, file.py:factory")

"""The data a command reads: the dataset a checkpoint names, and its batches for training and evaluation."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Optional, Tuple

import torch

from modeconn.cli.errors import CommandError
from modeconn.data import Dataset, TensorLoader, get_dataset
from modeconn.runtime import distributed


def dataset_name(args: argparse.Namespace, meta: Mapping, source: str = "the checkpoint") -> str:
    """``--dataset``, else the dataset ``meta`` records; a :class:`CommandError` when neither names one."""
    name = getattr(args, "dataset", None) or meta.get("dataset")
    if name is None:
        raise CommandError(f"{source} names no dataset; pass --dataset")
    return name


def dataset_seed(meta: Mapping) -> int:
    """The seed a checkpoint's synthetic dataset (moons, spirals) was drawn with; digits' split is fixed."""
    return meta.get("dataset_seed", meta.get("seed")) or 0


def data_dir(args: argparse.Namespace, meta: Optional[Mapping] = None) -> str:
    """``--data-dir``; else the directory ``meta``'s dataset was read from, if it still exists; else ``data``."""
    given = getattr(args, "data_dir", None)
    if given:
        return given
    recorded = (meta or {}).get("data_dir")
    return recorded if recorded and Path(recorded).is_dir() else "data"


def data_source(ds: Dataset) -> dict:
    """What a checkpoint records about where ``ds`` was read from (nothing for embedded data)."""
    return {"data_dir": ds.info["data_dir"]} if ds.info.get("data_dir") else {}


def checkpoint_dataset(args: argparse.Namespace, meta: Mapping, source: str = "the checkpoint") -> Dataset:
    """The dataset a checkpoint was trained on (or ``--dataset``), checked against its input shape."""
    name = dataset_name(args, meta, source)
    ds = get_dataset(name, data_dir(args, meta), getattr(args, "download", False), seed=dataset_seed(meta))
    expected = tuple(meta.get("input_shape", ds.input_shape))
    if tuple(ds.input_shape) != expected:
        raise CommandError(f"dataset {name!r} has inputs of shape {tuple(ds.input_shape)}, the architecture "
                           f"in {source} expects {expected}")
    return ds


def train_loader(ds: Dataset, args: argparse.Namespace, info: distributed.DistInfo) -> TensorLoader:
    """This rank's share of every global batch of ``--batch-size`` (the whole batch in one process)."""
    try:
        per_rank = distributed.per_rank_batch(args.batch_size, info.world_size)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return ds.train_loader(per_rank, seed=args.seed, rank=info.rank, world_size=info.world_size).to(info.device)


def split_loaders(ds: Dataset, args: argparse.Namespace, device
                  ) -> Tuple[Optional[TensorLoader], Optional[TensorLoader], TensorLoader]:
    """(train or None, test or None, BN data) of ``--split``; BN statistics always come from training data."""
    train = ds.eval_loader("train", args.batch_size).to(device)
    test = ds.eval_loader("test", args.batch_size).to(device)
    return (train if args.split in ("train", "both") else None,
            test if args.split in ("test", "both") else None, train)


def sample_loader(ds: Dataset, split: str, samples: Optional[int], batch_size: int, device,
                  seed: int = 0) -> TensorLoader:
    """The ``split`` data without augmentation, or ``samples`` of them drawn at random (seeded) when fewer."""
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    if samples is not None and samples < len(y):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples]
        x, y = x[keep], y[keep]
    return TensorLoader(x, y, batch_size, transform=ds.eval_transform).to(device)


def hessian_loader(ds: Dataset, args: argparse.Namespace, device) -> TensorLoader:
    """The first ``--hessian-samples`` training samples, without augmentation."""
    n = args.hessian_samples
    return TensorLoader(ds.x_train[:n], ds.y_train[:n], args.batch_size, transform=ds.eval_transform).to(device)

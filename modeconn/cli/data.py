"""The data a command reads: the dataset a checkpoint names, and its batches for training and evaluation."""
from __future__ import annotations

import argparse
from typing import Mapping, Optional, Tuple

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


def checkpoint_dataset(args: argparse.Namespace, meta: Mapping, source: str = "the checkpoint") -> Dataset:
    """The dataset a checkpoint was trained on (or ``--dataset``), checked against its input shape."""
    name = dataset_name(args, meta, source)
    ds = get_dataset(name, args.data_dir, getattr(args, "download", False), seed=dataset_seed(meta))
    expected = tuple(meta.get("input_shape", ds.input_shape))
    if tuple(ds.input_shape) != expected:
        raise CommandError(f"dataset {name!r} has inputs of shape {tuple(ds.input_shape)}, the architecture "
                           f"in {source} expects {expected}")
    return ds


def train_loader(ds: Dataset, args: argparse.Namespace, info: distributed.DistInfo,
                 seed: Optional[int] = None) -> TensorLoader:
    """This rank's share of every global batch of ``--batch-size`` (the whole batch in one process),
    in the data order of ``seed`` (default ``--seed``)."""
    try:
        per_rank = distributed.per_rank_batch(args.batch_size, info.world_size)
    except ValueError as e:
        raise CommandError(str(e)) from None
    seed = args.seed if seed is None else seed
    return ds.train_loader(per_rank, seed=seed, rank=info.rank, world_size=info.world_size).to(info.device)


def split_loaders(ds: Dataset, args: argparse.Namespace, device
                  ) -> Tuple[Optional[TensorLoader], Optional[TensorLoader], TensorLoader]:
    """(train or None, test or None, BN data) of ``--split``; BN statistics always come from training data."""
    train = ds.eval_loader("train", args.batch_size).to(device)
    test = ds.eval_loader("test", args.batch_size).to(device)
    return (train if args.split in ("train", "both") else None,
            test if args.split in ("test", "both") else None, train)


def hessian_loader(ds: Dataset, args: argparse.Namespace, device) -> TensorLoader:
    """The first ``--hessian-samples`` training samples, without augmentation."""
    n = args.hessian_samples
    return TensorLoader(ds.x_train[:n], ds.y_train[:n], args.batch_size, transform=ds.eval_transform).to(device)

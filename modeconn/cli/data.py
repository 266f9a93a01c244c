"""The data a command reads: the dataset a checkpoint names, and its batches for training and evaluation."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Optional, Tuple


from modeconn.cli.errors import CommandError
from modeconn.data import Dataset, TensorLoader, get_dataset
from modeconn.data.external import canonical_dataset_spec, is_spec
from modeconn.runtime.user_code import absolute_file_spec
from modeconn.models.registry import model_parameters
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


def load_dataset(args: argparse.Namespace, name: str, seed: int, meta: Optional[Mapping] = None) -> Dataset:
    """Dataset ``name`` as a command reads it: the data directory (:func:`data_dir`); for a spec also the
    recorded image size (else ``--image-size``) and ``--workers``."""
    kwargs = {}
    if is_spec(name):
        recorded = (meta or {}).get("dataset_kwargs") or {}
        kwargs = {"image_size": recorded.get("image_size", args.image_size), "workers": args.workers}
        if name.startswith("text:"):  # the tokenizer of the endpoints' model directory, when it has one
            from modeconn.hf.text import text_kwargs

            kwargs.update(text_kwargs(recorded, meta))
            if getattr(args, "block_size", None):
                kwargs["block_size"] = args.block_size
    return get_dataset(name, data_dir(args, meta), getattr(args, "download", False), seed=seed, **kwargs)


def text_record(ds: Dataset) -> dict:
    """The ``dataset_kwargs`` a checkpoint records for a ``text:`` dataset (its tokenizer and block size),
    so that later commands cut the same blocks; empty for other datasets."""
    if not str(ds.name).startswith("text:"):
        return {}
    tokenizer = ds.info.get("tokenizer")
    return {"block_size": ds.info["block_size"], "tokenizer": None if tokenizer == "bytes" else tokenizer,
            "mlm": bool(ds.info.get("mlm"))}


def dataset_record(args: argparse.Namespace) -> dict:
    """What a checkpoint records about ``--dataset``: the spec with its paths made absolute, and the image
    size of an image folder."""
    name = canonical_dataset_spec(args.dataset) if is_spec(args.dataset) else args.dataset
    return {"dataset": name, "dataset_kwargs": ({"image_size": args.image_size}
                                                if name.startswith("imagefolder:") else {})}


def canonical_specs(args: argparse.Namespace) -> None:
    """``--model`` and ``--dataset`` as checkpoints store them, in place: file and folder paths absolute."""
    args.model = absolute_file_spec(args.model)
    args.dataset = dataset_record(args)["dataset"]


def data_fields(args: argparse.Namespace, ds: Dataset) -> dict:
    """What a model checkpoint trained on ``--dataset`` records besides its name: the image size of an image
    folder and the directory the data were read from."""
    return {"dataset_kwargs": dataset_record(args)["dataset_kwargs"], **data_source(ds)}


def checkpoint_dataset(args: argparse.Namespace, meta: Mapping, source: str = "the checkpoint") -> Dataset:
    """The dataset a checkpoint was trained on (or ``--dataset``), checked against its input shape."""
    name = dataset_name(args, meta, source)
    ds = load_dataset(args, name, dataset_seed(meta), meta)
    expected = tuple(meta.get("input_shape", ds.input_shape))
    if str(meta.get("arch", "")).startswith("hf:") and len(ds.input_shape) == 1:
        # a model directory's input_shape is its context length: any shorter sequence fits
        expected = (min(ds.input_shape[0], expected[0]),)
        if (ds.vocab_size or 0) > meta["num_classes"]:
            raise CommandError(f"dataset {name!r} has token ids up to {ds.vocab_size - 1} but the model in "
                               f"{source} has a vocabulary of {meta['num_classes']}")
    if tuple(ds.input_shape) != expected:
        raise CommandError(f"dataset {name!r} has inputs of shape {tuple(ds.input_shape)}, the architecture "
                           f"in {source} expects {expected}")
    if "arch" in meta:
        model_kwargs_for(meta["arch"], ds, meta.get("arch_kwargs") or {}, source)
    return ds


def model_kwargs_for(model: str, ds: Dataset, kwargs: Mapping, source: str = "--model-kwargs") -> dict:
    """``kwargs`` plus what the data fix: a token dataset's vocabulary as ``vocab`` (unless given).

    A :class:`CommandError` when model and data do not fit: token ids for a
    model of float inputs or the reverse, or a ``vocab`` smaller than the
    dataset's (the embedding would be indexed out of range).
    """
    params = model_parameters(model)
    reads_tokens = params is not None and "vocab" in params
    if ds.vocab_size is None:
        if reads_tokens:
            raise CommandError(f"model {model!r} reads token ids; dataset {ds.name!r} has float inputs of shape "
                               f"{tuple(ds.input_shape)} (use a sequence dataset such as 'majority')")
        return dict(kwargs)
    if not reads_tokens:
        raise CommandError(f"dataset {ds.name!r} holds token ids (vocab {ds.vocab_size}); model {model!r} takes "
                           f"float inputs (use a sequence model such as 'gpt')")
    vocab = kwargs.get("vocab", ds.vocab_size)
    if not isinstance(vocab, int) or vocab < ds.vocab_size:
        raise CommandError(f"vocab={vocab!r} in {source} does not cover dataset {ds.name!r}, whose token ids "
                           f"run to {ds.vocab_size - 1}: need vocab >= {ds.vocab_size}")
    return {**kwargs, "vocab": vocab}


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


def bn_loader(ds: Dataset, args: argparse.Namespace, device, batch_size: Optional[int] = None):
    """The data of the BatchNorm statistics: all training samples, or ``--bn-samples`` random ones, in
    batches of ``batch_size`` (default ``--batch-size``)."""
    n = getattr(args, "bn_samples", None)
    return ds.eval_loader("train", batch_size or args.batch_size, samples=n,
                          seed=None if n is None else 0).to(device)


def split_loaders(ds: Dataset, args: argparse.Namespace, device
                  ) -> Tuple[Optional[TensorLoader], Optional[TensorLoader], TensorLoader]:
    """(train or None, test or None, BN data) of ``--split``; BN statistics always come from training data."""
    train = ds.eval_loader("train", args.batch_size).to(device)
    test = ds.eval_loader("test", args.batch_size).to(device)
    return (train if args.split in ("train", "both") else None,
            test if args.split in ("test", "both") else None, bn_loader(ds, args, device))


def sample_loader(ds: Dataset, split: str, samples: Optional[int], batch_size: int, device, seed: int = 0):
    """The ``split`` data without augmentation, or ``samples`` of them drawn at random (seeded) when fewer."""
    return ds.eval_loader(split, batch_size, samples=samples, seed=seed).to(device)


def hessian_loader(ds: Dataset, args: argparse.Namespace, device):
    """The first ``--hessian-samples`` training samples, without augmentation."""
    return ds.eval_loader("train", args.batch_size, samples=args.hessian_samples).to(device)

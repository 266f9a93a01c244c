"""Datasets from outside the embedded set, named by a spec a checkpoint can store.

* ``imagefolder:PATH`` — torchvision ``ImageFolder`` trees ``PATH/train`` and
  ``PATH/val`` (one folder per class), streamed from disk; training images get
  a random resized crop and a horizontal flip, evaluation images a resize and
  a centre crop, all to ``image_size`` and normalised with ImageNet's
  statistics.
* ``text:PATH`` — a text file or a directory of files as next-token data
  (:mod:`modeconn.hf.text`; byte-level, or a model directory's tokenizer).
* ``pkg.module:factory`` / ``path/to/file.py:factory`` — ``factory(seed=...)``
  (or ``factory()``) returns either ``(x_train, y_train, x_test, y_test)``
  (tensors or arrays: held in memory), ``(train_set, test_set)`` (torch
  Datasets of ``(tensor, label)``: streamed), or a :class:`Dataset`.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from modeconn.data.datasets import Dataset
from modeconn.data.stream import StreamDataset
from modeconn.runtime.user_code import absolute_file_spec, load_attribute

__all__ = ["is_spec", "canonical_dataset_spec", "external_dataset"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_spec(name: str) -> bool:
    """Whether ``name`` is a spec (``a:b``) rather than an embedded or torchvision name."""
    return isinstance(name, str) and ":" in name


def canonical_dataset_spec(name: str) -> str:
    """The spec as a checkpoint stores it: paths (image folder, Python file) made absolute."""
    source, _, rest = name.partition(":")
    if source in ("imagefolder", "text"):
        return f"{source}:{Path(rest).resolve()}"
    return absolute_file_spec(name)


def _image_folder(root: str, image_size: int, workers: int) -> StreamDataset:
    """``imagefolder:ROOT``: ROOT/train and ROOT/val streamed with the usual transforms."""
    from torchvision import datasets, transforms as T

    base = Path(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise FileNotFoundError(f"dataset 'imagefolder:{root}': no folder {base / split} "
                                    "(an image folder needs train/ and val/, one subfolder per class)")
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), *norm])
    eval_tf = T.Compose([T.Resize(round(image_size * 8 / 7)), T.CenterCrop(image_size), *norm])
    train = datasets.ImageFolder(str(base / "train"), transform=train_tf)
    val = datasets.ImageFolder(str(base / "val"), transform=eval_tf)
    if train.classes != val.classes:
        raise ValueError(f"dataset 'imagefolder:{root}': train/ has classes {train.classes} but val/ has "
                         f"{val.classes}")
    return StreamDataset(f"imagefolder:{base.resolve()}", train, datasets.ImageFolder(str(base / "train"), eval_tf),
                         val, len(train.classes), (3, image_size, image_size), workers,
                         info={"classes": train.classes})


def _as_tensor(a, what: str, spec: str) -> torch.Tensor:
    """``a`` as a tensor (arrays converted), or a ValueError naming the spec."""
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    raise ValueError(f"dataset {spec!r}: {what} must be a tensor or an array, got {type(a).__name__}")


def _from_tensors(spec: str, parts) -> Dataset:
    """An in-memory :class:`Dataset` from ``(x_train, y_train, x_test, y_test)``."""
    names = ("x_train", "y_train", "x_test", "y_test")
    xtr, ytr, xte, yte = (_as_tensor(p, n, spec) for p, n in zip(parts, names))
    if xtr.is_floating_point() is False and xtr.dtype != torch.long:
        xtr, xte = xtr.float(), xte.float()
    ytr, yte = ytr.long(), yte.long()
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if len(x) != len(y) or y.dim() != 1:
            raise ValueError(f"dataset {spec!r}: {split} has {len(x)} inputs but labels of shape {tuple(y.shape)}")
    if tuple(xtr.shape[1:]) != tuple(xte.shape[1:]):
        raise ValueError(f"dataset {spec!r}: train samples have shape {tuple(xtr.shape[1:])}, test samples "
                         f"{tuple(xte.shape[1:])}")
    classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(spec, xtr, ytr, xte, yte, classes, tuple(xtr.shape[1:]))


def _from_datasets(spec: str, train, test, workers: int) -> StreamDataset:
    """A streamed dataset from two torch Datasets of ``(tensor, label)``."""
    x0, _ = train[0]
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"dataset {spec!r}: samples must be (tensor, label), got {type(x0).__name__} inputs "
                         "(add a ToTensor transform)")
    classes = getattr(train, "classes", None)
    if classes is not None:
        num_classes = len(classes)
    else:  # no class list: the largest label seen, over both splits
        labels = getattr(train, "targets", None)
        labels = list(labels) if labels is not None else [int(train[i][1]) for i in range(len(train))]
        labels += [int(test[i][1]) for i in range(len(test))]
        num_classes = int(max(labels)) + 1
    return StreamDataset(spec, train, train, test, num_classes, tuple(x0.shape), workers)


def external_dataset(spec: str, seed: int = 0, image_size: int = 32, workers: int = 0, **text_kwargs):
    """The dataset ``spec`` names (see the module docstring); ValueError/FileNotFoundError naming it.

    ``text_kwargs`` (``block_size``, ``tokenizer``, ``max_chars``) go to ``text:PATH`` only."""
    source, _, rest = spec.partition(":")
    if source == "text":
        from modeconn.hf.text import text_dataset

        return text_dataset(rest, seed, **text_kwargs)
    if source == "imagefolder":
        return _image_folder(rest, int(image_size), int(workers))
    factory = load_attribute(spec, "dataset")
    takes_seed = "seed" in inspect.signature(factory).parameters
    out = factory(seed=seed) if takes_seed else factory()
    if isinstance(out, (Dataset, StreamDataset)):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 4:
        return _from_tensors(spec, out)
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return _from_datasets(spec, out[0], out[1], int(workers))
    raise ValueError(f"dataset {spec!r}: the factory returned {type(out).__name__}; expected (x_train, y_train, "
                     "x_test, y_test), (train_set, test_set) or a modeconn Dataset")

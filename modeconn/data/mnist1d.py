"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"): procedural 1-D digits, generated offline.

Ten 12-point templates are padded, sheared, translated, scaled, given
correlated and i.i.d. noise and resampled to 40 points by the ``mnist1d``
package's own generator (``mnist1d.data.make_dataset``); nothing is
downloaded (its ``get_dataset`` would fetch a pickle from a URL: not used).
Defaults are the package's: 5000 samples, 4000 for training, generator seed 42.
The data are part of the dataset's definition, not of a run: ``data_seed``
chooses them, the run's ``seed`` does not (as for ``digits``), so endpoints
trained with different seeds see the same samples.
"""
from __future__ import annotations

import functools
import random
from typing import Tuple

import numpy as np
import torch

from modeconn.data.datasets import Dataset

__all__ = ["mnist1d_arrays", "mnist1d_dataset"]

CANONICAL_SEED = 42


@functools.lru_cache(maxsize=4)
def mnist1d_arrays(data_seed: int = CANONICAL_SEED, num_samples: int = 5000) -> Tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` as float32 ``[N, 40]`` / int64 ``[N]`` numpy arrays (cached).

    The package seeds Python's and numpy's global generators; their states are
    put back afterwards, so generating the data changes no other randomness.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 10:
        raise ValueError(f"num_samples must be an integer >= 10 (one per class), got {num_samples!r}")
    args = get_dataset_args()
    args.seed, args.num_samples = int(data_seed), int(num_samples)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (d["x"].astype(np.float32), d["y"].astype(np.int64), d["x_test"].astype(np.float32),
            d["y_test"].astype(np.int64))


def mnist1d_dataset(seed: int = 0, data_seed: int = CANONICAL_SEED, num_samples: int = 5000, **_) -> Dataset:
    """The ``mnist1d`` :class:`~modeconn.data.datasets.Dataset`: inputs ``[N, 1, 40]`` (one channel), 10 classes.

    ``seed`` (the run's) is ignored; see the module docstring.
    """
    xtr, ytr, xte, yte = mnist1d_arrays(int(data_seed), int(num_samples))
    return Dataset("mnist1d", torch.tensor(xtr)[:, None], torch.tensor(ytr), torch.tensor(xte)[:, None],
                         torch.tensor(yte), 10, (1, 40),
                         info={"data_seed": int(data_seed), "n_train": len(xtr), "n_test": len(xte),
                               "source": "mnist1d.data.make_dataset (Greydanus 2020), generated offline"})

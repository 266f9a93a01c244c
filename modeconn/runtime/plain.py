"""One converter from results to plain data: what JSON files and ``weights_only`` checkpoints can hold."""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["to_plain"]


def to_plain(obj: Any, keep_tensors: bool = False) -> Any:
    """Nested dicts and lists of bools, ints, floats, strings and None.

    Mappings become dicts with string keys (integer keys kept when
    ``keep_tensors``), tuples become lists, numpy scalars and arrays become
    Python numbers and lists, paths become strings, and anything else its
    ``str``. With ``keep_tensors`` (checkpoints) tensors stay tensors and
    floats stay as they are; without (JSON) tensors become lists and
    non-finite floats become ``None``.

    Example:
        >>> to_plain({"a": (1, float("nan")), 2: np.float32(0.5)})
        {'a': [1, None], '2': 0.5}
    """
    if isinstance(obj, torch.Tensor):
        return obj if keep_tensors else to_plain(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist(), keep_tensors)
    if isinstance(obj, Mapping):
        return {(k if keep_tensors and isinstance(k, int) else str(k)): to_plain(v, keep_tensors)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, keep_tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, np.bool_)):
        return None if obj is None else bool(obj)
    if isinstance(obj, str):
        return str(obj)  # also a str subclass such as torch's TorchVersion
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        v = float(obj)
        return v if keep_tensors or math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)

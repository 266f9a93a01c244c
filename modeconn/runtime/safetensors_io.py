"""Checkpoints as ``.safetensors`` files: tensors in the file's tensor table, everything else in its metadata.

A modeconn checkpoint (:mod:`modeconn.runtime.checkpoints`) is a nested dict
of plain data and tensors. In a ``.safetensors`` file every tensor is stored
under its key path (``state_dict/layers.0.weight``; tools that read
safetensors see the weights by those names) and the rest of the dict goes to
the file's ``__metadata__`` as JSON under the key ``modeconn``, with each
tensor replaced by ``{"__tensor__": name}`` and each dict with integer keys
(optimizer states) by ``{"__items__": [[key, value], ...]}``. Nothing is
pickled: reading the file never runs code. A ``.safetensors`` file without
that metadata is a plain state dict. Needs the ``safetensors`` package (the
``hf`` extra).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "c.safetensors"
    >>> _ = path.write_bytes(encode_checkpoint({"format": "modeconn", "seed": 3, "opt": {0: {"lr": 0.1}},
    ...                                         "state_dict": {"w": torch.ones(2)}}))
    >>> obj = decode_checkpoint(path)
    >>> obj["seed"], obj["opt"], obj["state_dict"]["w"].tolist()
    (3, {0: {'lr': 0.1}}, [1.0, 1.0])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

from modeconn.hf import require

__all__ = ["SUFFIX", "is_safetensors", "encode_checkpoint", "decode_checkpoint"]

SUFFIX = ".safetensors"
META_KEY = "modeconn"


def is_safetensors(path) -> bool:
    """Whether ``path`` names a ``.safetensors`` file (by its suffix)."""
    return Path(path).suffix == SUFFIX


def _encode(obj: Any, tensors: Dict[str, torch.Tensor], path: str) -> Any:
    """``obj`` as JSON-able data; its tensors moved to ``tensors`` under their key paths."""
    if isinstance(obj, torch.Tensor):
        # a copy of its own: safetensors refuses tensors that share storage (tied weights)
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}/{k}" if path else str(k))] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
    return obj


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def encode_checkpoint(payload: dict) -> bytes:
    """The bytes of a ``.safetensors`` file holding ``payload`` (plain data and tensors)."""
    st = require("safetensors.torch", ".safetensors checkpoints")
    tensors: Dict[str, torch.Tensor] = {}
    meta = _encode(payload, tensors, "")
    return st.save(tensors, metadata={META_KEY: json.dumps(meta)})


def decode_checkpoint(path) -> Any:
    """A ``.safetensors`` file as written by :func:`encode_checkpoint`, or its tensors when it has no
    modeconn metadata (a plain state dict).

    Raises:
        ValueError (from safetensors) / OSError: the file is not a readable safetensors file.
    """
    safetensors = require("safetensors", ".safetensors checkpoints")
    st = require("safetensors.torch", ".safetensors checkpoints")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
        tensors = st.load_file(str(path))
    except OSError:
        raise
    except Exception as e:  # safetensors' own error type is not a ValueError
        raise ValueError(f"not a safetensors file ({e})") from None
    return tensors if meta is None else _decode(json.loads(meta), tensors)

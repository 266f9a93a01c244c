"""Hugging Face language models, text data and ``.safetensors`` files (the optional extra ``modeconn[hf]``).

* :mod:`modeconn.hf.models`: a model directory (``config.json`` +
  ``model.safetensors``, as ``save_pretrained`` writes it) read as an endpoint
  and written back, always from local files (``local_files_only=True``);
  the model is wrapped by :class:`LMLogits` so that it maps token ids
  ``[B, T]`` to logits ``[B, T, V]`` like every model of modeconn.
* :mod:`modeconn.hf.text`: ``text:PATH`` datasets, tokenised byte-level or
  with a model directory's tokenizer, cut into fixed-length blocks whose
  targets are the next tokens (the causal-LM loss is the token-level
  cross-entropy, see :func:`modeconn.training.loop.get_loss`).

``transformers`` and ``safetensors`` are imported only when needed; without
them one line says ``pip install modeconn[hf]`` (:func:`require`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["HF_EXTRA_HINT", "MissingExtraError", "require"]

HF_EXTRA_HINT = "pip install modeconn[hf]"


class MissingExtraError(ValueError):
    """An optional dependency of the ``hf`` extra is not installed; the message says what to install.

    A ValueError, so that a command ends with this one line and exit status 2 (bad input:
    the environment lacks what the given input needs), like any other unusable input.
    """


def require(module: str, what: str) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` saying that ``what`` needs the ``hf`` extra.

    Example:
        >>> require("json", "reading JSON").__name__
        'json'
        >>> require("no_such_module_xyz", "Hugging Face model directories")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        modeconn.hf.MissingExtraError: Hugging Face model directories need no_such_module_xyz: pip install modeconn[hf]
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{what} need {module}: {HF_EXTRA_HINT}") from None

"""The user's own code named by a spec string: ``pkg.module:attr`` or ``path/to/file.py:attr``.

Models and datasets outside modeconn are named this way on the command line and
stored in checkpoints, so later commands can rebuild them from the checkpoint alone.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Dict

__all__ = ["absolute_file_spec", "load_attribute"]

_FILE_MODULES: Dict[str, ModuleType] = {}  # resolved path -> the module loaded from it


def absolute_file_spec(spec: str) -> str:
    """``spec`` with a ``file.py`` source made absolute (as a checkpoint stores it); others unchanged.

    Example:
        >>> absolute_file_spec("pkg.nets:build")
        'pkg.nets:build'
    """
    source, _, attr = spec.rpartition(":")
    return f"{Path(source).resolve()}:{attr}" if source.endswith(".py") else spec


def _module_from_file(path: str, spec: str, what: str) -> ModuleType:
    """The module loaded from the Python file ``path``, once per resolved path (kept in this module's own
    cache, not in ``sys.modules``: the user's file is not made importable by a made-up name)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{what} {spec!r}: no such file {file}")
    key = str(file.resolve())
    if key not in _FILE_MODULES:
        name = "modeconn_user_" + hashlib.sha1(key.encode()).hexdigest()[:16]
        loader_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error it raises
            raise ValueError(f"{what} {spec!r}: loading {file} failed ({type(e).__name__}: {e})") from e
        _FILE_MODULES[key] = module
    return _FILE_MODULES[key]


def load_attribute(spec: str, what: str = "spec") -> Any:
    """The callable ``attr`` of ``module:attr`` or ``file.py:attr``; ValueError naming ``what`` and the spec."""
    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise ValueError(f"{what} spec {spec!r} must be 'module:name' or 'file.py:name'")
    if source.endswith(".py"):
        module = _module_from_file(source, spec, what)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import module {source!r} ({e})") from None
    value = getattr(module, attr, None)
    if not callable(value):
        raise ValueError(f"{what} {spec!r}: {source} has no callable {attr!r}")
    return value

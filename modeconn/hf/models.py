"""Hugging Face model directories as modeconn models: read as endpoints, rebuilt from a spec, written back.

A directory with ``config.json`` and weights (``model.safetensors``) is read
with ``transformers`` from the local files only (``local_files_only=True``,
never the network), in float32 whatever dtype it was stored in (curves are
fitted in float32), and wrapped in :class:`LMLogits`: token ids ``[B, T]`` ->
logits ``[B, T, V]``. Its metadata looks like a modeconn model checkpoint's
(:func:`load_model_dir`), with ``arch = "hf:MODEL_TYPE"`` and the config as
plain data in ``arch_kwargs`` (without what only says how it was stored), from
which :func:`hf_builder` rebuilds the architecture (fresh weights): two
fine-tunes of one model have the same ``arch``, and a curve checkpoint between
two directories rebuilds from itself.
Attention runs the "eager" implementation: the plain matmul/softmax that
``torch.func`` (vmap over curve points, functional calls) can batch.

:func:`save_model_dir` writes weights back as a directory ``from_pretrained``
loads (safetensors), in a chosen dtype, with the source's tokenizer files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from modeconn.hf import require
from modeconn.runtime.checkpoints import CheckpointError, WriteError, check_finite_tensors, make_directory

__all__ = ["LMLogits", "is_model_dir", "load_model_dir", "hf_builder", "save_model_dir", "context_length",
           "stored_dtype", "architecture", "build_model_of", "HF_PREFIX"]

HF_PREFIX = "hf:"
WHAT = "Hugging Face model directories"
# what a directory holds besides the weights and the config: copied to every directory written from it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "tokenizer.model", "generation_config.json")


class _SharedWeight:
    """A forward pre-hook giving a module the current value of a parameter another module owns (ties).

    An object rather than a closure, so that ``copy.deepcopy`` of the model points the copy's module at
    the copy's owner.
    """

    def __init__(self, owner: nn.Module, owner_attr: str, attr: str):
        """The hooked module's ``attr`` is ``owner.<owner_attr>``."""
        self.owner, self.owner_attr, self.attr = owner, owner_attr, attr

    def __call__(self, module: nn.Module, args) -> None:
        """Point ``module.<attr>`` at the owner's value of this call (a plain attribute, not registered)."""
        object.__setattr__(module, self.attr, getattr(self.owner, self.owner_attr))


class LMLogits(nn.Module):
    """A ``transformers`` language model as a function of token ids: ``[B, T]`` -> logits ``[B, T, V]``.

    The state-dict names are the model's own behind ``model.`` (``model.transformer.h.0.attn.c_attn.weight``);
    a tied parameter appears once, under its first name (the input embedding, not the head).
    """

    def __init__(self, model: nn.Module):
        """Wrap ``model`` (a ``PreTrainedModel`` with a language-modelling head); untie its tied parameters."""
        super().__init__()
        self.model = model
        self._untie()

    def _untie(self) -> None:
        """Make every module that shares a parameter with an earlier one read it at every call.

        A tied parameter (the output head's weight and the input embedding, BERT's
        decoder bias and its prediction bias) is one Parameter object in two modules;
        modeconn runs networks with weights passed from outside (``functional_call`` on
        a template whose parameters were removed,
        :class:`~modeconn.core.curve_model.CurveModel`), where that sharing is lost. So
        only its first owner (``named_parameters``' order) keeps it, and a pre-hook hands
        the others the owner's current value before each call.
        """
        owners = {}
        for module in self.model.modules():
            for attr, param in list(module._parameters.items()):
                if param is None:
                    continue
                if id(param) not in owners:
                    owners[id(param)] = (module, attr)
                    continue
                del module._parameters[attr]
                share = _SharedWeight(*owners[id(param)], attr)
                module.register_forward_pre_hook(share)
                share(module, ())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The head's logits for every position of ``input_ids``."""
        return self.model(input_ids=input_ids).logits


def is_model_dir(path) -> bool:
    """Whether ``path`` is a directory holding a ``config.json`` (a Hugging Face model directory)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _transformers():
    """The transformers module, its progress bars and advice off (library code prints nothing)."""
    transformers = require("transformers", WHAT)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _config(path: Path):
    """The directory's config (local files only), with the key-value cache off (one forward per batch)."""
    transformers = _transformers()
    if not is_model_dir(path):
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: config.json is not readable by transformers: {e}") from None
    config.use_cache = False
    return config


def _model_class(config) -> type:
    """The class the config names (``architectures``), else the causal-LM auto class."""
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def stored_dtype(config) -> torch.dtype:
    """The dtype the directory's weights were saved in (``dtype``, formerly ``torch_dtype``); float32 if unsaid."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def context_length(config) -> int:
    """The longest sequence the model's position embeddings cover."""
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"{type(config).__name__} names no context length (n_positions / max_position_embeddings)")


# config entries that say where or how a model was stored, not what it computes
_NOT_ARCHITECTURE = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label", "label2id",
                     "use_cache")


def architecture(config) -> dict:
    """The config as plain data, without what depends on storage: equal for two fine-tunes of one model."""
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}


def config_from(arch_config: Mapping):
    """The ``transformers`` config of :func:`architecture`'s plain data (attention "eager", no cache)."""
    transformers = _transformers()
    kwargs = dict(arch_config)
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    config.use_cache = False
    return config


def _metadata(path: Path, config, net: nn.Module) -> dict:
    """What a modeconn model checkpoint holds, for a model directory (``meta["arch"]`` rebuilds it)."""
    extra = {}
    side = path / "modeconn.json"
    if side.is_file():  # written by modeconn: dataset, seed, metrics of the run that produced it
        extra = json.loads(side.read_text())
    return {"kind": "model", "arch": f"{HF_PREFIX}{config.model_type}",
            "arch_kwargs": {"config": architecture(config)},
            "input_shape": [context_length(config)], "num_classes": int(config.vocab_size),
            "dataset": extra.get("dataset"), "dataset_kwargs": extra.get("dataset_kwargs", {}),
            "seed": extra.get("seed"), "metrics": extra.get("metrics", {}),
            "hf_dtype": str(stored_dtype(config)).replace("torch.", ""), "source_dir": str(path.resolve()),
            "hf_objective": "masked_lm" if any(a.endswith("ForMaskedLM") for a in config.architectures or ())
            else "causal_lm",
            "state_dict": {k: v.detach() for k, v in net.state_dict().items()}}


def load_model_dir(path) -> Tuple[LMLogits, dict]:
    """``(model, metadata)`` of a model directory, in float32, read from local files only (module docstring).

    Raises:
        MissingExtraError: transformers is not installed.
        CheckpointError: not a model directory, unreadable, or weights with NaN/Inf.
    """
    path = Path(path)
    config = _config(path)
    try:
        model = _model_class(config).from_pretrained(str(path), config=config, local_files_only=True,
                                                     attn_implementation="eager", dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the weights cannot be loaded by transformers: {e}") from None
    net = LMLogits(model).eval()
    meta = _metadata(path, config, net)
    check_finite_tensors(path, meta)
    return net, meta


def build_model_of(arch_config: Mapping) -> LMLogits:
    """The architecture :func:`architecture` describes, with fresh weights (float32)."""
    config = config_from(arch_config)
    cls = _model_class(config)
    make = getattr(cls, "_from_config", None) or cls.from_config  # a concrete class, or an auto class
    return LMLogits(make(config, attn_implementation="eager", dtype=torch.float32))


def hf_builder(model_type: str) -> Callable[..., nn.Module]:
    """The model builder of ``hf:MODEL_TYPE`` (see :mod:`modeconn.models.external`)."""

    def build(input_shape: Sequence[int], num_classes: int, config: Optional[Mapping] = None,
              vocab: Optional[int] = None) -> nn.Module:
        """The architecture ``config`` describes (fresh weights); ``vocab``/``input_shape`` must fit it."""
        if not isinstance(config, Mapping) or config.get("model_type") != model_type:
            raise ValueError(f"model 'hf:{model_type}' needs config= the plain config of a {model_type} model "
                             "(as a model directory's metadata holds it)")
        net = build_model_of(config)
        cfg = net.model.config
        if vocab is not None and vocab > cfg.vocab_size:
            raise ValueError(f"model 'hf:{model_type}' has a vocabulary of {cfg.vocab_size} tokens, the data "
                             f"need {vocab}")
        if input_shape[0] > context_length(cfg):
            raise ValueError(f"model 'hf:{model_type}' reads at most {context_length(cfg)} tokens, the data "
                             f"have sequences of {input_shape[0]}")
        return net

    return build


def _model_state(source: Union[nn.Module, Mapping[str, torch.Tensor]]) -> dict:
    """The transformers model's own state dict from an :class:`LMLogits`, its state dict, or a bare model."""
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    if isinstance(source, LMLogits) or all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def save_model_dir(weights: Union[nn.Module, Mapping[str, torch.Tensor]], meta: Mapping, out_dir,
                   dtype: Optional[torch.dtype] = None, info: Optional[Mapping] = None) -> Path:
    """Write ``weights`` as a model directory of ``meta``'s architecture that ``from_pretrained`` loads.

    ``weights``: an :class:`LMLogits`, or its state dict (``model.*`` names) or the model's own.
    ``meta``: an endpoint's metadata (:func:`load_model_dir`) or a checkpoint of ``hf:`` arch: the
    config, and the directory whose tokenizer files are copied beside. ``dtype``: the dtype to
    store (default: the endpoint's, so bf16 endpoints give bf16 points). ``info`` (plain data: how
    the weights were made) goes to ``modeconn.json``. The directory is written beside the target
    and renamed over it, so a crash leaves the old directory or the new one.

    Raises:
        WriteError: the directory cannot be written.
    """
    out_dir = Path(out_dir)
    net = build_model_of(meta["arch_kwargs"]["config"])
    net.model.load_state_dict(_model_state(weights))
    net.model.to(dtype or getattr(torch, meta.get("hf_dtype") or "float32"))
    make_directory(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    source = Path(meta["source_dir"]) if meta.get("source_dir") else None
    try:
        net.model.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if source is not None and (source / name).is_file() and not (tmp / name).exists():
                shutil.copy2(source / name, tmp / name)
        if info:
            (tmp / "modeconn.json").write_text(json.dumps(dict(info), indent=1))
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(e.errno, e.strerror or str(e), out_dir) from None
    return out_dir

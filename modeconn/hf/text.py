"""``text:PATH``: a text file, or a directory of files, as next-token prediction data.

The text is tokenised byte-level (UTF-8 bytes, a vocabulary of 256; needs
nothing beyond torch) or, given ``tokenizer=DIR``, with the tokenizer a
Hugging Face model directory holds (``transformers``, local files only). The
token stream is cut into blocks of ``block_size + 1`` tokens with stride
``block_size``; a sample is ``x = block[:-1]``, its labels ``y = block[1:]``
(the next token at every position), so the token-level cross-entropy of a
model's logits ``[B, T, V]`` is the causal-LM loss and its exponential the
perplexity. Encoders (``mlm=True``) get masked-LM samples instead
(:func:`masked_blocks`). The last ``test_fraction`` of the blocks (the end of the text) are
the test split: no test block shares a token with a training block beyond
the one at the boundary.

Example:
    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "t.txt"
    >>> _ = f.write_text("abcdefghij" * 10)
    >>> ds = text_dataset(str(f), block_size=8)
    >>> ds.input_shape, ds.vocab_size, len(ds.x_train) + len(ds.x_test)
    ((8,), 256, 12)
    >>> bytes(ds.x_train[0].tolist()), bytes(ds.y_train[0].tolist())
    (b'abcdefgh', b'bcdefghi')
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional

import torch

from modeconn.data.datasets import Dataset
from modeconn.hf import require

__all__ = ["text_dataset", "text_files", "tokenizer_dir", "masked_blocks", "BYTE_VOCAB", "IGNORE"]

BYTE_VOCAB = 256
IGNORE = -100  # the label of a position without a target (F.cross_entropy's default ignore_index)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _is_text(file: Path, root: Path) -> bool:
    """A visible file outside caches whose first 8 KiB hold no NUL byte (compiled or binary files do)."""
    parts = file.relative_to(root).parts
    if any(p.startswith(".") or p == "__pycache__" for p in parts) or not file.is_file():
        return False
    with open(file, "rb") as f:
        return b"\0" not in f.read(8192)


def text_files(path: Path) -> List[Path]:
    """``path`` itself, or every text file under the directory ``path`` in sorted order (hidden files,
    ``__pycache__`` and binary files left out)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_text(p, path))
        if files:
            return files
        raise ValueError(f"dataset 'text:{path}': the directory holds no text files")
    raise FileNotFoundError(f"dataset 'text:{path}': no such file or directory")


def tokenizer_dir(directory: Optional[str]) -> Optional[str]:
    """``directory`` if it is a model directory holding a tokenizer, else None."""
    if directory and any((Path(directory) / m).is_file() for m in TOKENIZER_MARKERS):
        return str(directory)
    return None


def _tokens(text: str, tokenizer: Optional[str]) -> torch.Tensor:
    """The token ids of ``text`` (1-D long): UTF-8 bytes, or the ids of ``tokenizer``'s tokenizer."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    transformers = require("transformers", "text tokenised with a model directory's tokenizer")
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def _vocab_size(tokenizer: Optional[str]) -> int:
    """256 for bytes, else the number of ids of the tokenizer (added tokens included)."""
    if tokenizer is None:
        return BYTE_VOCAB
    transformers = require("transformers", "text tokenised with a model directory's tokenizer")
    return len(transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True))


def _mask_id(tokenizer: Optional[str]) -> int:
    """The id that hides a token: 256 for bytes (one id past the bytes), else the tokenizer's mask token."""
    if tokenizer is None:
        return BYTE_VOCAB
    transformers = require("transformers", "text tokenised with a model directory's tokenizer")
    mask = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True).mask_token_id
    if mask is None:
        raise ValueError(f"masked-LM data: the tokenizer in {tokenizer} has no mask token")
    return int(mask)


def masked_blocks(blocks: torch.Tensor, mask_id: int, probability: float, seed: int):
    """``(x, y)`` of masked-LM samples: each token hidden (``mask_id``) with ``probability``, at least one per
    block; ``y`` holds the hidden tokens and :data:`IGNORE` elsewhere (BERT's objective, without its 10%
    random and 10% unchanged replacements). The masks are fixed by ``seed``.

    Example:
        >>> x, y = masked_blocks(torch.arange(8).view(2, 4), 99, 0.5, seed=0)
        >>> bool(((x == 99) == (y != IGNORE)).all()), bool((y[y != IGNORE] == torch.arange(8).view(2, 4)[x == 99]).all())
        (True, True)
    """
    g = torch.Generator().manual_seed(int(seed))
    hidden = torch.rand(blocks.shape, generator=g) < probability
    hidden[torch.arange(len(blocks)), torch.randint(blocks.shape[1], (len(blocks),), generator=g)] = True
    return blocks.masked_fill(hidden, mask_id), blocks.masked_fill(~hidden, IGNORE)


def text_dataset(path: str, seed: int = 0, block_size: int = 64, tokenizer: Optional[str] = None,
                 test_fraction: float = 0.1, max_chars: Optional[int] = None, mlm: bool = False,
                 mlm_probability: float = 0.15, **_) -> Dataset:
    """The :class:`~modeconn.data.Dataset` of ``text:PATH`` (see the module docstring).

    ``max_chars`` keeps the first characters of the concatenated files only;
    ``seed`` is accepted for the dataset interface (the split is fixed by position).
    ``mlm``: masked-LM samples for encoders instead (:func:`masked_blocks`, masks drawn from
    ``seed``): a block of ``block_size`` tokens, a hidden token's target is itself, the others
    are ignored by the loss and the metrics; byte-level text then has 257 ids (256 = mask).

    Raises:
        FileNotFoundError / ValueError: no such path, no files, or too little text for two
            training blocks and one test block (names the spec and the sizes).
    """
    spec = f"text:{Path(path).resolve()}"
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"dataset {spec!r}: block_size must be a positive int, got {block_size!r}")
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in text_files(Path(path)))
    if max_chars is not None:
        text = text[:int(max_chars)]
    ids = _tokens(text, tokenizer)
    n = (len(ids) - 1) // block_size
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise ValueError(f"dataset {spec!r}: {len(ids)} tokens make {n} blocks of {block_size}; need at least 3 "
                         "(use a longer text or a smaller block_size)")
    starts = torch.arange(n) * block_size
    blocks = ids[starts[:, None] + torch.arange(block_size + 1)]
    x, y = blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()
    vocab = _vocab_size(tokenizer)
    if mlm:
        x, y = masked_blocks(x, _mask_id(tokenizer), mlm_probability, seed)
        vocab = max(vocab, BYTE_VOCAB + 1) if tokenizer is None else vocab
    info = {"tokens": len(ids), "block_size": block_size, "tokenizer": tokenizer or "bytes", "mlm": bool(mlm)}
    return Dataset(spec, x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], vocab, (block_size,),
                   info=info, vocab_size=vocab)


def text_kwargs(recorded: Mapping, model_meta: Optional[Mapping] = None) -> dict:
    """The ``text_dataset`` keywords of a command: those a checkpoint recorded, and the tokenizer of the
    endpoint's model directory when it has one (else bytes)."""
    kwargs = {k: recorded[k] for k in ("block_size", "tokenizer", "max_chars", "mlm") if recorded.get(k) is not None}
    if "mlm" not in kwargs and (model_meta or {}).get("hf_objective") == "masked_lm":
        kwargs["mlm"] = True  # an encoder's endpoints: masked-LM samples
    if "tokenizer" not in kwargs:
        found = tokenizer_dir((model_meta or {}).get("source_dir"))
        if found:
            kwargs["tokenizer"] = found
    return kwargs

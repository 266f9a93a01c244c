"""Transformers of the zoo: ``gpt`` (a small causal decoder over token ids) and ``vit`` (torchvision's ViT).

``gpt`` is written out by hand with separate query/key/value ``nn.Linear``
layers (the form of nanoGPT and of most text transformers), so every weight
of the attention is a plain matrix that curves, alignment and landscapes see
by name. The class reads the sequence's last position (a classifier over
whole sequences, e.g. :func:`modeconn.data.get_dataset` ``("majority")``).

``vit`` is ``torchvision.models.VisionTransformer`` (Dosovitskiy et al. 2021):
``nn.MultiheadAttention`` blocks, a class token, learned positions. Its patch
embedding ``conv_proj`` is rebuilt for C input channels (torchvision
hard-codes 3) with torchvision's own initialisation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from modeconn.models.registry import check_image_shape, check_input_shape, check_int, register_model

__all__ = ["CausalSelfAttention", "Block", "GPT", "gpt", "vit"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, ``softmax(QKᵀ/√d + mask) V`` per head (Vaswani et al. 2017).

    ``x [B, seq_len, dim] -> [B, seq_len, dim]``; position i attends to positions ≤ i.
    Parameters: ``q``, ``k``, ``v``, ``proj`` (each ``nn.Linear(dim, dim)``).
    """

    def __init__(self, dim: int, heads: int, seq_len: int):
        super().__init__()
        self.heads, self.head_dim, self.seq_len = heads, dim // heads, seq_len
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.size(0), self.seq_len  # under fx a traced size cannot slice the mask buffer: T is fixed
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.k(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        att = att.masked_fill(~self.mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, heads: int, mlp: int, seq_len: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, seq_len)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """A causal decoder classifying token sequences: ``long [B, seq_len] -> logits [B, num_classes]``.

    ``h = tok(x) + pos``, ``depth`` :class:`Block` s, final LayerNorm,
    ``head`` on the last position. Token ids must lie in ``[0, vocab)``.
    Parameters: ``tok``, ``pos``, ``blocks.{i}.*``, ``ln_f``, ``head``.
    """

    def __init__(self, seq_len: int, num_classes: int, vocab: int, dim: int = 32, depth: int = 2,
                 heads: int = 2, mlp: int = 64):
        super().__init__()
        self.seq_len, self.vocab, self.num_classes = seq_len, vocab, num_classes
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp, seq_len) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos  # x holds exactly seq_len tokens
        h = self.blocks(h)
        return self.head(self.ln_f(h)[:, -1])


def _sequence_length(input_shape, model: str) -> int:
    """``(T,)`` -> T; anything else is an error that says what the model reads."""
    shape = check_input_shape(input_shape)
    if len(shape) != 1:
        raise ValueError(f"{model} reads sequences of token ids: input_shape must be (seq_len,), got {shape} "
                         f"(use a sequence dataset such as 'majority', or an image model)")
    return shape[0]


@register_model("gpt")
def gpt(input_shape, num_classes, vocab: int = None, dim: int = 32, depth: int = 2, heads: int = 2,
        mlp: int = 64) -> GPT:
    """:class:`GPT` for ``input_shape = (seq_len,)``; ``vocab`` (number of token ids) is required.

    ``dim`` must be divisible by ``heads``. A sequence dataset names its
    vocabulary (``Dataset.vocab_size``); the commands pass it on.
    """
    seq_len = _sequence_length(input_shape, "gpt")
    if vocab is None:
        raise ValueError("gpt needs parameter 'vocab' (the number of token ids, e.g. dataset.vocab_size)")
    vocab = check_int("vocab", vocab, minimum=1)
    dim, depth = check_int("dim", dim, minimum=1), check_int("depth", depth, minimum=1)
    heads, mlp = check_int("heads", heads, minimum=1), check_int("mlp", mlp, minimum=1)
    if dim % heads:
        raise ValueError(f"parameter 'dim' ({dim}) must be divisible by 'heads' ({heads})")
    return GPT(seq_len, num_classes, vocab, dim=dim, depth=depth, heads=heads, mlp=mlp)


@register_model("vit")
def vit(input_shape, num_classes, patch: int = 2, hidden: int = 32, depth: int = 2, heads: int = 2,
        mlp: int = 64) -> nn.Module:
    """torchvision's ``VisionTransformer`` for ``(C, S, S)`` images, patches of ``patch x patch``.

    ``S`` must be divisible by ``patch`` and ``hidden`` by ``heads``. The
    defaults give 8x8 digits 16 patch tokens (+ the class token).
    """
    from torchvision.models.vision_transformer import VisionTransformer

    C, H, W = check_image_shape(input_shape, "vit")
    patch = check_int("patch", patch, minimum=1)
    hidden, depth = check_int("hidden", hidden, minimum=1), check_int("depth", depth, minimum=1)
    heads, mlp = check_int("heads", heads, minimum=1), check_int("mlp", mlp, minimum=1)
    if H != W or H % patch:
        raise ValueError(f"vit needs square images whose side is divisible by 'patch' ({patch}); "
                         f"got input_shape {(C, H, W)}")
    if hidden % heads:
        raise ValueError(f"parameter 'hidden' ({hidden}) must be divisible by 'heads' ({heads})")
    net = VisionTransformer(H, patch, depth, heads, hidden, mlp, num_classes=num_classes)
    net.conv_proj = nn.Conv2d(C, hidden, kernel_size=patch, stride=patch)
    nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / (C * patch * patch)))  # torchvision's init
    nn.init.zeros_(net.conv_proj.bias)
    return net

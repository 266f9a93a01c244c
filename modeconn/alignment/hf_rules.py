"""Permutation specs of Hugging Face language models, read from their module structure.

``transformers`` models are not traced (their forward builds masks and
caches with Python control flow that ``torch.fx.symbolic_trace`` does not
follow); their blocks are few and regular, so the groups are written from the
config and the module names, one function per family, dispatched on
``config.model_type`` (:data:`HF_SPECS`). Every family has

* the residual stream (``D`` units): the token and position embeddings'
  columns, every norm over it (LayerNorm and RMSNorm commute with a
  permutation of their features when their weights move along), every
  projection reading it (input axis) or writing it (output axis and bias);
  a head tied to the input embedding shares it (it has no weight of its own,
  see :class:`modeconn.hf.models.LMLogits`), an untied head's columns move too;
* attention heads (the q/k/v blocks of ``d = D / H`` rows and the output
  projection's input blocks), the dims inside a head that q and k share, and
  the value dims, as :class:`AxisRef` with ``inner``/``outer``;
* the feed-forward units (elementwise activations, SwiGLU's gate and up
  projections moved together).

Family specifics: GPT-2 stores its ``Conv1D`` weights transposed (``[in,
out]``) and packs q, k, v into the columns of ``c_attn`` (offsets 0, D, 2D);
BERT is post-LayerNorm with separate q/k/v ``Linear`` and a masked-LM head
whose transform maps the residual stream to the tied decoder's input (so its
output is the residual permutation too); Llama has RMSNorm, SwiGLU, grouped
key/value heads (a key/value head and the query heads that read it move as
one) and rotary position embeddings, which keep q/k dims fixed (reason below).
The token ids and the vocabulary logits are never permuted.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from torch import nn

from modeconn.alignment.spec import AxisRef, PermutationGroup, PermutationSpec

__all__ = ["HF_SPECS", "hf_permutation_spec"]

VOCAB_REASON = "token embeddings' rows and logits are indexed by token id: the vocabulary is never permuted"
ROPE_REASON = ("q/k dims inside a head are fixed: rotary position embeddings rotate dims j and j + d/2 by "
               "angles of frequency θ_j, so any permutation of the dims would move a pair to another frequency "
               "and change q·k")


def _prefix(model: nn.Module, module: nn.Module) -> str:
    """The state-dict prefix of ``module`` inside ``model`` (``model.transformer.`` for GPT-2's body)."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _head_axes(model: nn.Module) -> List[AxisRef]:
    """The residual columns of the output head's weight when it has one of its own (untied, or tied but
    still listed in the state dict); a head untied by ``LMLogits`` reads the embedding's."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or "weight" not in head._parameters:
        return []
    return [AxisRef(_prefix(model, head) + "weight", 1)]


def _attention_groups(groups: Dict[str, PermutationGroup], name: str, H: int, d: int,
                      qkv: List[tuple], out: List[tuple], rope: bool) -> None:
    """Heads, q/k dims and value dims of one attention block.

    ``qkv``: ``(param, axis, offset, kind)`` for the rows of q, k and v (kind "q", "k" or "v"),
    ``out``: ``(param, axis)`` of the output projection's input axis.
    """
    groups[f"{name}.heads"] = PermutationGroup(H, [AxisRef(p, a, o, d) for p, a, o, _ in qkv] +
                                               [AxisRef(p, a, 0, d) for p, a in out])
    if not rope:
        groups[f"{name}.qk"] = PermutationGroup(d, [AxisRef(p, a, o, 1, H) for p, a, o, k in qkv if k != "v"])
    groups[f"{name}.v"] = PermutationGroup(d, [AxisRef(p, a, o, 1, H) for p, a, o, k in qkv if k == "v"] +
                                           [AxisRef(p, a, 0, 1, H) for p, a in out])


def gpt2_spec(model: nn.Module) -> PermutationSpec:
    """GPT-2 (``GPT2LMHeadModel``): Conv1D weights ``[in, out]``, q/k/v packed in ``c_attn``."""
    cfg = model.config
    D, H = cfg.n_embd, cfg.n_head
    d, p = D // H, _prefix(model, model.transformer)
    residual = [AxisRef(f"{p}wte.weight", 1), AxisRef(f"{p}wpe.weight", 1)]
    groups: Dict[str, PermutationGroup] = {}
    for i in range(cfg.n_layer):
        b = f"{p}h.{i}."
        residual += [AxisRef(f"{b}{n}", 0) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                                                     "attn.c_attn.weight", "mlp.c_fc.weight",
                                                     "attn.c_proj.bias", "mlp.c_proj.bias")]
        residual += [AxisRef(f"{b}attn.c_proj.weight", 1), AxisRef(f"{b}mlp.c_proj.weight", 1)]
        qkv = [(f"{b}attn.c_attn.{w}", 1 if w == "weight" else 0, off, kind)
               for w in ("weight", "bias") for off, kind in ((0, "q"), (D, "k"), (2 * D, "v"))]
        _attention_groups(groups, f"h.{i}.attn", H, d, qkv, [(f"{b}attn.c_proj.weight", 0)], rope=False)
        groups[f"h.{i}.mlp"] = PermutationGroup(model.transformer.h[i].mlp.c_fc.nf, [
            AxisRef(f"{b}mlp.c_fc.weight", 1), AxisRef(f"{b}mlp.c_fc.bias", 0), AxisRef(f"{b}mlp.c_proj.weight", 0)])
    residual += [AxisRef(f"{p}ln_f.weight", 0), AxisRef(f"{p}ln_f.bias", 0)]
    residual += _head_axes(model)
    return PermutationSpec({"residual": PermutationGroup(D, residual), **groups})


def _linear(name: str, rows: Optional[str], cols: Optional[str], bias: bool = True) -> Dict[str, list]:
    """``{group: refs}`` of an ``nn.Linear`` whose output units are group ``rows``, inputs ``cols``."""
    out: Dict[str, list] = {}
    if rows:
        out.setdefault(rows, []).append(AxisRef(f"{name}.weight", 0))
        if bias:
            out[rows].append(AxisRef(f"{name}.bias", 0))
    if cols:
        out.setdefault(cols, []).append(AxisRef(f"{name}.weight", 1))
    return out


def _merge(groups: Dict[str, list], more: Dict[str, list]) -> None:
    """Add ``more``'s refs to ``groups``."""
    for k, refs in more.items():
        groups.setdefault(k, []).extend(refs)


def bert_spec(model: nn.Module) -> PermutationSpec:
    """BERT-style encoders with a masked-LM head (``BertForMaskedLM``): post-LN, separate q/k/v."""
    cfg = model.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    d, p = D // H, _prefix(model, model.bert)
    e = f"{p}embeddings."
    refs: Dict[str, list] = {"residual": [AxisRef(f"{e}word_embeddings.weight", 1)] + [
        AxisRef(f"{e}{n}", 1 if n.endswith("embeddings.weight") else 0)
        for n in ("position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]}
    groups: Dict[str, PermutationGroup] = {}
    for i in range(cfg.num_hidden_layers):
        b = f"{p}encoder.layer.{i}."
        for n in ("query", "key", "value"):
            _merge(refs, _linear(f"{b}attention.self.{n}", None, "residual"))
        _merge(refs, _linear(f"{b}attention.output.dense", "residual", None))
        _merge(refs, _linear(f"{b}intermediate.dense", f"layer.{i}.ffn", "residual"))
        _merge(refs, _linear(f"{b}output.dense", "residual", f"layer.{i}.ffn"))
        refs["residual"] += [AxisRef(f"{b}{n}", 0) for n in ("attention.output.LayerNorm.weight",
                             "attention.output.LayerNorm.bias", "output.LayerNorm.weight", "output.LayerNorm.bias")]
        qkv = [(f"{b}attention.self.{n}.{w}", 0, 0, n[0]) for n in ("query", "key", "value") for w in ("weight", "bias")]
        _attention_groups(groups, f"layer.{i}.attention", H, d, qkv, [(f"{b}attention.output.dense.weight", 1)],
                          rope=False)
    t = _prefix(model, model.cls) + "predictions.transform."
    _merge(refs, _linear(f"{t}dense", "residual", "residual"))  # feeds the decoder tied to the embedding
    refs["residual"] += [AxisRef(f"{t}LayerNorm.weight", 0), AxisRef(f"{t}LayerNorm.bias", 0)]
    refs["residual"] += _head_axes(model)
    sizes = {k: D if k == "residual" else cfg.intermediate_size for k in refs}
    return PermutationSpec({**{k: PermutationGroup(sizes[k], v) for k, v in refs.items()}, **groups})


def llama_spec(model: nn.Module) -> PermutationSpec:
    """Llama-style decoders (``LlamaForCausalLM``): RMSNorm, SwiGLU, grouped k/v heads, rotary positions."""
    cfg = model.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    d = getattr(cfg, "head_dim", None) or D // H
    g, p = H // Hkv, _prefix(model, model.model)
    refs: Dict[str, list] = {"residual": [AxisRef(f"{p}embed_tokens.weight", 1)]}
    groups: Dict[str, PermutationGroup] = {}
    for i in range(cfg.num_hidden_layers):
        b, bias = f"{p}layers.{i}.", bool(getattr(cfg, "attention_bias", False))
        for n in ("q_proj", "k_proj", "v_proj"):
            _merge(refs, _linear(f"{b}self_attn.{n}", None, "residual"))
        _merge(refs, _linear(f"{b}self_attn.o_proj", "residual", None, bias))
        ffn, mbias = f"layers.{i}.mlp", bool(getattr(cfg, "mlp_bias", False))
        _merge(refs, _linear(f"{b}mlp.gate_proj", ffn, "residual", mbias))
        _merge(refs, _linear(f"{b}mlp.up_proj", ffn, "residual", mbias))
        _merge(refs, _linear(f"{b}mlp.down_proj", "residual", ffn, mbias))
        refs["residual"] += [AxisRef(f"{b}input_layernorm.weight", 0), AxisRef(f"{b}post_attention_layernorm.weight", 0)]
        names = [(n, w) for n in ("q_proj", "k_proj", "v_proj") for w in ("weight",) + (("bias",) if bias else ())]
        # a k/v head moves with the g query heads that read it: q rows and o_proj columns in blocks of g*d
        heads = [AxisRef(f"{b}self_attn.{n}.{w}", 0, 0, g * d if n == "q_proj" else d) for n, w in names]
        groups[f"layers.{i}.attn.heads"] = PermutationGroup(Hkv, heads + [AxisRef(f"{b}self_attn.o_proj.weight", 1, 0, g * d)])
        groups[f"layers.{i}.attn.v"] = PermutationGroup(d, [AxisRef(f"{b}self_attn.v_proj.{w}", 0, 0, 1, Hkv)
                                                            for n, w in names if n == "v_proj"] +
                                                        [AxisRef(f"{b}self_attn.o_proj.weight", 1, 0, 1, H)])
    refs["residual"].append(AxisRef(f"{p}norm.weight", 0))
    refs["residual"] += _head_axes(model)
    sizes = {k: D if k == "residual" else cfg.intermediate_size for k in refs}
    return PermutationSpec({**{k: PermutationGroup(sizes[k], v) for k, v in refs.items()}, **groups},
                           reasons=[ROPE_REASON])


HF_SPECS: Dict[str, Callable[[nn.Module], PermutationSpec]] = {
    "gpt2": gpt2_spec,
    "bert": bert_spec,
    "llama": llama_spec,
}


def hf_permutation_spec(model: nn.Module) -> Optional[PermutationSpec]:
    """The spec of a ``transformers`` model (or a wrapper holding one as ``.model``), None for other modules.

    State-dict names are the wrapper's (``model.transformer.h.0...`` for
    :class:`~modeconn.hf.models.LMLogits`); ``fixed`` lists what no group
    covers, ``reasons`` why. A ``transformers`` model of a family without a rule
    raises ValueError naming the families that have one.
    """
    inner = getattr(model, "model", None)
    hf = inner if getattr(inner, "config", None) is not None and hasattr(inner, "get_input_embeddings") else model
    config = getattr(hf, "config", None)
    if config is None or not hasattr(hf, "get_input_embeddings"):
        return None
    rule = HF_SPECS.get(getattr(config, "model_type", None))
    if rule is None:
        raise ValueError(f"no alignment rule for transformers model type {config.model_type!r}; "
                         f"rules exist for {sorted(HF_SPECS)} (or write a PermutationSpec by hand)")
    spec = rule(hf)
    if hf is not model:  # names as the wrapper's state dict has them
        pre = _prefix(model, hf)
        spec = PermutationSpec({k: PermutationGroup(g.size, [a._replace(name=pre + a.name) for a in g.axes])
                                for k, g in spec.groups.items()}, reasons=spec.reasons)
    covered = {a.name for g in spec.groups.values() for a in g.axes}
    spec.fixed = [k for k in model.state_dict() if k not in covered]
    spec.reasons = [VOCAB_REASON] + list(spec.reasons) + (
        [f"left unpermuted: {', '.join(spec.fixed)}"] if spec.fixed else [])
    spec.validate(model.state_dict())
    return spec

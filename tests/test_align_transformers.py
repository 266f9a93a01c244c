"""Spec inference, permutation and matching through attention (issue 11).

Three kinds of transformer, built here directly: PyTorch's ``nn.TransformerEncoder``
(fx leaves), torchvision's ``VisionTransformer`` (traced through, with
``nn.MultiheadAttention`` leaves) and a hand-written GPT (the zoo's ``gpt``
structure, found by pattern).  Every check is against an independent
computation: the permuted copy must compute the original function, and
matching it back must give the original parameters.
"""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from modeconn.alignment import (AxisRef, ObservePoint, PermutationGroup, PermutationSpec, activation_matching,
                                apply_permutation, infer_permutation_spec, weight_matching)
from modeconn.alignment.observe import unit_matrix
from modeconn.alignment.permute import segment_rows
from modeconn.alignment.spec import compatible_refs


# ------------------------------------------------------------------ models
class CausalSelfAttention(nn.Module):
    """The zoo gpt's attention (gpt_arch.md), with variants: SDPA, fused c_attn + split, wrong head order."""

    def __init__(self, dim, heads, seq_len, variant="plain"):
        super().__init__()
        self.heads, self.head_dim, self.seq_len, self.variant = heads, dim // heads, seq_len, variant
        if variant == "fused":
            self.c_attn = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        B, T = x.size(0), self.seq_len  # a buffer cannot be sliced by a traced size: T is the fixed length
        H, d = self.heads, self.head_dim
        if self.variant == "fused":
            q, k, v = self.c_attn(x).split(H * d, dim=2)
            q, k, v = (t.view(B, T, H, d).transpose(1, 2) for t in (q, k, v))
        else:
            q = self.q(x).view(B, T, H, d).transpose(1, 2)
            if self.variant == "wrong":  # heads taken as the minor digit: not the layout the site assumes
                q = self.q(x).view(B, T, d, H).permute(0, 3, 1, 2)
            k = self.k(x).view(B, T, H, d).transpose(1, 2)
            v = self.v(x).view(B, T, H, d).transpose(1, 2)
        if self.variant == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            att = att.masked_fill(~self.mask, float("-inf")).softmax(dim=-1)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, H * d))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp, seq_len, variant):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, seq_len, variant)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=11, seq_len=6, dim=32, depth=2, heads=4, mlp=64, num_classes=5, variant="plain"):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp, seq_len, variant) for _ in range(depth)])
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        h = self.blocks(self.tok(x) + self.pos[:, :self.pos.shape[1]])
        return self.head(self.ln_f(h)[:, -1])


class Encoder(nn.Module):
    """Embedding, 2 TransformerEncoderLayers (batch_first), a head on the mean or the last token."""

    def __init__(self, norm_first=False, pool="mean"):
        super().__init__()
        self.emb, self.pool = nn.Embedding(20, 32), pool
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = self.enc(self.emb(x))
        return self.head(h.mean(1) if self.pool == "mean" else h[:, -1])


def vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def _jitter(model, seed=0):
    """Random perturbation of every parameter (norm scales not all one, class token not zero), float64, eval."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


def _tokens(n, vocab, length, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _attention_groups(prefix):
    return {f"{prefix}.heads", f"{prefix}.qk", f"{prefix}.v"}


ENC_GROUPS = {"emb"} | {f"enc.layers.{i}.linear1" for i in range(2)} | \
    {g for i in range(2) for g in _attention_groups(f"enc.layers.{i}.self_attn")}
VIT_GROUPS = {"conv_proj"} | {f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)} | \
    {g for i in range(2) for g in _attention_groups(f"encoder.layers.encoder_layer_{i}.self_attention")}
GPT_GROUPS = {"tok"} | {f"blocks.{i}.fc1" for i in range(2)} | \
    {g for i in range(2) for g in _attention_groups(f"blocks.{i}.attn")}

CASES = {
    "encoder-post-norm": (lambda: Encoder(False), lambda: _tokens(6, 20, 7), ENC_GROUPS, ["head.bias"]),
    "encoder-pre-norm-last": (lambda: Encoder(True, "last"), lambda: _tokens(6, 20, 7), ENC_GROUPS, ["head.bias"]),
    "vit": (vit, lambda: torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).double(),
            VIT_GROUPS, ["heads.head.bias"]),
    "gpt": (GPT, lambda: _tokens(6, 11, 6), GPT_GROUPS, ["head.bias"]),
    "gpt-sdpa": (lambda: GPT(variant="sdpa"), lambda: _tokens(6, 11, 6), GPT_GROUPS, ["head.bias"]),
    "gpt-fused": (lambda: GPT(variant="fused"), lambda: _tokens(6, 11, 6), GPT_GROUPS, ["head.bias"]),
}


@pytest.fixture(params=list(CASES))
def case(request):
    build, data, groups, fixed = CASES[request.param]
    torch.manual_seed(0)
    model = _jitter(build())
    x = data()
    return model, x, infer_permutation_spec(model, x[:1]), groups, fixed


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------ the three kinds
def test_spec_has_every_transformer_group_and_fixes_only_the_output_bias(case):
    model, _, spec, groups, fixed = case
    assert set(spec.groups) == groups
    assert spec.fixed == fixed  # the head's weight columns move with the stream; its rows are the classes
    assert len(spec.reasons) == 1 and "reach the model output" in spec.reasons[0]
    heads = [g for name, g in spec.groups.items() if name.endswith(".heads")]
    dims = [g for name, g in spec.groups.items() if name.endswith((".qk", ".v"))]
    assert all(g.size * d.size == 32 for g, d in zip(heads, dims[::2]))


@pytest.mark.parametrize("seed", [1, 2])
def test_random_permutation_of_all_groups_keeps_the_function(case, seed):
    model, x, spec, _, _ = case
    perm = spec.random_permutation(seed)
    moved = apply_permutation(model, spec, perm)
    assert not _same_state(moved, model)
    with torch.no_grad():
        assert torch.allclose(moved(x), model(x), atol=1e-5, rtol=0)
        torch.backends.mha.set_fastpath_enabled(False)  # PyTorch's unfused path: the same function
        try:
            assert torch.allclose(moved(x), model(x), atol=1e-5, rtol=0)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)


def test_weight_matching_recovers_the_permutation_exactly(case):
    model, _, spec, _, _ = case
    shuffle = spec.random_permutation(3)
    shuffled = apply_permutation(model, spec, shuffle)
    perm, info = weight_matching(model, shuffled, spec)
    assert info.converged
    assert all(torch.equal(perm[k], torch.argsort(shuffle[k])) for k in spec.groups)
    assert _same_state(apply_permutation(shuffled, spec, perm), model)


def test_stream_group_carries_embeddings_class_token_and_norms():
    model = _jitter(vit())
    spec = infer_permutation_spec(model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    axes = set(spec.groups["conv_proj"].axes)
    assert {AxisRef("class_token", 2), AxisRef("encoder.pos_embedding", 2), AxisRef("encoder.ln.weight", 0),
            AxisRef("heads.head.weight", 1),
            AxisRef("encoder.layers.encoder_layer_1.self_attention.out_proj.weight", 0),
            AxisRef("encoder.layers.encoder_layer_0.self_attention.in_proj_weight", 1)} <= axes
    gpt_spec = infer_permutation_spec(_jitter(GPT()), _tokens(1, 11, 6))
    assert AxisRef("pos", 2) in gpt_spec.groups["tok"].axes and AxisRef("tok.weight", 1) in gpt_spec.groups["tok"].axes
    heads = gpt_spec.groups["blocks.0.attn.heads"].axes
    assert AxisRef("blocks.0.attn.q.weight", 0, 0, 8, 1) in heads and AxisRef("blocks.0.attn.proj.weight", 1, 0, 8) in heads
    assert AxisRef("blocks.0.attn.k.weight", 0, 0, 1, 4) in gpt_spec.groups["blocks.0.attn.qk"].axes


def test_fused_projection_uses_row_offsets():
    spec = infer_permutation_spec(_jitter(GPT(variant="fused")), _tokens(1, 11, 6))
    qk = spec.groups["blocks.1.attn.qk"].axes
    assert AxisRef("blocks.1.attn.c_attn.weight", 0, 0, 1, 4) in qk and AxisRef("blocks.1.attn.c_attn.weight", 0, 32, 1, 4) in qk
    assert AxisRef("blocks.1.attn.c_attn.bias", 0, 64, 1, 4) in spec.groups["blocks.1.attn.v"].axes


# ----------------------------------------------------------- negative cases
class CrossAttention(nn.Module):
    """Queries from token embeddings, keys/values from ``memory``: raw (unpermuted) or through a Linear."""

    def __init__(self, project_memory, **mha):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.mem = nn.Linear(5, 12) if project_memory else None
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, **mha)
        self.head = nn.Linear(16, 3)

    def forward(self, x, memory):
        q = self.emb(x)
        kv = self.mem(memory) if self.mem is not None else memory
        return self.head(q + self.attn(q, kv, kv, need_weights=False)[0])


def _check_equivalent(model, args, spec, seed=1):
    moved = apply_permutation(model, spec, spec.random_permutation(seed))
    with torch.no_grad():
        return torch.allclose(moved(*args), model(*args), atol=1e-5, rtol=0)


def test_cross_attention_with_an_unpermuted_key_stream_leaves_the_query_stream_fixed():
    torch.manual_seed(0)
    model = _jitter(CrossAttention(False))
    args = (_tokens(2, 11, 4), torch.randn(2, 6, 16, dtype=torch.float64))
    spec = infer_permutation_spec(model, args)
    assert set(spec.groups) == _attention_groups("attn")
    assert {"emb.weight", "attn.out_proj.bias", "head.weight"} <= set(spec.fixed)
    why = [r for r in spec.reasons if r.startswith("group 'emb'")]
    assert len(why) == 1 and "cross-attention" in why[0] and "attn.in_proj_weight" in why[0]
    assert _check_equivalent(model, args, spec)


def test_cross_attention_with_separate_projections_permutes_both_streams():
    torch.manual_seed(0)
    model = _jitter(CrossAttention(True, kdim=12, vdim=12, bias=False))
    args = (_tokens(2, 11, 4), torch.randn(2, 6, 5, dtype=torch.float64))
    spec = infer_permutation_spec(model, args)
    assert set(spec.groups) == {"emb", "mem"} | _attention_groups("attn")
    assert {AxisRef("attn.k_proj_weight", 1), AxisRef("attn.v_proj_weight", 1)} <= set(spec.groups["mem"].axes)
    assert AxisRef("attn.q_proj_weight", 1) in spec.groups["emb"].axes
    assert spec.fixed == ["head.bias"]
    assert _check_equivalent(model, args, spec)


def test_bias_k_bias_v_and_zero_attention_move_with_the_heads():
    """The lead's brief fixed these; they are split into heads like the keys/values, so they are permuted."""
    torch.manual_seed(0)
    model = _jitter(CrossAttention(False, add_bias_kv=True, add_zero_attn=True))
    args = (_tokens(2, 11, 4), torch.randn(2, 6, 16, dtype=torch.float64))
    spec = infer_permutation_spec(model, args)
    assert AxisRef("attn.bias_k", 2, 0, 4) in spec.groups["attn.heads"].axes
    assert AxisRef("attn.bias_k", 2, 0, 1, 4) in spec.groups["attn.qk"].axes
    assert AxisRef("attn.bias_v", 2, 0, 1, 4) in spec.groups["attn.v"].axes
    assert _check_equivalent(model, args, spec, seed=4)


def test_heads_in_the_wrong_order_are_dropped_by_the_numerical_check():
    model = _jitter(GPT(variant="wrong"))
    x = _tokens(4, 11, 6)
    spec = infer_permutation_spec(model, x[:1])
    assert set(spec.groups) == {"tok", "blocks.0.fc1", "blocks.1.fc1"}
    assert "blocks.0.attn.q.bias" in spec.fixed and "blocks.1.attn.proj.weight" not in spec.fixed
    why = [r for r in spec.reasons if "blocks.0.attn.heads" in r]
    assert len(why) == 1 and "permuting the heads of attention 'blocks.0.attn'" in why[0]
    assert "blocks.0.attn.q, blocks.0.attn.k, blocks.0.attn.v, blocks.0.attn.proj" in why[0]
    assert _check_equivalent(model, (x,), spec)


def test_a_non_persistent_buffer_on_the_stream_keeps_it_fixed():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 8), nn.Linear(8, 2)
            self.register_buffer("shift", torch.randn(8), persistent=False)

        def forward(self, x):
            return self.head(self.emb(x) + self.shift)

    spec = infer_permutation_spec(WithBuffer(), _tokens(1, 7, 3))
    assert len(spec.groups) == 0 and "emb.weight" in spec.fixed
    assert any("group 'emb'" in r and "varying along the permuted dimension" in r for r in spec.reasons)


def test_a_subclass_with_its_own_forward_is_traced_through():
    class Custom(nn.TransformerEncoderLayer):  # not a torch.nn leaf: fx reads this forward, not the encoder rule
        def forward(self, src, *args, **kwargs):
            return src + self.linear2(F.relu(self.linear1(src)))

    model = _jitter(nn.Sequential(nn.Embedding(5, 16), Custom(16, 2, 8, batch_first=True), nn.Linear(16, 2)))
    x = _tokens(3, 5, 3)
    spec = infer_permutation_spec(model, x[:1])
    assert set(spec.groups) == {"0", "1.linear1"}
    assert not [g for g in spec.groups if "self_attn" in g]  # its attention is never called
    assert any("'1.self_attn.in_proj_weight' is not used" in r for r in spec.reasons)
    assert _check_equivalent(model, (x,), spec)


# ------------------------------------------------------ outer refs, by hand
def test_nested_refs_permute_heads_and_dims_like_a_reshape():
    h, d = 3, 4
    t = torch.randn(h * d, 5, dtype=torch.float64)
    heads, dims = torch.tensor([2, 0, 1]), torch.tensor([1, 3, 0, 2])
    spec = PermutationSpec({"heads": PermutationGroup(h, [AxisRef("w", 0, 0, d)]),
                            "dims": PermutationGroup(d, [AxisRef("w", 0, 0, 1, h)])})
    out = apply_permutation({"w": t}, spec, {"heads": heads, "dims": dims})["w"]
    expected = t.view(h, d, 5)[heads][:, dims].reshape(h * d, 5)
    assert torch.equal(out, expected)
    rows = segment_rows(t, AxisRef("w", 0, 0, 1, h), d)  # unit e gathers its entries in every head
    assert torch.equal(rows, t.view(h, d, 5).transpose(0, 1).reshape(d, h * 5))


def test_compatible_refs_need_disjoint_digits_of_the_same_slice():
    assert compatible_refs(AxisRef("w", 0, 0, 4), 3, AxisRef("w", 0, 0, 1, 3), 4)
    assert compatible_refs(AxisRef("w", 0, 0, 1), 12, AxisRef("w", 0, 12, 1, 3), 4)  # disjoint slices
    assert not compatible_refs(AxisRef("w", 0, 0, 2), 6, AxisRef("w", 0, 0, 1, 3), 4)  # digits overlap
    assert not compatible_refs(AxisRef("w", 0, 0, 4), 3, AxisRef("w", 0, 4, 1), 4)  # slices overlap
    bad = PermutationSpec({"a": PermutationGroup(6, [AxisRef("w", 0, 0, 2)]),
                           "b": PermutationGroup(4, [AxisRef("w", 0, 0, 1, 3)])})
    with pytest.raises(ValueError, match="overlap on 'w' axis 0"):
        bad.validate({"w": torch.zeros(12)})


def test_unit_matrix_with_outer_counts_the_repetitions_as_samples():
    t = torch.randn(2, 3 * 4 * 2)  # [batch, outer=3 x units=4 x inner=2]
    m = unit_matrix(t, ObservePoint("n", 1, 0, 2, 3), 4, "g")
    expected = t.view(2, 3, 4, 2).permute(0, 1, 3, 2).reshape(-1, 4).double()
    assert torch.equal(m, expected)


# ------------------------------------------------------ activation matching
@pytest.mark.parametrize("kind", ["encoder", "vit"])
def test_activation_matching_reads_ffn_and_heads_inside_pytorch_modules(kind):
    """linear1 runs inside a leaf module and the heads inside nn.MultiheadAttention: both are read with
    forward hooks (float32, eval mode: PyTorch's fused path would skip them, hooks turn it off)."""
    torch.manual_seed(0)
    if kind == "encoder":
        model, x, heads = _jitter(Encoder(False)).float(), _tokens(32, 20, 7, seed=1), "enc.layers.{}.self_attn.heads"
        observed = {"emb", "enc.layers.0.linear1", "enc.layers.1.linear1"}
    else:
        model, x = _jitter(vit()).float(), torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        heads = "encoder.layers.encoder_layer_{}.self_attention.heads"
        observed = {"conv_proj", "encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"}
    observed |= {heads.format(i) for i in range(2)}
    spec = infer_permutation_spec(model, x[:1])
    shuffle = spec.random_permutation(5)
    perm, info = activation_matching(model, apply_permutation(model, spec, shuffle), [x], spec)
    assert all(torch.equal(perm[k], torch.argsort(shuffle[k])) for k in observed)
    assert set(info.unobserved) == set(spec.groups) - observed  # the q/k and value dims
    assert all(k.endswith((".qk", ".v")) for k in info.unobserved)


def test_activation_matching_finds_hand_written_heads_by_their_attention_patterns():
    model = _jitter(GPT()).float()
    x = _tokens(32, 11, 6, seed=1)
    spec = infer_permutation_spec(model, x[:1])
    shuffle = spec.random_permutation(6)
    perm, info = activation_matching(model, apply_permutation(model, spec, shuffle), [x], spec)
    observed = {"tok", "blocks.0.fc1", "blocks.1.fc1", "blocks.0.attn.heads", "blocks.1.attn.heads"}
    assert all(torch.equal(perm[k], torch.argsort(shuffle[k])) for k in observed)
    assert set(info.unobserved) == GPT_GROUPS - observed


# ------------------------------------------- a hand-built block, both layouts
class SelfAttentionBlock(nn.Module):
    """RMSNorm, nn.MultiheadAttention (seq-first or batch-first) with a residual, a linear head."""

    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.emb, self.norm = nn.Embedding(9, 12), nn.RMSNorm(12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=batch_first)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        h = self.emb(x if self.batch_first else x.t())
        n = self.norm(h)
        h = h + self.attn(n, n, n)[0]
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_module_in_a_hand_built_block(batch_first):
    model = _jitter(SelfAttentionBlock(batch_first))
    x = _tokens(5, 9, 4)
    spec = infer_permutation_spec(model, x[:1])
    assert list(spec.groups) == ["emb", "attn.heads", "attn.qk", "attn.v"]  # out_proj merged into the stream
    assert {AxisRef("norm.weight", 0), AxisRef("attn.out_proj.weight", 0), AxisRef("attn.in_proj_weight", 1)} \
        <= set(spec.groups["emb"].axes)
    assert spec.fixed == ["head.bias"]
    assert _check_equivalent(model, (x,), spec, seed=2)
    shuffle = spec.random_permutation(7)
    shuffled = apply_permutation(model, spec, shuffle)
    perm, _ = weight_matching(model, shuffled, spec)
    assert _same_state(apply_permutation(shuffled, spec, perm), model)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 4), d=st.integers(1, 5), offset=st.integers(0, 3), seed=st.integers(0, 10 ** 6))
def test_head_and_dim_permutations_commute_and_match_a_reshape(h, d, offset, seed):
    assume(h * d > 1)  # with one entry both refs are the same slice: nothing to permute
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(offset + h * d + 2, 3, generator=gen)
    heads, dims = torch.randperm(h, generator=gen), torch.randperm(d, generator=gen)
    spec = PermutationSpec({"heads": PermutationGroup(h, [AxisRef("w", 0, offset, d), AxisRef("u", 0, 0, d)]),
                            "dims": PermutationGroup(d, [AxisRef("w", 0, offset, 1, h), AxisRef("e", 0)])})
    full = {"u": torch.zeros(h * d), "e": torch.zeros(d)}  # full-length axes: validate reads the sizes there

    def apply(w, perm):
        return apply_permutation({"w": w, **full}, spec, perm)["w"]

    both = apply(t, {"heads": heads, "dims": dims})
    then = apply(apply(t, {"heads": heads}), {"dims": dims})
    other_first = apply(apply(t, {"dims": dims}), {"heads": heads})
    span = t[offset:offset + h * d].view(h, d, 3)[heads][:, dims].reshape(h * d, 3)
    expected = torch.cat([t[:offset], span, t[offset + h * d:]])
    assert torch.equal(both, expected) and torch.equal(then, expected) and torch.equal(other_first, expected)


def test_one_head_opens_no_heads_group():
    model = _jitter(CrossAttention(True, kdim=12, vdim=12))
    model.attn = nn.MultiheadAttention(16, 1, batch_first=True, kdim=12, vdim=12).double()
    args = (_tokens(2, 11, 4), torch.randn(2, 6, 5, dtype=torch.float64))
    spec = infer_permutation_spec(model, args)
    assert set(spec.groups) == {"emb", "mem", "attn.qk", "attn.v"}
    assert spec.groups["attn.qk"].size == 16 and AxisRef("attn.q_proj_weight", 0, 0, 1, 1) in spec.groups["attn.qk"].axes
    assert _check_equivalent(model, args, spec)


def _every_fixed_entry_has_a_reason(spec):
    """Each fixed entry's layer (or the entry itself) is named by some reason."""
    return all(any(f"'{k.rsplit('.', 1)[0]}" in r or f"'{k}'" in r or f" {k.rsplit('.', 1)[0]}" in r
                   for r in spec.reasons) for k in spec.fixed)


def test_attention_whose_projections_cannot_be_traced_is_explained():
    class Squashed(CausalSelfAttention):
        def forward(self, x):
            B, T, H, d = x.size(0), self.seq_len, self.heads, self.head_dim
            q = torch.tanh(self.q(x)).view(B, T, H, d).transpose(1, 2)  # not a plain projection
            k = self.k(x).view(B, T, H, d).transpose(1, 2)
            v = self.v(x).view(B, T, H, d).transpose(1, 2)
            y = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
            return self.proj(y.transpose(1, 2).reshape(B, T, H * d))

    model = _jitter(GPT(depth=1))
    model.blocks[0].attn = Squashed(32, 4, 6).double()
    x = _tokens(3, 11, 6)
    spec = infer_permutation_spec(model, x[:1])
    assert set(spec.groups) == {"tok", "blocks.0.fc1"}  # the output projection's rows are on the stream
    assert any("attention at node" in r and "could not be traced" in r for r in spec.reasons)
    assert "blocks.0.attn.q.bias" in spec.fixed and _every_fixed_entry_has_a_reason(spec)
    assert _check_equivalent(model, (x,), spec)


def test_fixed_entries_of_negative_cases_all_have_reasons():
    cross = _jitter(CrossAttention(False))
    spec = infer_permutation_spec(cross, (_tokens(1, 11, 4), torch.randn(1, 6, 16, dtype=torch.float64)))
    assert len(spec.fixed) == 4 and _every_fixed_entry_has_a_reason(spec)
    wrong = infer_permutation_spec(_jitter(GPT(variant="wrong")), _tokens(1, 11, 6))
    assert len(wrong.fixed) == 7 and _every_fixed_entry_has_a_reason(wrong)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_models_on_a_shuffled_gpt(method):
    """End to end: the spec is inferred from the first batch; the report lists the unobserved groups."""
    from modeconn.alignment import align_models
    a = _jitter(GPT()).float()
    spec = infer_permutation_spec(a, _tokens(1, 11, 6))
    shuffle = {k: v for k, v in spec.random_permutation(8).items() if method == "weight" or k.endswith(
        ("tok", "fc1", ".heads"))}  # activation matching leaves the q/k and value dims alone
    b = apply_permutation(a, spec, shuffle)
    loader = [(_tokens(32, 11, 6, seed=2), torch.zeros(32, dtype=torch.long))]
    aligned, perm, report = align_models(a, b, method=method, loader=loader)
    assert _same_state(aligned, a)
    assert report.mean_after > report.mean_before

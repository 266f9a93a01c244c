"""Hugging Face language models: model directories as endpoints, text data, alignment rules, commands.

Every model is tiny and built from a config (GPT-2 2 layers x 4 heads x width 64, a 2-layer BERT,
a 2-layer Llama with grouped k/v heads); nothing is downloaded.
"""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # the hf extra is part of .[test]

from modeconn import align as align_cmd  # noqa: E402
from modeconn import eval_curve as eval_cmd  # noqa: E402
from modeconn.alignment import apply_permutation, infer_permutation_spec, weight_matching  # noqa: E402
from modeconn.core.curve_model import CurveModel, linear_path  # noqa: E402
from modeconn.core.curves import Bezier  # noqa: E402
from modeconn.data import get_dataset  # noqa: E402
from modeconn.evaluation.model import evaluate  # noqa: E402
from modeconn.hf.models import LMLogits, architecture, build_model_of, load_model_dir, save_model_dir  # noqa: E402

VOCAB, CTX = 97, 32


def _gpt2(vocab=VOCAB):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=vocab, n_positions=CTX, bos_token_id=0, eos_token_id=0))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
        max_position_embeddings=CTX))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=CTX, bos_token_id=0, eos_token_id=0, pad_token_id=0))


FAMILIES = {"gpt2": _gpt2, "bert": _bert, "llama": _llama}


def _net(family: str, seed: int, **kwargs) -> LMLogits:
    """A tiny model with weights spread well beyond the initialisation (so every unit is distinct)."""
    torch.manual_seed(seed)
    model = FAMILIES[family](**kwargs)
    model.config._attn_implementation = "eager"
    net = LMLogits(model).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _write_dir(path, family="gpt2", seed=0, dtype=None, vocab=256):
    """A GPT-2 directory; a vocabulary of 256 reads byte-level text."""
    model = _net(family, seed, vocab=vocab).model
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Text from the standard library's own sources (every Python has them)."""
    import json.decoder as source

    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(open(source.__file__, encoding="utf-8").read()[:6000])
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_random_permutation_of_every_group_keeps_the_logits_and_weight_matching_recovers_it(family):
    net = _net(family, 0)
    spec = infer_permutation_spec(net, None)
    perm = spec.random_permutation(seed=3)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perm.values() if len(p) > 2)
    shuffled = apply_permutation(net, spec, perm).eval()
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert (shuffled(x) - net(x)).abs().max() < 1e-5
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in shuffled.state_dict().items())
    # coordinate descent can stall from the identity for some visiting orders: keep the best of 4 seeds
    runs = [weight_matching(net, shuffled, spec, seed=s) for s in range(4)]
    found = max(runs, key=lambda r: r[1].objectives[-1])[0]
    back = apply_permutation(shuffled, spec, found).state_dict()
    for k, v in net.state_dict().items():
        assert torch.allclose(back[k], v, atol=1e-6), k


def test_gpt2_groups_cover_conv1d_columns_and_packed_qkv():
    net = _net("gpt2", 0)
    spec = infer_permutation_spec(net, None)
    heads = spec.groups["h.0.attn.heads"]
    packed = sorted(a.offset for a in heads.axes if a.name.endswith("c_attn.weight"))
    assert heads.size == 4 and packed == [0, 64, 128]
    assert all(a.axis == 1 for a in heads.axes if a.name.endswith("c_attn.weight"))  # Conv1D: [in, out]
    assert spec.fixed == []  # the tied head reads the embedding: no weight of its own


def test_llama_keeps_rope_dims_fixed_with_a_reason():
    spec = infer_permutation_spec(_net("llama", 0), None)
    assert not any(g.endswith(".qk") for g in spec.groups)
    assert any("rotary" in r for r in spec.reasons)
    assert spec.groups["layers.0.attn.heads"].size == 2  # the k/v heads, each with its 2 query heads


def test_model_directory_round_trip_keeps_logits_and_the_stored_dtype(tmp_path):
    src = _write_dir(tmp_path / "a", dtype=torch.bfloat16)
    net, meta = load_model_dir(src)
    assert meta["hf_dtype"] == "bfloat16" and all(p.dtype == torch.float32 for p in net.parameters())
    assert meta["arch"] == "hf:gpt2" and "model.lm_head.weight" not in meta["state_dict"]
    out = save_model_dir(net, meta, tmp_path / "copy")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True).eval()
    assert back.dtype == torch.bfloat16
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)


def test_curve_ends_equal_the_endpoints_and_the_tied_head_follows_the_point():
    a, b = _net("gpt2", 0), _net("gpt2", 1)
    curve = CurveModel(build_model_of(architecture(a.model.config)), a, b, Bezier(3)).eval()  # no dropout
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert (curve(x, t=0.0) - a(x)).abs().max() < 1e-5
        assert (curve(x, t=1.0) - b(x)).abs().max() < 1e-5
        mid = curve.weights_at(0.5)
        emb = mid["model.transformer.wte.weight"]
        hidden = a.model.transformer  # the logits at t are the hidden states at t times the embedding at t
        ref = torch.func.functional_call(hidden, {k[len("model.transformer."):]: v for k, v in mid.items()
                                                  if k.startswith("model.transformer.")}, (x,))[0] @ emb.T
        assert (curve(x, t=0.5) - ref).abs().max() < 1e-4


def test_text_blocks_predict_the_next_byte_and_the_loss_is_per_token(text_file):
    ds = get_dataset(f"text:{text_file}", block_size=16)
    assert ds.vocab_size == 256 and ds.input_shape == (16,)
    assert torch.equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    assert torch.equal(ds.x_train[1:, 0], ds.y_train[:-1, -1])  # stride 16: each block starts where one ends
    torch.manual_seed(0)
    net = LMLogits(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=256, n_positions=16))).eval()
    r = evaluate(net, ds.eval_loader("test", batch_size=7))
    with torch.no_grad():
        logits = net(ds.x_test).double()
    ref = F.cross_entropy(logits.reshape(-1, 256), ds.y_test.reshape(-1))
    assert r["n"] == ds.y_test.numel() and r["loss"] == pytest.approx(float(ref), rel=1e-9)
    assert r["acc"] == pytest.approx(float((logits.argmax(-1) == ds.y_test).double().mean()))


def test_too_little_text_is_refused_with_the_sizes(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("abc")
    with pytest.raises(ValueError, match="3 tokens make 0 blocks of 64"):
        get_dataset(f"text:{f}")


def test_align_and_eval_curve_on_model_directories(tmp_path, text_file, capsys):
    a, b = _write_dir(tmp_path / "a", seed=0), _write_dir(tmp_path / "b", seed=1)
    out = tmp_path / "b_aligned"
    assert align_cmd.main(["--a", str(a), "--b", str(b), "--dataset", f"text:{text_file}", "--block-size", "16",
                           "--num-points", "3", "--out", str(out), "--no-progress"]) == 0
    aligned = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(str(b), local_files_only=True).eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (aligned(x).logits - original(x).logits).abs().max() < 1e-4  # same function, units permuted
    assert not torch.equal(aligned.transformer.h[0].mlp.c_fc.weight, original.transformer.h[0].mlp.c_fc.weight)
    report = json.loads((out / "modeconn.json").read_text())["alignment"]
    assert report["report"]["mean_after"] > report["report"]["mean_before"]
    capsys.readouterr()
    assert eval_cmd.main(["--a", str(a), "--b", str(out), "--num-points", "3", "--dataset", f"text:{text_file}",
                          "--block-size", "16", "--out", str(tmp_path / "ev"), "--no-progress",
                          "--save-points", "0.5"]) == 0
    assert "test perplexity along the linear" in capsys.readouterr().out
    path = json.loads((tmp_path / "ev" / "path.json").read_text())
    net_a, _ = load_model_dir(a)
    ds = get_dataset(f"text:{text_file}", block_size=16)
    end = evaluate(net_a, ds.eval_loader("test", 64))["nll"]
    assert path["test_perplexity"][0] == pytest.approx(math.exp(end), rel=1e-6)
    mid = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ev" / "point_0.500"),
                                                            local_files_only=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(a), local_files_only=True)
    for name, w in mid.state_dict().items():  # the midpoint of the line: the mean of A and aligned B
        assert torch.allclose(w, (ref.state_dict()[name] + aligned.state_dict()[name]) / 2, atol=1e-6), name


def test_a_text_with_more_token_ids_than_the_model_has_is_refused(tmp_path, text_file, capsys):
    a = _write_dir(tmp_path / "a", vocab=VOCAB)
    assert eval_cmd.main(["--a", str(a), "--b", str(a), "--dataset", f"text:{text_file}", "--no-progress"]) == 2
    assert "vocabulary of 97" in capsys.readouterr().err


def test_without_transformers_one_line_names_the_extra(tmp_path, text_file, monkeypatch, capsys):
    a = _write_dir(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    code = eval_cmd.main(["--a", str(a), "--b", str(a), "--dataset", f"text:{text_file}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install modeconn[hf]" in err


def test_safetensors_checkpoints_hold_models_and_curves_without_pickle(tmp_path, mlp_pair):
    from modeconn.runtime.checkpoints import CheckpointError, load_checkpoint, load_model, load_state_dict, save_model
    from modeconn.core.curve_model import load_curve, save_curve

    a, b = mlp_pair
    path = save_model(tmp_path / "a.safetensors", a, "mlp", {"width": a.layers[0].out_features}, (1, 8, 8), 10,
                      dataset="digits", seed=0, metrics={"acc": 0.9})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a zip/pickle file
    model, meta = load_model(path)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), a(x)) and meta["metrics"] == {"acc": 0.9}
    curve = linear_path(a, b)
    cpath = save_curve(tmp_path / "c.safetensors", curve, {**{k: meta[k] for k in ("arch", "arch_kwargs",
                                                                                   "num_classes")},
                                                        "input_shape": [1, 8, 8]}, dataset="digits")
    back, _ = load_curve(cpath)
    assert torch.equal(back(x, t=0.3), curve(x, t=0.3))
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(plain))
    assert sorted(load_state_dict(plain)) == sorted(a.state_dict())
    with pytest.raises(CheckpointError, match="not a modeconn checkpoint"):
        load_checkpoint(plain)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_a_curve_point_written_as_a_directory_loads_with_from_pretrained(tmp_path):
    a, b = _net("gpt2", 0), _net("gpt2", 1)
    meta = {"arch_kwargs": {"config": architecture(a.model.config)}, "hf_dtype": "float32"}
    curve = CurveModel(build_model_of(meta["arch_kwargs"]["config"]), a, b, Bezier(3)).eval()
    out = save_model_dir(curve.weights_at(0.3), meta, tmp_path / "point")
    point = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert (point(x).logits - curve(x, t=0.3)).abs().max() < 1e-5


def test_ensembles_of_language_models_count_tokens(text_file):
    from modeconn.evaluation.ensembles import evaluate_ensemble

    ds = get_dataset(f"text:{text_file}", block_size=16)
    nets = [_net("gpt2", s, vocab=256) for s in (0, 1)]
    loader = ds.eval_loader("test", 32)
    res = evaluate_ensemble(nets, loader)
    assert res.n == ds.y_test.numel()
    assert res.member_nll[1] == pytest.approx(evaluate(nets[1], loader)["nll"], rel=1e-9)
    with torch.no_grad():
        p = torch.stack([F.softmax(n(ds.x_test).double(), -1) for n in nets]).mean(0)
    assert res.nll[-1] == pytest.approx(float(-p.log().gather(-1, ds.y_test[..., None]).mean()), rel=1e-9)


def test_text_is_tokenised_with_the_tokenizer_of_the_endpoints_directory(tmp_path, text_file):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from modeconn.hf.text import text_kwargs

    text = text_file.read_text()
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    d = tmp_path / "lm"
    _write_dir(d, vocab=len(fast))
    fast.save_pretrained(str(d))
    _, meta = load_model_dir(d)
    ds = get_dataset(f"text:{text_file}", block_size=16, **text_kwargs({}, meta))
    ids = fast(text)["input_ids"]
    assert ds.vocab_size == len(fast) and ds.info["tokenizer"] == str(d.resolve())
    assert ds.x_train[0].tolist() == ids[:16] and ds.y_train[0].tolist() == ids[1:17]


def test_fge_from_a_model_directory_writes_each_snapshot_as_a_directory(tmp_path, text_file):
    from modeconn import fge as fge_cmd
    from modeconn.runtime.checkpoints import load_model

    a = _write_dir(tmp_path / "a")
    out = tmp_path / "fge"
    assert fge_cmd.main(["--ckpt", str(a), "--cycles", "2", "--cycle-epochs", "1", "--dataset", f"text:{text_file}",
                         "--block-size", "16", "--out", str(out), "--no-progress"]) == 0
    for i in range(2):
        snap, _ = load_model(out / "snapshots" / f"snap_{i:02d}.pt")
        d = transformers.AutoModelForCausalLM.from_pretrained(str(out / "snapshots" / f"snap_{i:02d}"),
                                                              local_files_only=True).eval()
        x = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            assert (d(x).logits - snap.eval()(x)).abs().max() < 1e-5


def test_encoders_get_masked_lm_data_and_a_loss_over_the_hidden_tokens_only(tmp_path, text_file, capsys):
    from modeconn.hf.text import IGNORE

    ds = get_dataset(f"text:{text_file}", block_size=16, mlm=True)
    hidden = ds.x_train == 256
    assert ds.vocab_size == 257 and bool((hidden == (ds.y_train != IGNORE)).all())
    assert 0.08 < hidden.double().mean() < 0.25  # 15% hidden (at least one per block)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128, vocab_size=260,
        max_position_embeddings=CTX))
    net = LMLogits(model).eval()
    r = evaluate(net, ds.eval_loader("test", batch_size=8))
    with torch.no_grad():
        logits = net(ds.x_test).double()
    ref = F.cross_entropy(logits.reshape(-1, 260), ds.y_test.reshape(-1))  # ignore_index=-100
    assert r["n"] == int((ds.y_test != IGNORE).sum()) and r["loss"] == pytest.approx(float(ref), rel=1e-9)
    model.save_pretrained(str(tmp_path / "bert"))  # the command sees an encoder: masked-LM data
    assert eval_cmd.main(["--a", str(tmp_path / "bert"), "--b", str(tmp_path / "bert"), "--num-points", "2",
                          "--dataset", f"text:{text_file}", "--block-size", "16", "--out", str(tmp_path / "ev"),
                          "--no-progress"]) == 0
    path = json.loads((tmp_path / "ev" / "path.json").read_text())
    assert path["test_nll"][0] == pytest.approx(float(ref), rel=1e-6)

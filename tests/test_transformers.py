"""Transformers: the zoo's ``gpt`` and ``vit``, the ``majority`` sequence data, PyTorch's attention fast path.

* the zoo contract (forward shape, fx trace equal to eager, no in-place ops, fixed names) for both;
* a curve at t=0/1 is its endpoints for gpt, vit and an ``nn.TransformerEncoder`` model;
* ``evaluate_path`` on their lines equals a float64 point-by-point eager reference, and on the
  ``nn.TransformerEncoder`` (whose CPU attention kernels have no vmap batching rule) it warns nothing;
* the sequence dataset: deterministic per seed, different across seeds, labels by an independent count;
* the commands: train (gpt on majority, vit on digits), then eval_curve, train_curve, fge, plane and
  landscape on the checkpoints; clear errors when model and data do not fit.
"""
import collections
import copy
import json
import operator
import warnings

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import modeconn as mc
from modeconn import eval_curve, fge, landscape, plane, train, train_curve
from modeconn.evaluation import stacked
from modeconn.evaluation.model import eval_mode

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, VOCAB, CLASSES = 6, 5, 3


class Encoder(nn.Module):
    """What a new user brings: embedding, two ``nn.TransformerEncoderLayer`` (batch_first), a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.head(self.enc(self.emb(x))[:, -1])


def _model(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt":
        return mc.create_model("gpt", (SEQ,), CLASSES, vocab=VOCAB, dim=16, mlp=24)
    if kind == "vit":
        net = mc.create_model("vit", (1, 8, 8), CLASSES, hidden=16, mlp=24)
        with torch.no_grad():  # torchvision zeroes the head: outputs that depend on the weights
            net.heads.head.weight.normal_()
        return net
    return Encoder()


def _inputs(kind: str, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) if kind == "vit" else torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


class _Ops(TorchDispatchMode):
    """Records the name of every aten op that runs, and of those that write into an input."""

    def __init__(self):
        super().__init__()
        self.ops, self.mutating = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__.split(".")[0])
        if func._schema.is_mutable:
            self.mutating.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_zoo_contract(kind):
    model = _model(kind, 0).eval()
    x, _ = _inputs(kind, 4)
    with torch.no_grad(), eval_mode(model):
        out = model(x)
        with _Ops() as rec:
            model(x)
        gm = torch.fx.symbolic_trace(model)
        traced = gm(x)
    assert out.shape == (4, CLASSES) and torch.isfinite(out).all()
    assert rec.mutating == []
    assert torch.equal(traced, out)
    assert not [n for n in gm.graph.nodes if n.op == "call_function"
                and (n.target in (operator.iadd, operator.imul) or n.target.__name__.endswith("_"))]
    assert sorted(k for k, _ in gm.named_parameters()) == sorted(k for k, _ in model.named_parameters())
    assert list(model.state_dict()) == list(_model(kind, 1).state_dict())


def test_zoo_shapes_and_errors():
    gpt = mc.create_model("gpt", (16,), 8, vocab=8)
    assert (gpt.tok.num_embeddings, gpt.pos.shape, len(gpt.blocks), gpt.blocks[0].attn.heads) == (8, (1, 16, 32), 2, 2)
    vit = mc.create_model("vit", (1, 8, 8), 10)
    assert vit.conv_proj.in_channels == 1 and vit.seq_length == 16 + 1 and vit.hidden_dim == 32
    for bad, match in [(lambda: mc.create_model("gpt", (1, 8, 8), 10, vocab=8), "seq_len"),
                       (lambda: mc.create_model("gpt", (16,), 10), "vocab"),
                       (lambda: mc.create_model("gpt", (16,), 10, vocab=8, dim=30, heads=4), "divisible"),
                       (lambda: mc.create_model("vit", (16,), 10), "input_shape"),
                       (lambda: mc.create_model("vit", (1, 8, 6), 10), "square"),
                       (lambda: mc.create_model("vit", (1, 9, 9), 10), "divisible")]:
        with pytest.raises(ValueError, match=match):
            bad()


@pytest.mark.parametrize("kind", ["gpt", "vit", "encoder"])
def test_curve_ends_are_the_endpoints(kind):
    a, b = _model(kind, 1).eval(), _model(kind, 2).eval()
    curve = mc.CurveModel(_model(kind, 3), a, b, curve=mc.Bezier(3)).eval()
    x, _ = _inputs(kind, 5)
    for t, end in ((0.0, a), (1.0, b)):
        weights = curve.weights_at(t)
        assert all(torch.equal(weights[n], p) for n, p in end.named_parameters())
        with torch.no_grad(), eval_mode(end):
            assert torch.equal(curve(x, t), end(x))
            assert torch.equal(curve.point(t).eval()(x), end(x))


def _reference_path(a, b, ts, loaders):
    """(test NLL, test acc, train NLL) at each t: θ(t) = (1-t)θa + tθb in float64, one eager model per point."""
    sa, sb = a.state_dict(), b.state_dict()
    out = []
    for t in ts:
        net = copy.deepcopy(a).double().eval()
        net.load_state_dict({k: (1 - t) * sa[k].double() + t * sb[k].double() if sa[k].is_floating_point()
                             else sa[k] for k in sa})
        row = []
        for loader in loaders:
            with torch.no_grad():
                logits = torch.cat([net(x.double() if x.is_floating_point() else x) for x, _ in loader])
            y = torch.cat([y for _, y in loader])
            row += [float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())]
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("kind", ["gpt", "vit", "encoder"])
def test_evaluate_path_equals_the_point_by_point_reference_and_warns_nothing(kind):
    a, b = _model(kind, 1), _model(kind, 2)
    train_data, test_data = mc.TensorLoader(*_inputs(kind, 40, 1), 16), mc.TensorLoader(*_inputs(kind, 24, 2), 10)
    ts = [0.0, 0.3, 0.5, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop ... batching rule" (nor anything else)
        res = mc.evaluate_path(mc.linear_path(a, b), train_data, test_data, ts=ts, points_per_pass=4)
    ref = _reference_path(a, b, ts, (train_data, test_data))
    np.testing.assert_allclose(res.train_nll, ref[:, 0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(res.test_nll, ref[:, 2], rtol=0, atol=2e-5)
    np.testing.assert_allclose(res.test_acc, ref[:, 3], rtol=0, atol=1e-12)
    assert res.test_nll[1] != pytest.approx(res.test_nll[0], abs=1e-3)  # the points really differ
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the evaluation


def test_eval_mode_keeps_attention_off_the_fused_fast_path():
    """Eval mode without grad: PyTorch fuses the encoder layer and the attention (kernels vmap cannot
    batch, rounded differently); inside modeconn's eval_mode the unfused function runs."""
    net, vit = Encoder().eval(), _model("vit", 0).eval()
    fused = {"_transformer_encoder_layer_fwd", "_native_multi_head_attention"}
    x, _ = _inputs("encoder", 3)
    xi, _ = _inputs("vit", 3)
    with torch.no_grad(), _Ops() as plain:
        net(x), vit(xi)
    with torch.no_grad(), eval_mode(net, vit), _Ops() as ours:
        net(x), vit(xi)
    assert fused <= plain.ops and not fused & ours.ops
    assert torch.backends.mha.get_fastpath_enabled()


def test_ops_without_a_batching_rule_switch_to_one_point_at_a_time():
    """PyTorch's CPU attention kernel has no vmap batching rule: the first vmap call marks the
    template (its result is still right), later calls loop over the points."""
    net = Encoder().eval()
    params = {n: torch.stack([p.detach(), p.detach() + 0.01]) for n, p in net.named_parameters()}
    x, _ = _inputs("encoder", 3)
    fwd = stacked.batched_forward(net, vectorize=True)
    assert stacked.vectorize_by_default(net, "cpu")
    with warnings.catch_warnings(), torch.no_grad(), eval_mode(net):
        warnings.simplefilter("error")
        first, second = fwd(params, {}, x), fwd(params, {}, x)
        each = torch.stack([torch.func.functional_call(net, {n: v[k] for n, v in params.items()}, (x,))
                            for k in range(2)])
    assert not stacked.vectorize_by_default(net, "cpu")
    torch.testing.assert_close(first, each, rtol=0, atol=1e-5)
    assert torch.equal(second, each)  # the loop: the very same calls


def test_majority_is_seeded_and_labelled_by_the_most_frequent_token():
    a, a2, b = (mc.get_dataset("majority", seed=s) for s in (1, 1, 2))
    assert a.x_train.dtype == torch.long and a.x_train.shape == (4000, 16) and a.x_test.shape == (1000, 16)
    assert (a.vocab_size, a.num_classes, a.input_shape) == (8, 8, (16,))
    assert all(torch.equal(getattr(a, f), getattr(a2, f)) for f in ("x_train", "y_train", "x_test", "y_test"))
    assert not torch.equal(a.x_train, b.x_train)
    for x, y in zip(a.x_test[:200].tolist(), a.y_test[:200].tolist()):
        (top, n1), (_, n2) = collections.Counter(x).most_common(2)
        assert top == y and n1 > n2  # a unique most frequent token
    assert len(set(a.y_train.tolist())) == 8
    xb, yb = next(iter(a.train_loader(batch_size=32)))
    assert xb.dtype == torch.long and yb.shape == (32,)


def _run(module, argv, capsys):
    status = module.main([str(a) for a in argv] + ["--no-progress", "--device", "cpu"])
    out = capsys.readouterr()
    assert status == 0, out.err
    return out.out


@pytest.mark.parametrize("kind", ["gpt", "vit"])
def test_commands_on_transformer_checkpoints(kind, tmp_path, capsys):
    data = ["--dataset", "majority", "--model", "gpt"] if kind == "gpt" else ["--dataset", "digits", "--model", "vit"]
    ends = []
    for seed in (1, 2):
        _run(train, [*data, "--epochs", "1", "--seed", seed, "--out", tmp_path / f"m{seed}"], capsys)
        ends.append(tmp_path / f"m{seed}" / "model.pt")
    model, meta = mc.load_model(ends[0])
    if kind == "gpt":  # the vocabulary came from the data; other data are refused by the later commands
        assert meta["arch_kwargs"] == {"vocab": 8} and model.tok.num_embeddings == 8
        assert eval_curve.main(["--a", str(ends[0]), "--b", str(ends[1]), "--dataset", "digits",
                                "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
        assert "expects (16,)" in capsys.readouterr().err
    _run(train_curve, ["--a", ends[0], "--b", ends[1], "--epochs", 1, "--out", tmp_path / "curve"], capsys)
    curve = tmp_path / "curve" / "curve.pt"
    _run(eval_curve, ["--ckpt", curve, "--with-linear", "--num-points", 3, "--out", tmp_path / "ev"], capsys)
    path = json.loads((tmp_path / "ev" / "path.json").read_text())
    for res in (path, path["linear"]):  # t=0 is the first endpoint, as train measured it
        assert res["test_acc"][0] == pytest.approx(meta["metrics"]["test_acc"], abs=1e-9)
    _run(fge, ["--ckpt", ends[0], "--cycles", 1, "--cycle-epochs", 1, "--out", tmp_path / "fge"], capsys)
    _run(plane, ["--ckpt", curve, "--grid", 2, "--out", tmp_path / "plane"], capsys)
    _run(landscape, ["--ckpt", ends[0], "--dims", 1, "--steps", 3, "--out", tmp_path / "land"], capsys)
    for f in ("ev/path.json", "fge/fge.json", "plane/plane.json", "land/landscape.json"):
        assert (tmp_path / f).is_file(), f


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "digits", "--model", "gpt"], "reads token ids"),
    (["--dataset", "majority", "--model", "vit"], "holds token ids"),
    (["--dataset", "majority", "--model", "gpt", "--model-kwargs", "vocab=5"], "need vocab >= 8"),
])
def test_model_and_data_that_do_not_fit_are_refused(argv, message, tmp_path, capsys):
    assert train.main([*argv, "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_hessian_products_through_attention():
    """Forward-over-reverse products through nn.MultiheadAttention (whose CPU kernel has neither a
    forward-mode nor a second derivative) equal central differences of the gradient in float64
    (eager kernels), for one vector and a vmapped batch of them."""
    from modeconn.geometry.hessian_operator import HessianOperator

    net = Encoder().double()
    x, y = _inputs("encoder", 8)
    op = HessianOperator(net, None, [(x, y)], dtype=torch.float64)
    vs = torch.randn(2, op.num_params, dtype=torch.float64)

    def gradient(flat):
        params = {n: p.detach().requires_grad_() for n, p in op.unflatten(flat).items()}
        with eval_mode(net):
            loss = nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])
    eps = 1e-5
    want = torch.stack([(gradient(op.theta + eps * v) - gradient(op.theta - eps * v)) / (2 * eps) for v in vs])
    torch.testing.assert_close(op.matvec(vs[0]), want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(op.matmat(vs), want, rtol=1e-5, atol=1e-7)

"""The HessianOperator's contract: losses by name, batch sizes, dtypes, fixed inputs, modes, BatchNorm,
``matmat`` chunks, ``loss_and_grad`` and the scipy operator.

Every product is checked against a dense float64 Hessian from ``torch.autograd.functional.hessian``
of the sample-weighted mean loss written out by hand (``dense_hessian``).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modeconn.geometry.hessian_operator import HessianOperator, _affine_batch_norm, hessian_vector_product
from modeconn.runtime import Hooks
from tests.test_hessian_reuse import CountingBatches

F64 = torch.float64


def dense_hessian(model, loss_fn, batches, counts, names=None, overrides=None):
    """Dense Hessian of ``Σ c_b loss_fn(model(x_b), y_b) / Σ c_b`` w.r.t. the named parameters (float64 model)."""
    params = dict(model.named_parameters())
    names = list(names or params)
    shapes, numels = [params[n].shape for n in names], [params[n].numel() for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names]).double()

    def loss(flat):
        p = {n: c.view(s) for n, c, s in zip(names, flat.split(numels), shapes)}
        total = sum(c * loss_fn(functional_call(model, {**(overrides or {}), **p}, (x,)), y)
                    for (x, y), c in zip(batches, counts))
        return total / sum(counts)

    return torch.autograd.functional.hessian(loss, theta)


def mlp(out=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, out)).double().eval()


# ------------------------------------------------------------------------ losses
def test_losses_by_name_cross_entropy_and_mse():
    model, g = mlp(), torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, generator=g, dtype=F64), torch.randint(0, 4, (10,), generator=g)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=F64)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])
    torch.testing.assert_close(HessianOperator(model, "cross_entropy", [(x, y)]).matvec(v), H @ v)
    # 'mse' is F.mse_loss (no 1/2) against targets reshaped to the output, here [n] -> [n, 1]
    reg = mlp(out=1)
    yr = torch.randn(10, generator=g, dtype=F64)
    H = dense_hessian(reg, lambda out, t: F.mse_loss(out, t.reshape(out.shape)), [(x, yr)], [1])
    w = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(reg, "mse", [(x, yr)]).matvec(w), H @ w)
    torch.testing.assert_close(hessian_vector_product(reg, "mse", [(x, yr)], w, mode="reverse"), H @ w)
    with pytest.raises(ValueError, match="unknown loss_fn"):
        HessianOperator(reg, "MSE", [(x, yr)])


def test_mse_products_in_forward_mode():
    # forward mode is the default of a single product and of loaders; F.mse_loss has no working jvp of its grad
    reg, g = mlp(out=1), torch.Generator().manual_seed(20)
    x, y = torch.randn(9, 3, generator=g, dtype=F64), torch.randn(9, generator=g, dtype=F64)
    H = dense_hessian(reg, lambda out, t: (out.squeeze(-1) - t).pow(2).mean(), [(x[:4], y[:4]), (x[4:], y[4:])], [4, 5])
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(hessian_vector_product(reg, "mse", [(x, y)], v), H @ v)
    op = HessianOperator(reg, "mse", CountingBatches([(x[:4], y[:4]), (x[4:], y[4:])]))
    assert op.mode == "forward"
    torch.testing.assert_close(op.matmat(torch.stack([v, 2 * v])), torch.stack([H @ v, 2 * H @ v]))


class ToFloat32(nn.Module):
    def forward(self, t):
        return t.float()


def test_mse_targets_take_the_output_dtype():
    # a float32 head (as HF models upcast logits) in a float64 operator: the loss is float32, like its output
    model = nn.Sequential(mlp(out=1), nn.Flatten(0)).eval()
    head = nn.Sequential(model, ToFloat32())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    loss, _ = HessianOperator(head, "mse", [(x, y)]).loss_and_grad()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(F.mse_loss(model(x).float(), y.float()).item(), rel=1e-6)


# ------------------------------------------------------------------- batch sizes
class SeqFirst(nn.Module):
    """x is [T, n, d] (sequence first): the samples are y's leading size n, not x's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(torch.tanh(x).mean(0))


def test_samples_are_the_leading_size_of_y_not_x():
    torch.manual_seed(3)
    model = SeqFirst().double()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, n, 3, generator=g, dtype=F64), torch.randint(0, 4, (n,), generator=g)) for n in (2, 5)]
    H = dense_hessian(model, F.cross_entropy, batches, [2, 5])
    by_x = dense_hessian(model, F.cross_entropy, batches, [4, 4])
    assert (H - by_x).abs().max() > 1e-3, "the weights must matter for this test"
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, F.cross_entropy, batches).matvec(v), H @ v)


class Scalars(nn.Module):
    """x is [n] (one scalar per sample)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x):
        return self.net(x.unsqueeze(-1)).squeeze(-1)


def test_a_scalar_target_counts_the_leading_size_of_x():
    torch.manual_seed(4)
    model = Scalars().double()
    g = torch.Generator().manual_seed(4)

    def loss(out, y):                          # one target for the whole batch
        return (out - y).pow(2).mean()

    batches = [(torch.randn(n, generator=g, dtype=F64), torch.tensor(t, dtype=F64)) for n, t in ((3, 0.5), (6, -1.0))]
    H = dense_hessian(model, loss, batches, [3, 6])
    assert (H - dense_hessian(model, loss, batches, [1, 1])).abs().max() > 1e-3
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, loss, batches).matvec(v), H @ v)


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x):
        return torch.tanh(self.lin(x["a"])).squeeze(-1)


class ScalarInput(nn.Module):
    """x is one 0-dim tensor; the model answers three fixed queries scaled by it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("queries", torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]]))

    def forward(self, x):
        return torch.tanh(self.lin(self.queries * x)).squeeze(-1)


def list_loss(out, y):
    return (out - torch.tensor(y, dtype=out.dtype)).pow(2).mean()


def test_non_tensor_batches_count_len_of_y():
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    model = DictInput().double()
    batches = [({"a": torch.randn(n, 2, generator=g, dtype=F64)}, torch.randn(n, generator=g).tolist()) for n in (2, 5)]
    H = dense_hessian(model, list_loss, batches, [2, 5])
    assert (H - dense_hessian(model, list_loss, batches, [1, 1])).abs().max() > 1e-4
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, list_loss, batches).matvec(v), H @ v)
    model = ScalarInput().double()
    batches = [(torch.tensor(1.5, dtype=F64), [0.3, -0.2, 0.9])]
    H = dense_hessian(model, list_loss, batches, [3])
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, list_loss, batches).matvec(v), H @ v)


# ---------------------------------------------------------- parameters and dtypes
def test_param_names_as_one_string_or_a_list():
    model, g = mlp(), torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 4, (8,), generator=g)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])          # order: 0.weight 0.bias 2.weight 2.bias
    op = HessianOperator(model, F.cross_entropy, [(x, y)], param_names="2.bias")
    assert op.param_names == ["2.bias"] and op.num_params == 4
    v = torch.randn(4, generator=g, dtype=F64)
    torch.testing.assert_close(op.matvec(v), H[-4:, -4:] @ v)
    w = torch.randn(24, generator=g, dtype=F64)
    torch.testing.assert_close(hessian_vector_product(model, F.cross_entropy, [(x, y)], w,
                                                      param_names=["2.weight", "2.bias"]), H[-24:, -24:] @ w)


def bn_mlp():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("reuse_graph", [True, False])
def test_float32_model_and_data_computed_in_float64(reuse_graph):
    model32 = bn_mlp()                                                # float32 parameters and buffers
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)   # float32 data
    names = ["1.weight", "1.bias", "3.weight", "3.bias"]              # "0.*" stay fixed: cast too
    H = dense_hessian(copy.deepcopy(model32).double(), F.cross_entropy, [(x.double(), y)], [1], names=names)
    op = HessianOperator(model32, F.cross_entropy, [(x, y)], param_names=names, dtype=F64, reuse_graph=reuse_graph)
    assert op.dtype == F64 and op.theta.dtype == F64
    v = torch.randn(op.num_params, generator=g, dtype=F64)
    hv = op.matvec(v)
    assert hv.dtype == F64
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)    # float32 arithmetic is off by ~1e-7
    w = torch.randn(H.shape[0], generator=g, dtype=F64)
    hw = hessian_vector_product(model32, F.cross_entropy, [(x, y)], w, param_names=names, dtype=F64)
    assert hw.dtype == F64
    torch.testing.assert_close(hw, H @ w, rtol=1e-10, atol=1e-12)


class Permuted(nn.Module):
    """An integer buffer (a fixed feature permutation) read by the forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("perm", torch.tensor([2, 0, 1]))

    def forward(self, x):
        return self.lin(torch.tanh(x[:, self.perm]))


def test_integer_buffers_keep_their_dtype():
    torch.manual_seed(9)
    model = Permuted().double()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(7, 3, generator=g, dtype=F64), torch.randint(0, 4, (7,), generator=g)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, F.cross_entropy, [(x, y)]).matvec(v), H @ v)


@pytest.mark.parametrize("reuse_graph", [True, False])
def test_fixed_parameters_are_a_snapshot(reuse_graph):
    model, g = mlp(), torch.Generator().manual_seed(10)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 4, (8,), generator=g)
    names = ["2.weight", "2.bias"]
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1], names=names)
    op = HessianOperator(model, F.cross_entropy, [(x, y)], param_names=names, reuse_graph=reuse_graph)
    with torch.no_grad():                      # a parameter the operator holds fixed moves on
        model[0].weight.mul_(1.5)
    moved = dense_hessian(model, F.cross_entropy, [(x, y)], [1], names=names)
    assert (moved - H).abs().max() > 1e-3, "the edit must change the block for this test"
    v = torch.randn(24, generator=g, dtype=F64)
    torch.testing.assert_close(op.matvec(v), H @ v)


# ------------------------------------------------------------------------- modes
class CubeNoJvp(torch.autograd.Function):
    """x³ with a backward but no forward-mode rule, like an op without a jvp formula."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad_out


class CubeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(CubeNoJvp.apply(self.a(x)))


def test_reverse_mode_never_needs_a_forward_derivative():
    torch.manual_seed(11)
    model = CubeNet().double()
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    for reuse in (True, False):
        op = HessianOperator(model, F.cross_entropy, [(x, y)], mode="reverse", reuse_graph=reuse)
        torch.testing.assert_close(op.matvec(v), H @ v)
    torch.testing.assert_close(hessian_vector_product(model, F.cross_entropy, [(x, y)], v, mode="reverse"), H @ v)
    # forward mode (jvp of grad), also the default of a single product, needs it and says what to do
    with pytest.raises(NotImplementedError, match="use mode='reverse'"):
        HessianOperator(model, F.cross_entropy, [(x, y)], mode="forward").matvec(v)
    with pytest.raises(NotImplementedError, match="use mode='reverse'"):
        hessian_vector_product(model, F.cross_entropy, [(x, y)], v)


def test_single_product_in_forward_mode():
    model, g = mlp(), torch.Generator().manual_seed(12)
    x, y = torch.randn(5, 3, generator=g, dtype=F64), torch.randint(0, 4, (5,), generator=g)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])
    v = torch.randn(H.shape[0], generator=g, dtype=F64)
    torch.testing.assert_close(hessian_vector_product(model, F.cross_entropy, [(x, y)], v, mode="forward"), H @ v)


# --------------------------------------------------------------------- BatchNorm
class FunctionalBN(nn.Module):
    """Calls ``F.batch_norm`` with its defaults (training=False, eps=1e-5)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 3)
        self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) * 1e-3 + 1e-4)       # small: eps matters

    def forward(self, x):
        return self.out(torch.tanh(F.batch_norm(self.lin(x), self.rm, self.rv, self.w, self.b)))


@pytest.mark.parametrize("make", [bn_mlp, FunctionalBN], ids=["BatchNorm1d", "F.batch_norm"])
def test_eval_batch_norm_is_differentiated_as_an_affine_map(monkeypatch, make):
    torch.manual_seed(13)
    model = make().double().eval()
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(9, 3, generator=g, dtype=F64), torch.randint(0, 3, (9,), generator=g)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])          # the fused kernel, eps=1e-5
    v, V = torch.randn(H.shape[0], generator=g, dtype=F64), torch.randn(2, H.shape[0], generator=g, dtype=F64)
    calls = []
    fused = torch.batch_norm
    monkeypatch.setattr(torch, "batch_norm", lambda *a, **k: calls.append(1) or fused(*a, **k))
    for reuse in (True, False):
        op = HessianOperator(model, F.cross_entropy, [(x, y)], reuse_graph=reuse)
        torch.testing.assert_close(op.matvec(v), H @ v)
        torch.testing.assert_close(op.matmat(V), V @ H)
    assert calls == []                          # the fused kernel never ran in eval mode
    if make is bn_mlp:                          # batch statistics do go through it (the counter works)
        HessianOperator(model, F.cross_entropy, [(x, y)], bn_stats="batch").matvec(v)
        assert calls


def test_affine_batch_norm_defaults_are_those_of_F_batch_norm():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    mean, var = torch.randn(4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) * 1e-3
    # a drop-in for F.batch_norm, so its defaults too (torch forwards training/momentum/eps by keyword today)
    torch.testing.assert_close(_affine_batch_norm(x, mean, var), F.batch_norm(x, mean, var), rtol=1e-13, atol=1e-13)
    # one statistic missing: left to F.batch_norm (which raises its own error in eval mode)
    assert _affine_batch_norm(x, mean, None) is None and _affine_batch_norm(x, None, var) is None


def test_top_level_batch_norm_with_batch_statistics():
    torch.manual_seed(15)
    model = nn.BatchNorm1d(4).double().eval()
    with torch.no_grad():
        model.running_mean.normal_()
        model.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(15)
    x, y = torch.randn(10, 4, generator=g, dtype=F64) * 2 + 1, torch.randint(0, 4, (10,), generator=g)
    none = {"running_mean": None, "running_var": None, "num_batches_tracked": None}
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1], overrides=none)
    assert (H - dense_hessian(model, F.cross_entropy, [(x, y)], [1])).abs().max() > 1e-3
    v = torch.randn(8, generator=g, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, F.cross_entropy, [(x, y)], bn_stats="batch").matvec(v), H @ v)


# ------------------------------------------------------------------------ matmat
def test_matmat_chunks_are_passes_over_the_data():
    torch.manual_seed(16)
    model = nn.Linear(3, 2).double()                                  # P = 8
    g = torch.Generator().manual_seed(16)
    x, y = torch.randn(9, 3, generator=g, dtype=F64), torch.randint(0, 2, (9,), generator=g)
    loader = CountingBatches([(x[:4], y[:4]), (x[4:], y[4:])])
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1])
    V = torch.randn(10, 8, generator=g, dtype=F64)                    # more rows than P
    op = HessianOperator(model, F.cross_entropy, loader)
    for chunk, passes in ((None, 1), (3, 4), (1, 10)):
        loader.passes = 0
        torch.testing.assert_close(op.matmat(V, chunk=chunk), V @ H)
        assert loader.passes == passes, chunk
    assert op.num_matvecs == 30
    with pytest.raises(ValueError, match="chunk"):
        op.matmat(V, chunk=0)


# ------------------------------------------------------------------ loss and grad
def test_loss_and_grad_default_point_and_one_sample():
    model, g = mlp(), torch.Generator().manual_seed(17)
    x, y = torch.randn(7, 3, generator=g, dtype=F64), torch.randint(0, 4, (7,), generator=g)
    for data in ([(x[:3], y[:3]), (x[3:], y[3:])], [(x[:1], y[:1])]):
        xs, ys = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
        model.zero_grad()
        ref = F.cross_entropy(model(xs), ys)
        ref.backward()
        value, grad = HessianOperator(model, F.cross_entropy, data).loss_and_grad()   # at θ
        assert value.item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))


# ------------------------------------------------------------- scipy operator
def test_scipy_operator_is_symmetric_float64_and_costs_no_product_to_build():
    torch.manual_seed(18)
    model32 = mlp().float()
    g = torch.Generator().manual_seed(18)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 4, (8,), generator=g)
    H = dense_hessian(copy.deepcopy(model32).double(), F.cross_entropy, [(x.double(), y)], [1]).numpy()
    told = []
    op = HessianOperator(model32, F.cross_entropy, [(x, y)])          # float32 products
    lo = op.as_linear_operator(hooks=Hooks(progress=told.append))
    assert op.num_matvecs == 0 and told == [] and lo.dtype == np.float64 and lo.shape == H.shape
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    out = lo.matvec(v)                                                # default shift 0: H v
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, H @ v, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lo.rmatvec(v), out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lo.H.matvec(v), out, rtol=1e-6, atol=1e-7)
    assert told == [1, 1, 1] and op.num_matvecs == 3


def test_scipy_operator_shift_in_float64_for_float32_vectors():
    model, g = mlp(), torch.Generator().manual_seed(19)
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 4, (8,), generator=g)
    H = dense_hessian(model, F.cross_entropy, [(x, y)], [1]).numpy()
    v32 = np.random.default_rng(1).standard_normal(H.shape[0]).astype(np.float32)
    v = v32.astype(np.float64)                                        # the same numbers, exactly
    lo = HessianOperator(model, F.cross_entropy, [(x, y)]).as_linear_operator(shift=0.1)
    np.testing.assert_allclose(lo.matvec(v32), H @ v - 0.1 * v, rtol=0, atol=1e-12)
    # a column [P, 1], which scipy passes through as it is, is flattened
    np.testing.assert_allclose(lo.matvec(v.reshape(-1, 1)).ravel(), H @ v - 0.1 * v, rtol=0, atol=1e-12)

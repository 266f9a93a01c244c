"""Curvature: Hessian-vector products, Lanczos eigenvalues, Hutchinson trace.

Every check is against an exact Hessian: ``XᵀX/n`` for least squares, and
``torch.autograd.functional.hessian`` of the same loss for small networks.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from modeconn.data import TensorLoader
from modeconn.runtime import Hooks
from modeconn.geometry.hessian import (ExtremeEigenvalues, HessianOperator, curvature_ratio, hessian_eigenvalues,
                              hessian_extreme_eigenvalues, hessian_trace, hessian_vector_product,
                              sharpness_along)

F64 = torch.float64


def half_mse(out, y):
    """0.5 * mean squared error: its Hessian for y ≈ Xw is exactly XᵀX / n."""
    return 0.5 * (out.squeeze(-1) - y).pow(2).mean()


def split(x, y, sizes):
    """Unequal batches, so an unweighted average of batch Hessians would be wrong."""
    assert sum(sizes) == len(x)
    return list(zip(x.split(sizes), y.split(sizes)))


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def exact_hessian(model, loss_fn, x, y, prepare=None):
    """Dense Hessian of ``loss_fn(model(x), y)`` w.r.t. the flat parameters (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    buffers = {n: b.detach().double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    if prepare is not None:
        buffers = prepare(buffers)

    def loss(flat):
        params = {n: c.view(s) for n, c, s in zip(names, flat.split(numels), shapes)}
        return loss_fn(functional_call(model, {**params, **buffers}, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat_params(model).double(), vectorize=True)


# ------------------------------------------------------------------ least squares
@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(0)
    n, d = 240, 8
    scales = torch.linspace(0.5, 3.0, d, dtype=F64)          # distinct, well-separated spectrum
    mix = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    x = torch.randn(n, d, generator=g, dtype=F64) * scales @ mix.T
    y = x @ torch.randn(d, generator=g, dtype=F64) + 0.1 * torch.randn(n, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    H = (x.T @ x / n).numpy()
    return model, x, y, H


def test_linear_regression_top_eigenvalues_match_eigh(regression):
    model, x, y, H = regression
    exact = np.linalg.eigh(H)[0]
    data = split(x, y, [100, 37, 103])
    res = hessian_eigenvalues(model, half_mse, data, k=3, tol=1e-10, dtype=F64)
    np.testing.assert_allclose(res.eigenvalues, exact[::-1][:3], rtol=1e-4)
    assert res.num_params == 8 and res.eigenvalues.shape == (3,) and res.num_matvecs > 0
    # eigenvectors are Hessian eigenvectors
    vecs = hessian_eigenvalues(model, half_mse, data, k=2, tol=1e-10, dtype=F64, return_eigenvectors=True)
    np.testing.assert_allclose(H @ vecs.eigenvectors, vecs.eigenvectors * vecs.eigenvalues, atol=1e-6)
    # the smallest ones directly (which='SA'), smallest first
    sa = hessian_eigenvalues(model, half_mse, data, k=2, which="SA", tol=1e-10, dtype=F64)
    np.testing.assert_allclose(sa.eigenvalues, exact[:2], rtol=1e-4)


def test_linear_regression_extreme_eigenvalues_and_ratio(regression):
    model, x, y, H = regression
    exact = np.linalg.eigh(H)[0]
    ext = hessian_extreme_eigenvalues(model, half_mse, split(x, y, [60, 180]), tol=1e-10, dtype=F64)
    assert isinstance(ext, ExtremeEigenvalues)
    lmax, lmin = ext                                          # unpacks as a pair
    assert lmax == pytest.approx(exact[-1], rel=1e-4)
    assert lmin == pytest.approx(exact[0], rel=1e-4)
    assert ext.ratio == pytest.approx(abs(exact[0] / exact[-1]), rel=1e-3)


def test_linear_regression_float32_default_dtype(regression):
    model, x, y, H = regression
    model32 = copy.deepcopy(model).float()
    data = [(x.float(), y.float())]
    res = hessian_eigenvalues(model32, half_mse, data, k=1)
    assert res.eigenvalues[0] == pytest.approx(np.linalg.eigh(H)[0][-1], rel=1e-3)


def test_linear_regression_trace_within_three_stderr(regression):
    model, x, y, H = regression
    loader = TensorLoader(x, y, batch_size=160)                # a loader, last batch smaller
    mean, stderr = hessian_trace(model, half_mse, loader, num_samples=100, seed=1, dtype=F64)
    exact = float(np.trace(H))
    assert abs(mean - exact) <= 3 * stderr
    assert 0 < stderr < 0.05 * exact
    # reproducible from the seed, and vmap over vectors gives the same samples
    assert hessian_trace(model, half_mse, loader, num_samples=100, seed=1, dtype=F64,
                         vectors_per_pass=50) == pytest.approx((mean, stderr), rel=1e-10)


# ------------------------------------------------------------------- HVP vs autograd
@pytest.fixture(scope="module")
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(16, 3, dtype=F64)
    y = torch.randint(0, 4, (16,))
    return model, x, y


def test_hvp_matches_autograd_hessian_over_two_batches(mlp_problem):
    model, x, y = mlp_problem
    H = exact_hessian(model, F.cross_entropy, x, y)
    P = H.shape[0]
    v = torch.randn(P, dtype=F64)
    before = flat_params(model).clone()
    batches = split(x, y, [5, 11])
    hv = hessian_vector_product(model, F.cross_entropy, batches, v)
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hessian_vector_product(model, None, [(x, y)], v), H @ v)  # default loss
    # the sample weighting matters: a plain mean of the two batch products is wrong
    per_batch = [hessian_vector_product(model, F.cross_entropy, [b], v) for b in batches]
    assert (0.5 * (per_batch[0] + per_batch[1]) - H @ v).abs().max() > 1e-3
    torch.testing.assert_close((5 * per_batch[0] + 11 * per_batch[1]) / 16, H @ v)
    # reverse-over-reverse and vmapped products agree
    op = HessianOperator(model, F.cross_entropy, batches, mode="reverse")
    torch.testing.assert_close(op.matvec(v), H @ v)
    V = torch.randn(3, P, dtype=F64)
    torch.testing.assert_close(HessianOperator(model, None, batches).matmat(V, chunk=2), V @ H)
    assert torch.equal(flat_params(model), before)           # the model is only read


def test_hvp_parameter_subset_is_the_hessian_block(mlp_problem):
    model, x, y = mlp_problem
    H = exact_hessian(model, F.cross_entropy, x, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:2])                                    # "2.weight", "2.bias" are last
    op = HessianOperator(model, F.cross_entropy, [(x, y)], param_names=names[2:])
    assert op.num_params == H.shape[0] - start
    v = torch.randn(op.num_params, dtype=F64)
    torch.testing.assert_close(op.matvec(v), H[start:, start:] @ v)


# ----------------------------------------------------------------------- BatchNorm
def bn_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    return model


def test_batchnorm_uses_running_statistics_in_eval_mode():
    model = bn_model()
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 3, (12,))
    model.eval()
    H = exact_hessian(model, F.cross_entropy, x, y)
    model.train()                                             # left in train mode by the caller
    state = copy.deepcopy(model.state_dict())
    v = torch.randn(H.shape[0], dtype=F64)
    hv = hessian_vector_product(model, F.cross_entropy, split(x, y, [4, 8]), v)
    torch.testing.assert_close(hv, H @ v)
    assert model.training                                     # mode restored
    for k, t in model.state_dict().items():                   # running stats not touched
        assert torch.equal(t, state[k]), k
    lmax = hessian_eigenvalues(model, F.cross_entropy, [(x, y)], k=1, tol=1e-6).eigenvalues[0]
    assert lmax == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-4)


def test_batchnorm_batch_statistics_option():
    model = bn_model()
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(0, 3, (12,))

    def no_running_stats(buffers):
        return {k: (None if k.startswith("1.") else b) for k, b in buffers.items()}

    H_batch = exact_hessian(model, F.cross_entropy, x, y, prepare=no_running_stats)
    H_eval = exact_hessian(model.eval(), F.cross_entropy, x, y)
    assert (H_batch - H_eval).abs().max() > 1e-3, "the two BN modes must differ for this test"
    v = torch.randn(H_batch.shape[0], dtype=F64)
    hv = hessian_vector_product(model, F.cross_entropy, [(x, y)], v, bn_stats="batch")
    torch.testing.assert_close(hv, H_batch @ v)


# ------------------------------------------------------------------- along a path
def test_sharpness_along_points_and_progress(mlp_problem):
    model, x, y = mlp_problem
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.7)
    data = split(x, y, [5, 11])
    calls = []
    res = sharpness_along((m for m in (model, other)), F.cross_entropy, data, tol=1e-6, ts=[0.0, 1.0],
                          hooks=Hooks(progress=calls.append))
    assert calls == [1, 1]  # one point finished, then the other
    for i, m in enumerate((model, other)):
        evals = torch.linalg.eigvalsh(exact_hessian(m, F.cross_entropy, x, y)).numpy()
        assert evals[0] < -1e-2, "the test needs an indefinite Hessian"
        assert res.lambda_max[i] == pytest.approx(evals[-1], rel=1e-4)
        assert res.lambda_min[i] == pytest.approx(evals[0], rel=1e-4)
        assert res.ratio[i] == pytest.approx(abs(evals[0] / evals[-1]), rel=1e-3)
    d = res.as_dict()
    assert d["ts"] == [0.0, 1.0] and len(d["lambda_max"]) == 2 and d["num_matvecs"] == res.num_matvecs > 0


def test_progress_counts_products(regression):
    model, x, y, _ = regression
    told = []
    res = hessian_eigenvalues(model, half_mse, [(x, y)], k=2, dtype=F64, hooks=Hooks(progress=told.append))
    assert set(told) == {1} and len(told) == res.num_matvecs > 0  # one unit per product
    passes = []
    hessian_trace(model, half_mse, [(x, y)], num_samples=7, dtype=F64, vectors_per_pass=3,
                  hooks=Hooks(progress=passes.append))
    assert passes == [3, 3, 1]  # vectors per pass over the data


def test_curvature_ratio_edge_cases():
    assert curvature_ratio(2.0, -0.5) == 0.25
    assert curvature_ratio(0.0, -1.0) == float("inf")
    assert np.isnan(curvature_ratio(0.0, 0.0))


# ----------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_value_errors(regression):
    model, x, y, _ = regression                              # P = 8
    data = [(x, y)]
    with pytest.raises(ValueError, match="k < P"):
        hessian_eigenvalues(model, half_mse, data, k=8)
    with pytest.raises(ValueError, match="k < P"):
        hessian_eigenvalues(model, half_mse, data, k=20)
    with pytest.raises(ValueError, match="k must be >= 1"):
        hessian_eigenvalues(model, half_mse, data, k=0)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigenvalues(model, half_mse, [], k=1)
    with pytest.raises(ValueError, match="empty"):
        hessian_trace(model, half_mse, TensorLoader(x[:0], y[:0], batch_size=4))
    with pytest.raises(ValueError, match="no samples"):
        hessian_extreme_eigenvalues(model, half_mse, iter([]))   # no len(): found on the first pass
    with pytest.raises(ValueError, match="which"):
        hessian_eigenvalues(model, half_mse, data, which="LR")
    with pytest.raises(ValueError, match="unknown parameter"):
        HessianOperator(model, half_mse, data, param_names=["nope"])
    with pytest.raises(ValueError, match="does not match the number of parameters"):
        hessian_vector_product(model, half_mse, data, torch.ones(3))
    with pytest.raises(ValueError, match="num_samples"):
        hessian_trace(model, half_mse, data, num_samples=1)
    with pytest.raises(ValueError, match="unknown loss_fn"):
        hessian_trace(model, "hinge", data)
    with pytest.raises(ValueError, match="models is empty"):
        sharpness_along([], half_mse, data)

"""Graph reuse, affine eval BatchNorm and the per-step Lanczos of the Hessian tools.

Every product is checked against a dense float64 Hessian from
``torch.autograd.functional.hessian`` of the same loss (``exact_hessian`` of
test_hessian.py), eigenvalues against ``numpy.linalg.eigh``.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn.geometry.hessian import HessianOperator, hessian_eigenvalues, hessian_extreme_eigenvalues
from modeconn.geometry.hessian_operator import _affine_batch_norm
from modeconn.geometry.lanczos import lanczos_extreme
from tests.test_hessian import bn_model, exact_hessian, split

F64 = torch.float64


class CountingBatches:
    """A loader (not a list) that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


@pytest.fixture()
def problem():
    model = bn_model().eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)
    return model, x, y


@pytest.mark.parametrize("bn_stats", ["running", "batch"])
def test_reused_graph_products_equal_rebuilt_ones_and_the_dense_hessian(problem, bn_stats):
    model, x, y = problem
    data = split(x, y, [5, 7])                     # unequal batches: weights matter
    if bn_stats == "running":
        H = exact_hessian(model, F.cross_entropy, x, y)
    else:                                          # batch statistics: the Hessian of each batch's own function
        Hs = [exact_hessian(model, F.cross_entropy, bx, by,
                            prepare=lambda b: {k: (None if k.startswith("1.") else t) for k, t in b.items()})
              for bx, by in data]
        H = (5 * Hs[0] + 7 * Hs[1]) / 12
    V = torch.randn(3, H.shape[0], dtype=F64)
    cached = HessianOperator(model, F.cross_entropy, data, bn_stats=bn_stats)
    assert cached.reuse_graph and cached.mode == "reverse"   # the default for a list
    ops = [cached, HessianOperator(model, F.cross_entropy, data, bn_stats=bn_stats, reuse_graph=False),
           HessianOperator(model, F.cross_entropy, data, bn_stats=bn_stats, mode="reverse", reuse_graph=False)]
    assert ops[1].mode == "forward" and not ops[1].reuse_graph
    for op in ops:
        for v in V:
            torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matmat(V, chunk=2), V @ H, rtol=1e-10, atol=1e-12)
    assert cached.num_matvecs == 6


def test_cached_operator_is_a_snapshot_never_stale(problem):
    model, x, y = problem
    H = exact_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(H.shape[0], dtype=F64)
    op = HessianOperator(model, F.cross_entropy, [(x, y)])
    op_late = HessianOperator(model, F.cross_entropy, [(x, y)])   # graph not built yet
    first = op.matvec(v)
    with torch.no_grad():                           # the model moves on: parameters and BN statistics
        for p in model.parameters():
            p.mul_(1.3)
        model[1].running_var.mul_(2.0)
    H_new = exact_hessian(model, F.cross_entropy, x, y)
    assert (H_new @ v - H @ v).abs().max() > 1e-3, "the edit must change the Hessian for this test"
    torch.testing.assert_close(op.matvec(v), first)            # built graph: the old point
    torch.testing.assert_close(op_late.matvec(v), H @ v)       # graph built after the edit: still the old point
    op.release_graphs()
    torch.testing.assert_close(op.matvec(v), H @ v)            # rebuilt: same point, same values
    torch.testing.assert_close(HessianOperator(model, F.cross_entropy, [(x, y)]).matvec(v), H_new @ v)


def test_loader_reuse_is_opt_in_and_iterates_once(problem):
    model, x, y = problem
    H = exact_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(H.shape[0], dtype=F64)
    loader = CountingBatches(split(x, y, [4, 8]))
    op = HessianOperator(model, F.cross_entropy, loader)
    assert not op.reuse_graph and op.mode == "forward"       # loaders: per-product passes by default
    op.matvec(v), op.matvec(v)
    assert loader.passes == 2
    loader.passes = 0
    op = HessianOperator(model, F.cross_entropy, loader, reuse_graph=True)
    for _ in range(3):
        torch.testing.assert_close(op.matvec(v), H @ v)
    assert loader.passes == 1
    assert not HessianOperator(model, F.cross_entropy, [(x, y)], mode="forward").reuse_graph
    with pytest.raises(ValueError, match="forward.*cannot reuse"):
        HessianOperator(model, F.cross_entropy, [(x, y)], mode="forward", reuse_graph=True)
    with pytest.raises(ValueError, match="no samples"):
        HessianOperator(model, F.cross_entropy, [(x[:0], y[:0])]).matvec(v)


@pytest.mark.parametrize("affine", [True, False])
def test_affine_batch_norm_is_eval_batch_norm(affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, 3, generator=g, dtype=F64)
    mean, var = torch.randn(4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64) + 0.5
    w, b = (torch.randn(4, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)) if affine else (None, None)
    torch.testing.assert_close(_affine_batch_norm(x, mean, var, w, b, False, 0.1, 1e-3),
                               F.batch_norm(x, mean, var, w, b, False, 0.1, 1e-3), rtol=1e-13, atol=1e-13)
    assert _affine_batch_norm(x, mean, var, w, b, training=True) is None   # batch statistics: not rewritten
    assert _affine_batch_norm(x, None, None, w, b) is None


def spectrum_matvec(evals, seed=0):
    """A dense symmetric matrix with the given eigenvalues, as a torch float64 product, and its product count."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=F64))[0]
    A = Q @ torch.diag(torch.as_tensor(evals, dtype=F64)) @ Q.T
    count = [0]

    def mv(v):
        count[0] += 1
        return A @ v

    return mv, count


def test_lanczos_extreme_checks_every_step():
    evals = np.concatenate([[-3.0], np.linspace(-1, 1, 60), [2.0, 5.0]])
    mv, count = spectrum_matvec(evals)
    v0 = torch.randn(len(evals), generator=torch.Generator().manual_seed(1), dtype=F64)
    top = lanczos_extreme(mv, v0, "LA", tol=1e-8, max_steps=40)
    assert top.converged and top.steps == count[0] < 40
    assert top.value == pytest.approx(5.0, rel=1e-10) and top.value <= 5.0 + 1e-12   # Ritz values from below
    torch.testing.assert_close(mv(top.vector), top.value * top.vector, atol=1e-6, rtol=0)
    low = lanczos_extreme(mv, v0, "SA", tol=1e-8, max_steps=40)
    assert low.converged and low.value == pytest.approx(-3.0, rel=1e-10)
    loose = lanczos_extreme(mv, v0, "LA", tol=1e-2, max_steps=40)
    assert loose.steps < top.steps and abs(loose.value - 5.0) <= 1e-2 * 5.0
    short = lanczos_extreme(mv, v0, "LA", tol=1e-12, max_steps=2)
    assert not short.converged and short.steps == 2
    with pytest.raises(ValueError, match="which"):
        lanczos_extreme(mv, v0, "LM")


def test_hessian_eigenvalues_k1_lanczos_and_arpack_fallback(problem):
    model, x, y = problem
    H = exact_hessian(model, F.cross_entropy, x, y)
    evals = np.linalg.eigvalsh(H.numpy())
    data = [(x, y)]
    for ncv in (None, 3):                         # ncv=3: Lanczos cannot converge, ARPACK continues
        res = hessian_eigenvalues(model, F.cross_entropy, data, k=1, tol=1e-10, ncv=ncv, return_eigenvectors=True)
        assert res.eigenvalues[0] == pytest.approx(evals[-1], rel=1e-8)
        np.testing.assert_allclose(H.numpy() @ res.eigenvectors[:, 0], evals[-1] * res.eigenvectors[:, 0], atol=1e-6)
    low = hessian_eigenvalues(model, F.cross_entropy, data, k=1, which="SA", tol=1e-10)
    assert low.eigenvalues[0] == pytest.approx(evals[0], rel=1e-6)
    ext = hessian_extreme_eigenvalues(model, F.cross_entropy, data, tol=1e-10, ncv=5)
    assert ext.lambda_max == pytest.approx(evals[-1], rel=1e-8)
    assert ext.lambda_min == pytest.approx(evals[0], abs=1e-8 * (evals[-1] - evals[0]))


def test_ncv_is_validated(problem):
    model, x, y = problem
    P = sum(p.numel() for p in model.parameters())
    for bad, match in ((1, "k < ncv <= P"), (P + 1, "k < ncv <= P"), (2.5, "ncv must be an integer")):
        with pytest.raises(ValueError, match=match):
            hessian_eigenvalues(model, F.cross_entropy, [(x, y)], k=1, ncv=bad)
    with pytest.raises(ValueError, match="k < ncv"):
        hessian_eigenvalues(model, F.cross_entropy, [(x, y)], k=3, ncv=3)
    with pytest.raises(ValueError, match="k < ncv"):
        hessian_extreme_eigenvalues(model, F.cross_entropy, [(x, y)], ncv=1)


def test_reuse_and_rebuild_give_the_same_lanczos_answer(problem):
    model, x, y = problem
    kw = dict(k=1, tol=1e-6, seed=2)
    a = hessian_eigenvalues(model, F.cross_entropy, [(x, y)], **kw)
    b = hessian_eigenvalues(copy.deepcopy(model), F.cross_entropy, [(x, y)], reuse_graph=False, **kw)
    assert a.num_matvecs == b.num_matvecs and a.eigenvalues[0] == pytest.approx(b.eigenvalues[0], rel=1e-9)

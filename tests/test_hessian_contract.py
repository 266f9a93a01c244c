"""Contracts of geometry/hessian.py that mutation run 8 found untested.

Most checks use a quadratic ``L(θ) = ½ θᵀAθ``, whose Hessian is ``A`` exactly
(chosen spectrum, rotated by a random orthogonal matrix), so eigenvalues and
traces are known by construction; the others a dense float64 Hessian from
``torch.autograd.functional.hessian`` (``exact_hessian`` of test_hessian.py).
"""
import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh
from torch import nn

import modeconn.geometry.hessian as hessian_mod
from modeconn.geometry.hessian import (HessianOperator, hessian_eigenvalues, hessian_extreme_eigenvalues,
                                       hessian_trace, sharpness_along)
from modeconn.runtime import Hooks
from tests.test_hessian import bn_model, exact_hessian, split
from tests.test_hessian_reuse import CountingBatches

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
# isolated ends: λmax = 10 (next 6), λmin = -8 (next -3); P = 40 > ARPACK's default basis of 20
TOP = np.concatenate([[10.0, 6.0], np.linspace(-1, 1, 36), [-3.0, -8.0]])
# the same top, a cluster at the bottom: λmin is hard for one ARPACK restart of a small basis
CLUSTER = np.concatenate([[10.0], np.linspace(-1, 1, 36), [-7.98, -7.99, -8.0]])


class Blocks(nn.Module):
    """θ split into named blocks; ``forward(x) = x @ θ``, so for x = I the output is θ."""

    def __init__(self, sizes):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.blocks = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in sizes])

    def forward(self, x):
        return x @ torch.cat(list(self.blocks))


def quadratic(A, sizes=None):
    """``(model, loss, data)`` of ``L(θ) = ½ θᵀAθ``: its Hessian is A in any dtype the loss runs in."""
    A = torch.as_tensor(A, dtype=F64)
    P = A.shape[0]
    model = Blocks(sizes or (P // 2, P - P // 2))

    def loss(out, y):
        return 0.5 * out @ A.to(out.dtype) @ out

    return model, loss, [(torch.eye(P, dtype=F64), torch.zeros(P, dtype=F64))]


def rotated(evals, seed=0):
    """A symmetric matrix with exactly these eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=F64))[0]
    return Q @ torch.diag(torch.as_tensor(evals, dtype=F64)) @ Q.T


def bounded(told, limit):
    """A progress callback recording the units, failing (not looping on) past ``limit`` of them."""
    def progress(n):
        told.append(n)
        assert sum(told) <= limit, f"more than {limit} units reported"

    return progress


@pytest.fixture(scope="module")
def top():
    return quadratic(rotated(TOP))


# ------------------------------------------------------------------ λmax alone
def test_lambda_max_alone_is_lanczos_checked_after_every_product(top):
    model, loss, data = top
    told = []
    res = hessian_eigenvalues(model, loss, data, hooks=Hooks(progress=told.append))   # k=1, 'LA'
    assert res.eigenvalues.shape == (1,) and res.which == "LA"
    assert abs(res.eigenvalues[0] - 10.0) <= 1e-3 * 10.0
    assert res.eigenvectors is None                                   # not asked for
    assert res.num_matvecs <= 20      # ARPACK needs at least its basis (ncv = 20) + 1 products
    assert told == [1] * res.num_matvecs                              # one unit per product
    vec = hessian_eigenvalues(model, loss, data, tol=1e-10, return_eigenvectors=True).eigenvectors
    assert vec.shape == (40, 1)
    np.testing.assert_allclose(rotated(TOP).numpy() @ vec[:, 0], 10.0 * vec[:, 0], atol=1e-6)
    two = hessian_eigenvalues(model, loss, data, k=2, tol=1e-10)      # k > 1: ARPACK, both values
    np.testing.assert_allclose(two.eigenvalues, [10.0, 6.0], rtol=1e-8)


def test_lanczos_with_a_shift_is_the_top_of_the_shifted_hessian(top):
    model, loss, data = top
    op = HessianOperator(model, loss, data)
    vals, vecs = hessian_mod._eigsh(op, 1, "LA", 1e-10, None, 0, shift=2.5)
    assert vals.shape == (1,) and vecs is None
    assert vals[0] == pytest.approx(10.0 - 2.5, rel=1e-8)            # H - 2.5·I spans [-10.5, 7.5]


# ------------------------------------------------------------------ defaults
def test_defaults_are_the_documented_values(top):
    model, loss, data = top
    default = hessian_eigenvalues(model, loss, data)
    explicit = hessian_eigenvalues(model, loss, data, k=1, which="LA", tol=1e-3, maxiter=None, seed=0)
    assert default.eigenvalues.tolist() == explicit.eigenvalues.tolist()
    assert default.num_matvecs == explicit.num_matvecs
    assert hessian_eigenvalues(model, loss, data, seed=1).eigenvalues[0] != explicit.eigenvalues[0]  # seed matters

    ext = hessian_extreme_eigenvalues(model, loss, data)
    assert ext == hessian_extreme_eigenvalues(model, loss, data, tol=1e-3, seed=0)
    assert ext != hessian_extreme_eigenvalues(model, loss, data, tol=1e-3, seed=1)
    assert abs(ext.lambda_max - 10.0) <= 1e-3 * 10.0 and abs(ext.lambda_min + 8.0) <= 1e-3 * 18.0

    sh = sharpness_along([model], loss, data)
    sh0 = sharpness_along([model], loss, data, tol=1e-3, seed=0)
    assert (sh.lambda_max.tolist(), sh.lambda_min.tolist()) == (sh0.lambda_max.tolist(), sh0.lambda_min.tolist())
    sh1 = sharpness_along([model], loss, data, tol=1e-3, seed=1)
    assert (sh.lambda_max.tolist(), sh.lambda_min.tolist()) != (sh1.lambda_max.tolist(), sh1.lambda_min.tolist())

    told = []
    tr = hessian_trace(model, loss, data, hooks=Hooks(progress=bounded(told, 100)))
    assert told == [1] * 100                                          # 100 samples, one vector per pass
    assert tr == hessian_trace(model, loss, data, num_samples=100, seed=0, vectors_per_pass=1)
    assert tr != hessian_trace(model, loss, data, num_samples=100, seed=1)


# ------------------------------------------------------------------ results
def test_eigenvalues_are_ordered_by_which():
    evals = [0.5, -0.7, -1.2, -2.0, -3.0, -4.0, -5.0, -6.0]           # LA's top two include a negative
    model, loss, data = quadratic(rotated(evals, seed=1))
    for which, k, expected in (("LA", 2, [0.5, -0.7]), ("SA", 2, [-6.0, -5.0]), ("LM", 3, [-6.0, -5.0, -4.0])):
        res = hessian_eigenvalues(model, loss, data, k=k, which=which, tol=1e-12)
        assert res.which == which
        np.testing.assert_allclose(res.eigenvalues, expected, rtol=1e-8, err_msg=which)


def test_seconds_are_the_wall_time_of_the_call(top):
    model, loss, data = top
    t0 = time.perf_counter()
    res = hessian_eigenvalues(model, loss, data, k=2)
    t1 = time.perf_counter()
    sh = sharpness_along([model], loss, data)
    t2 = time.perf_counter()
    assert 0 < res.seconds <= t1 - t0
    assert 0 < sh.seconds <= t2 - t1 and sh.as_dict()["seconds"] == sh.seconds


def test_extreme_eigenvalues_of_one_and_two_parameters():
    model, loss, data = quadratic([[2.5]], sizes=(1,))
    told = []
    ext = hessian_extreme_eigenvalues(model, loss, data, hooks=Hooks(progress=told.append))
    assert tuple(ext) == (2.5, 2.5) and ext.ratio == 1.0
    assert told == [1]                                                # its one product is reported too
    model, loss, data = quadratic(rotated([3.0, -1.0]), sizes=(1, 1))
    assert tuple(hessian_extreme_eigenvalues(model, loss, data, tol=1e-12)) == pytest.approx((3.0, -1.0), rel=1e-10)


def test_progress_counts_every_product_of_both_lanczos_runs(top):
    model, loss, data = top
    loader = CountingBatches(data)                  # a loader: one pass over it per product
    told = []
    hessian_extreme_eigenvalues(model, loss, loader, tol=1e-6, ncv=6, hooks=Hooks(progress=told.append))
    assert set(told) == {1} and len(told) == loader.passes > 7       # λmin's ARPACK run alone: >= ncv + 1


# ------------------------------------------------------------------ arguments
def test_bad_arguments_raise_and_the_boundary_values_pass():
    model, loss, data = quadratic(rotated(TOP[::5]))                  # P = 8
    for k in (True, 2.5, "2"):
        with pytest.raises(ValueError, match="k must be an integer"):
            hessian_eigenvalues(model, loss, data, k=k)
    assert hessian_eigenvalues(model, loss, data, k=np.int64(2)).eigenvalues.shape == (2,)
    for tol in (-1e-3, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tol"):
            hessian_eigenvalues(model, loss, data, tol=tol)
    exact = np.sort(TOP[::5])[::-1]
    # tol = 0 is machine precision
    assert hessian_eigenvalues(model, loss, data, tol=0.0).eigenvalues[0] == pytest.approx(exact[0], rel=1e-13)
    loader = CountingBatches(data)
    for fn in (lambda **kw: hessian_eigenvalues(model, loss, loader, **kw),
               lambda **kw: hessian_extreme_eigenvalues(model, loss, loader, **kw),
               lambda **kw: sharpness_along([model], loss, loader, **kw)):
        with pytest.raises(ValueError, match="maxiter must be >= 1"):
            fn(maxiter=0)
    assert loader.passes == 0                                         # refused before any product
    # one restart is allowed (λmax alone: Lanczos converges before ARPACK is needed)
    assert hessian_eigenvalues(model, loss, data, tol=1e-8, maxiter=1).eigenvalues[0] == pytest.approx(exact[0])
    # the whole space as the basis: ncv = P
    res = hessian_eigenvalues(model, loss, data, k=2, ncv=8, tol=1e-12)
    np.testing.assert_allclose(res.eigenvalues, exact[:2], rtol=1e-10)
    for n in (1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            hessian_trace(model, loss, data, num_samples=n)


def test_arpack_gives_up_after_maxiter_restarts(top):
    model, loss, data = top
    with pytest.raises(RuntimeError, match="did not converge"):
        hessian_eigenvalues(model, loss, data, k=3, tol=1e-10, maxiter=1, ncv=6)
    # a basis of 6: Lanczos does not reach tol, ARPACK gets one restart for λmax ...
    with pytest.raises(RuntimeError, match="which='LA'"):
        hessian_extreme_eigenvalues(model, loss, data, tol=1e-10, maxiter=1, ncv=6)
    with pytest.raises(RuntimeError, match="which='LA'"):
        sharpness_along([model], loss, data, tol=1e-10, maxiter=1, ncv=6)
    # ... and of 8: λmax converges, the clustered bottom of the shifted run does not in one restart
    model_c, loss_c, data_c = quadratic(rotated(CLUSTER))
    with pytest.raises(RuntimeError, match="which='LM'"):
        hessian_extreme_eigenvalues(model_c, loss_c, data_c, tol=1e-10, maxiter=1, ncv=8)
    ext = hessian_extreme_eigenvalues(model_c, loss_c, data_c, tol=1e-10, ncv=8)          # no limit: converges
    assert tuple(ext) == pytest.approx((10.0, -8.0), rel=1e-8)


def test_arpack_runs_get_ncv_tol_maxiter_and_the_ritz_vector(top, monkeypatch):
    model, loss, data = top
    lanczos_calls, arpack_calls = [], []
    real_lanczos, real_eigsh = hessian_mod.lanczos_extreme, hessian_mod.eigsh

    def lanczos_spy(matvec, v0, which, tol, max_steps=20):
        res = real_lanczos(matvec, v0, which, tol, max_steps=max_steps)
        lanczos_calls.append((max_steps, res))
        return res

    def eigsh_spy(A, **kw):
        arpack_calls.append(kw)
        return real_eigsh(A, **kw)

    monkeypatch.setattr(hessian_mod, "lanczos_extreme", lanczos_spy)
    monkeypatch.setattr(hessian_mod, "eigsh", eigsh_spy)
    for run in (lambda: hessian_extreme_eigenvalues(model, loss, data, tol=1e-10, maxiter=500, ncv=6),
                lambda: sharpness_along([model], loss, data, tol=1e-10, maxiter=500, ncv=6)):
        lanczos_calls.clear(), arpack_calls.clear()
        run()
        (steps, res), = lanczos_calls
        assert steps == 6 and not res.converged       # 6 steps do not reach 1e-10 here
        # λmax continued by ARPACK, then λmin
        assert [(c["which"], c["ncv"], c["tol"], c["maxiter"]) for c in arpack_calls] == \
            [("LA", 6, 1e-10, 500), ("LM", 6, 1e-10, 500)]
        np.testing.assert_array_equal(arpack_calls[0]["v0"], res.vector.numpy())   # from the Ritz vector
    # the default basis: max(2k+1, 20), capped at P
    for k, ncv in ((10, 21), (2, 20)):                                    # P = 40
        arpack_calls.clear()
        hessian_eigenvalues(model, loss, data, k=k)
        assert arpack_calls[0]["ncv"] == ncv
    arpack_calls.clear()
    small = quadratic(rotated(TOP[::5]))                                  # P = 8
    hessian_eigenvalues(*small, k=2)
    assert arpack_calls[0]["ncv"] == 8


def test_lambda_min_is_arpack_lm_of_the_shifted_hessian_from_seed_plus_one(top):
    model, loss, data = top
    A = rotated(TOP).numpy()
    for seed in (0, 4):
        ext = hessian_extreme_eigenvalues(model, loss, data, tol=1e-3, ncv=6, seed=seed)
        v0 = np.random.default_rng(seed + 1).standard_normal(40)
        shifted = eigsh(A - ext.lambda_max * np.eye(40), k=1, which="LM", tol=1e-3, ncv=6, v0=v0,
                        return_eigenvectors=False)[0]
        assert ext.lambda_min == pytest.approx(shifted + ext.lambda_max, rel=1e-10)


# ------------------------------------------------------------------ operator keywords
def _number(fn, model, loss, data, **kw):
    """λmax (or the trace) of each public function, with the operator keywords ``kw``."""
    if fn == "eigenvalues":
        return hessian_eigenvalues(model, loss, data, tol=1e-12, **kw).eigenvalues[0]
    if fn == "extreme":
        return hessian_extreme_eigenvalues(model, loss, data, tol=1e-12, **kw).lambda_max
    if fn == "sharpness":
        return sharpness_along([model], loss, data, tol=1e-12, **kw).lambda_max[0]
    return hessian_trace(model, loss, data, num_samples=4, **kw)[0]


FNS = ["eigenvalues", "extreme", "sharpness", "trace"]


@pytest.mark.parametrize("fn", FNS)
def test_param_names_and_dtype_reach_the_operator(fn):
    d = np.array([1 / 3, 2 / 3, 4 / 3, 5 / 3, 7 / 3, 8 / 3, 10 / 3])     # not exact in float32
    model, loss, data = quadratic(np.diag(d), sizes=(4, 3))
    expect = d.sum() if fn == "trace" else d.max()       # diagonal H: every Rademacher vector gives the trace
    assert _number(fn, model, loss, data) == pytest.approx(expect, rel=1e-12)
    # only the second block: its Hessian block
    block = d[4:].sum() if fn == "trace" else d[4:].max()
    assert _number(fn, model, loss, data, param_names=["blocks.1"]) == pytest.approx(block, rel=1e-12)
    if fn != "trace":                                     # λmax of the first block differs from the whole
        assert _number(fn, model, loss, data, param_names=["blocks.0"]) == pytest.approx(d[:4].max(), rel=1e-12)
    # a float32 model computed in float64: exact to float64 rounding, not float32's
    model.float()
    assert _number(fn, model, loss, data, dtype=F64) == pytest.approx(expect, rel=1e-12)
    assert _number(fn, model, loss, data) != pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("fn", FNS)
def test_mode_and_reuse_graph_reach_the_operator(fn, top):
    model, loss, data = top
    with pytest.raises(ValueError, match="cannot reuse"):
        _number(fn, model, loss, data, mode="forward", reuse_graph=True)
    loader = CountingBatches(data)
    _number(fn, model, loss, loader, mode="reverse", reuse_graph=True)
    assert loader.passes == 1                             # every product through the graph built once


@pytest.mark.parametrize("fn", FNS)
def test_bn_stats_reaches_the_operator(fn):
    model = bn_model()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 3, generator=g, dtype=F64), torch.randint(0, 3, (24,), generator=g)
    H_batch = exact_hessian(model, F.cross_entropy, x, y,
                            prepare=lambda b: {k: (None if k.startswith("1.") else t) for k, t in b.items()})
    H_eval = exact_hessian(model.eval(), F.cross_entropy, x, y)
    if fn == "trace":                                     # Hutchinson: within 4 standard errors of tr H_batch
        mean, stderr = hessian_trace(model, F.cross_entropy, [(x, y)], num_samples=200, bn_stats="batch")
        assert abs(mean - float(torch.trace(H_batch))) <= 4 * stderr
        assert abs(mean - float(torch.trace(H_eval))) > 4 * stderr
    else:
        top_batch, top_eval = torch.linalg.eigvalsh(H_batch)[-1].item(), torch.linalg.eigvalsh(H_eval)[-1].item()
        assert abs(top_batch - top_eval) > 0.1
        assert _number(fn, model, F.cross_entropy, [(x, y)], bn_stats="batch") == pytest.approx(top_batch, rel=1e-8)


# ------------------------------------------------------------------ trace
@pytest.mark.parametrize("vectors_per_pass, passes", [(1, [1] * 5), (2, [2, 2, 1]), (3, [3, 2])])
def test_trace_of_a_diagonal_hessian_is_exact_for_every_rademacher_vector(vectors_per_pass, passes):
    d = np.array([0.5, 1.5, 2.0, 3.0, 4.5, 6.0, 7.0])      # vᵀ diag(d) v = Σ d_i v_i² = Σ d_i for v_i = ±1
    model, loss, data = quadratic(np.diag(d))
    told = []
    mean, stderr = hessian_trace(model, loss, data, num_samples=5, vectors_per_pass=vectors_per_pass,
                                 hooks=Hooks(progress=bounded(told, 5)))
    assert mean == pytest.approx(d.sum(), rel=1e-13) and stderr <= 1e-12
    assert told == passes


@pytest.mark.parametrize("num_samples", [2, 10])
def test_trace_stderr_is_the_sample_standard_deviation_over_sqrt_n(num_samples):
    # H = [[0, 1], [1, 0]]: vᵀHv = 2·v₁v₂ = ±2, so the mean m fixes the sample: variance n/(n-1)·(4 - m²)
    model, loss, data = quadratic([[0.0, 1.0], [1.0, 0.0]], sizes=(1, 1))
    mean, stderr = hessian_trace(model, loss, data, num_samples=num_samples, seed=5)
    plus = (mean + 2) / 4 * num_samples                   # how many samples were +2
    assert plus == pytest.approx(round(plus)) and 0 < round(plus) < num_samples, "the test needs both signs"
    assert stderr == pytest.approx(np.sqrt((4 - mean ** 2) / (num_samples - 1)), rel=1e-12)


# ------------------------------------------------------------------ along a path
def test_sharpness_along_a_list_with_integer_ts_and_its_dict():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(20, 3, dtype=F64)
    y = torch.randn(20, dtype=F64)

    def half_mse(out, t):                                 # not the default cross-entropy
        return 0.5 * (out.squeeze(-1) - t).pow(2).mean()

    loader = CountingBatches(split(x, y, [8, 12]))        # a loader: one pass per product
    res = sharpness_along([model, other], half_mse, loader, tol=1e-10, ts=[0, 1])
    for i, m in enumerate((model, other)):
        evals = torch.linalg.eigvalsh(exact_hessian(m, half_mse, x, y)).numpy()
        assert res.lambda_max[i] == pytest.approx(evals[-1], rel=1e-8)
        assert res.lambda_min[i] == pytest.approx(evals[0], rel=1e-6, abs=1e-9 * evals[-1])
    assert res.num_matvecs == loader.passes               # the products of both points
    assert res.ts.dtype == np.float64
    d = res.as_dict()
    assert set(d) == {"lambda_max", "lambda_min", "ratio", "num_matvecs", "seconds", "ts"}
    assert d["ts"] == [0.0, 1.0] and all(isinstance(t, float) for t in d["ts"])
    assert d["lambda_max"] == res.lambda_max.tolist() and d["lambda_min"] == res.lambda_min.tolist()
    assert d["ratio"] == res.ratio.tolist() and d["seconds"] == res.seconds
    json.dumps(d)
    one = sharpness_along([model], half_mse, [(x, y)], tol=1e-10)         # a list of one point
    assert one.lambda_max.tolist() == pytest.approx(res.lambda_max[:1].tolist(), rel=1e-8)
    assert one.ts is None and "ts" not in one.as_dict()

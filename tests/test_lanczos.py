"""lanczos_extreme's contract beyond its convergence (tests/test_hessian_reuse.py): its defaults, the
dtypes it accepts, its start vector, and what an unconverged run returns."""
import numpy as np
import pytest
import torch

from modeconn.geometry.lanczos import lanczos_extreme
from tests.test_hessian_reuse import spectrum_matvec

F64 = torch.float64
# 80 eigenvalues with the top two close together: Lanczos needs many steps to separate them
SLOW = np.concatenate([np.linspace(-1.0, 1.0, 78), [1.9, 2.0]])


def _v0(n, seed=1, dtype=F64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_defaults_are_the_largest_eigenvalue_tol_1e3_and_20_steps():
    mv, count = spectrum_matvec(SLOW)
    default = lanczos_extreme(mv, _v0(len(SLOW)))
    explicit = lanczos_extreme(mv, _v0(len(SLOW)), "LA", tol=1e-3, max_steps=20)
    assert (default.value, default.steps, default.converged) == (explicit.value, explicit.steps, explicit.converged)
    assert default.value > 1.0                          # the top of the spectrum, not its bottom (-1)
    # tol = 1e-3 stops earlier than a tight tolerance, and no later than 20 products
    tight = lanczos_extreme(mv, _v0(len(SLOW)), "LA", tol=1e-12, max_steps=200)
    assert default.steps < tight.steps
    assert default.steps <= 20
    capped = lanczos_extreme(mv, _v0(len(SLOW)), tol=1e-14)   # cannot converge in the default 20 steps
    assert capped.steps == 20 and capped.converged is False


def test_an_unconverged_run_returns_its_current_ritz_pair():
    evals = np.linspace(0.0, 1.0, 50)
    mv, _ = spectrum_matvec(evals)
    short = lanczos_extreme(mv, _v0(50), "LA", tol=1e-12, max_steps=3)
    assert short.converged is False and short.steps == 3
    assert isinstance(short.value, float) and 0.0 < short.value <= 1.0 + 1e-12
    v = short.vector
    assert v.dtype == F64 and v.shape == (50,) and abs(float(v.norm()) - 1.0) < 1e-12
    assert short.value == pytest.approx(float(v @ mv(v)), rel=1e-12)   # the Ritz value is v's Rayleigh quotient


def test_float32_start_vectors_and_products_are_computed_in_float64():
    evals = np.array([-2.0, 0.5, 1.0, 3.0])
    mv64, _ = spectrum_matvec(evals)

    def mv32(v):                                         # a float32 model's Hessian product
        return mv64(v.to(F64)).to(torch.float32)

    res = lanczos_extreme(mv32, _v0(4, dtype=torch.float32), "LA", tol=1e-6, max_steps=10)
    assert res.converged and res.vector.dtype == F64
    assert res.value == pytest.approx(3.0, rel=1e-5)


def test_the_start_vector_may_be_small_but_not_zero():
    evals = np.array([1.0, 2.0, 4.0])
    mv, _ = spectrum_matvec(evals)
    tiny = lanczos_extreme(mv, 1e-3 * _v0(3), "LA", tol=1e-10, max_steps=10)
    assert tiny.converged and tiny.value == pytest.approx(4.0, rel=1e-10)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos_extreme(mv, torch.zeros(3, dtype=F64))

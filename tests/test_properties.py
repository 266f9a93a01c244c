"""Property-based tests: each property is the specification, checked on inputs hypothesis draws.

* curve coefficients: a partition of unity, Bernstein polynomials (Bezier) or
  hat functions (PolyChain) computed by hand in float64, endpoints hit exactly;
* barriers (README definitions): what a linear profile, a shifted or scaled
  profile, and a profile with a known bump must give;
* a random permutation of any zoo model computes the same function, and its
  inverse gives back the identical state dict;
* the line between a network and itself is flat.

Runs are short and derandomized (fixed examples), so CI sees the same inputs
every time.
"""
import copy
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modeconn as mc

# derandomize: the same examples on every run; database=None: nothing written to .hypothesis/
FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)
SLOW = settings(max_examples=12, deadline=None, derandomize=True, database=None)

FAMILIES = {"bezier": mc.Bezier, "polychain": mc.PolyChain}
unit = st.floats(0.0, 1.0, allow_nan=False)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ curve coefficients
def _bernstein(n, t):
    """B_k^n(t) = C(n, k) t^k (1-t)^(n-k), k = 0..n, in Python (float64) arithmetic."""
    return [math.comb(n, k) * t ** k * (1 - t) ** (n - k) for k in range(n + 1)]


def _hats(n, t):
    """Hat functions on the knots k/n: max(0, 1 - |n t - k|)."""
    return [max(0.0, 1 - abs(n * t - k)) for k in range(n + 1)]


def _coef(curve, ts):
    return curve.coefficients(torch.tensor(ts, dtype=torch.float64))


@FAST
@given(family=st.sampled_from(sorted(FAMILIES)), K=st.integers(2, 7), t=unit)
def test_coefficients_are_the_hand_formula_and_a_partition_of_unity(family, K, t):
    curve = FAMILIES[family](K)
    c = _coef(curve, t)
    assert c.shape == (K,) and c.dtype == torch.float64
    hand = _bernstein(K - 1, t) if family == "bezier" else _hats(K - 1, t)
    assert torch.allclose(c, torch.tensor(hand, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(c.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((c >= 0).all())
    # both families reproduce linear functions: sum_k c_k(t) k/(K-1) = t (the linear start is uniform)
    assert float(c @ torch.linspace(0, 1, K, dtype=torch.float64)) == pytest.approx(t, abs=1e-12)
    if family == "polychain":  # a point of a chain lies on one segment: at most two adjacent bends
        nz = torch.nonzero(c).flatten().tolist()
        assert 1 <= len(nz) <= 2 and (len(nz) == 1 or nz[1] == nz[0] + 1)


@FAST
@given(family=st.sampled_from(sorted(FAMILIES)), K=st.integers(2, 7),
       ts=st.lists(unit, min_size=1, max_size=12))
def test_a_batch_of_t_is_the_rows_of_single_t(family, K, ts):
    curve = FAMILIES[family](K)
    batch = _coef(curve, ts)
    assert batch.shape == (len(ts), K)
    for i, t in enumerate(ts):
        assert torch.equal(batch[i], _coef(curve, t))
    assert torch.allclose(batch.sum(1), torch.ones(len(ts), dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("K", range(2, 8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficients_hit_the_endpoints_exactly(family, K, dtype):
    curve = FAMILIES[family](K)
    eye = torch.eye(K, dtype=dtype)
    assert torch.equal(curve.coefficients(torch.tensor(0.0, dtype=dtype)), eye[0])
    assert torch.equal(curve.coefficients(torch.tensor(1.0, dtype=dtype)), eye[K - 1])
    assert torch.equal(curve.coefficients(torch.tensor([1.0, 0.0], dtype=dtype)), eye[[K - 1, 0]])
    if family == "polychain":  # a chain passes through every bend, at t = k/(K-1)
        for k in range(K):
            assert torch.allclose(_coef(curve, k / (K - 1)), eye[k].double(), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------ barriers
REFS = ("interp", "mean", "max")
# grids always hold t = 0 and t = 1; inner points on a 1/1000 lattice keep them apart
grids = st.lists(st.integers(1, 999), max_size=30, unique=True).map(
    lambda inner: np.array([0.0, *sorted(i / 1000 for i in inner), 1.0]))
level = st.floats(-1e3, 1e3, allow_nan=False)


def _height(ts, values, ref):
    return mc.barrier(ts, values, ref)[0]


@FAST
@given(ts=grids, alpha=level, beta=level)
def test_barriers_of_a_linear_profile(ts, alpha, beta):
    """M(t) = α + βt. interp: M equals its own chord, 0. max: the maximum of a line over a grid
    holding both ends sits at an end, 0. mean: max(M0, M1) - (M0 + M1)/2 = |M1 - M0| / 2."""
    values = alpha + beta * ts
    tol = 1e-9 * (1 + abs(alpha) + abs(beta))
    assert _height(ts, values, "interp") == pytest.approx(0.0, abs=tol)
    assert _height(ts, values, "max") == pytest.approx(0.0, abs=tol)
    assert _height(ts, values, "mean") == pytest.approx(abs(values[-1] - values[0]) / 2, abs=tol)


@FAST
@given(ts=grids, data=st.data(), shift=level, scale=st.floats(1e-3, 1e3))
def test_barriers_ignore_a_constant_and_scale_with_the_metric(ts, data, shift, scale):
    values = np.array(data.draw(st.lists(level, min_size=len(ts), max_size=len(ts))))
    tol = 1e-9 * (1 + np.abs(values).max() + abs(shift))
    for ref in REFS:
        h = _height(ts, values, ref)
        assert _height(ts, values + shift, ref) == pytest.approx(h, abs=tol)
        assert _height(ts, scale * values, ref) == pytest.approx(scale * h, abs=tol * scale)
    # orderings that follow from the definitions on a grid holding both ends:
    # interp >= 0 and max >= 0 (t = 0 is a candidate); interp, mean >= max (their references are <= max(M0, M1))
    hi, hm, hx = (_height(ts, values, r) for r in REFS)
    assert hi >= -tol and hx >= -tol and hi >= hx - tol and hm >= hx - tol


@FAST
@given(ts=grids.filter(lambda g: len(g) > 2), data=st.data(), alpha=level, beta=level,
       height=st.floats(1e-2, 1e3))
def test_interp_barrier_of_a_known_bump_is_its_height(ts, data, alpha, beta, height):
    """A hat of the given height centred on an inner grid point, vanishing at both ends,
    on top of any line: the interp barrier is the hat's height, at its centre."""
    centre = data.draw(st.sampled_from(list(ts[1:-1])))
    width = data.draw(st.floats(1e-3, 1.0)) * min(centre, 1 - centre)
    bump = np.maximum(0.0, 1 - np.abs(ts - centre) / width)
    values = alpha + beta * ts + height * bump
    h, t = mc.barrier(ts, values, "interp")
    assert h == pytest.approx(height, abs=1e-9 * (1 + abs(alpha) + abs(beta) + height))
    assert t == centre


# ------------------------------------------------------------ permutations of the zoo
ZOO = {  # small instances of every registered model: (input shape, kwargs)
    "mlp": ((6,), dict(depth=2, width=8)),
    "convnet": ((3, 8, 8), dict(width=4)),
    "convnet_bn": ((3, 8, 8), dict(width=4)),
    "preresnet": ((3, 8, 8), dict(depth=8)),
    "vgg11": ((3, 16, 16), dict(width_multiplier=0.0625)),
    "vgg11_bn": ((3, 16, 16), dict(width_multiplier=0.0625)),
    "vgg16": ((3, 16, 16), dict(width_multiplier=0.0625)),
    "vgg16_bn": ((3, 16, 16), dict(width_multiplier=0.0625)),
    "wide_resnet": ((3, 8, 8), dict(depth=10, widen_factor=1)),
    "cnn1d": ((2, 12), dict(width=3, bn=True)),
    "vit": ((1, 8, 8), dict(hidden=8, mlp=12, patch=4)),
    "gpt": ((6,), dict(vocab=5, dim=8, mlp=12)),
}


def test_the_zoo_table_covers_every_registered_model():
    assert sorted(ZOO) == mc.list_models()


@functools.lru_cache(maxsize=None)
def _zoo_model(name):
    """(model in eval mode, float64, with non-trivial BN, its spec, an input batch); built once per name."""
    shape, kwargs = ZOO[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = mc.create_model(name, shape, 5, **kwargs).double().eval()
    with torch.no_grad():  # BN statistics and affine parameters away from 0/1, so misplaced ones show
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen, dtype=torch.float64))
                m.weight.copy_(1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.5 * torch.randn(n, generator=gen, dtype=torch.float64))
    if "vocab" in kwargs:  # token ids
        x = torch.randint(0, kwargs["vocab"], (4, *shape), generator=gen)
    else:
        x = torch.randn(4, *shape, generator=gen, dtype=torch.float64)
    spec = mc.infer_permutation_spec(model, x[:1])
    return model, spec, x


@pytest.mark.parametrize("name", sorted(ZOO))
@SLOW
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_a_random_permutation_computes_the_same_function(name, seed):
    model, spec, x = _zoo_model(name)
    sd = model.state_dict()
    perm = spec.random_permutation(seed)
    permuted = mc.apply_permutation(model, spec, perm)
    psd = permuted.state_dict()
    assert any(not torch.equal(psd[k], sd[k]) for k in spec.covered())  # something really moved
    with torch.no_grad():
        y, yp = model(x), permuted(x)
    assert torch.allclose(yp, y, rtol=0, atol=1e-10 * max(1.0, float(y.abs().max())))

    inverse = {g: torch.argsort(p) for g, p in perm.items()}
    back = mc.apply_permutation(psd, spec, inverse)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


# ------------------------------------------------------------------- a flat line
def _plain_metrics(model, loader):
    """Mean cross-entropy and accuracy of one model, by a plain loop over the batches."""
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += float(torch.nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return loss / n, correct / n


@pytest.mark.parametrize("name", ["mlp", "convnet_bn"])
@SLOW
@given(seed=st.integers(0, 2 ** 31 - 1), ts=grids.filter(lambda g: len(g) <= 8))
def test_the_line_from_a_network_to_itself_is_flat(name, seed, ts):
    """Every metric is the same at every t, equal to the network's own (BN recomputed over the
    train data when it has BN); the line has length 0."""
    shape, kwargs = ZOO[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = mc.create_model(name, shape, 3, **kwargs).eval()
    train = mc.TensorLoader(torch.randn(40, *shape, generator=gen), torch.randint(0, 3, (40,), generator=gen), 16)
    test = mc.TensorLoader(torch.randn(24, *shape, generator=gen), torch.randint(0, 3, (24,), generator=gen), 10)
    res = mc.evaluate_path(mc.linear_path(net, net), train, test, ts=ts)
    assert res.bn_recomputed == mc.has_batchnorm(net)
    reference = mc.recompute_bn(copy.deepcopy(net), train).eval()
    want = dict(zip(("train_loss", "train_acc"), _plain_metrics(reference, train)))
    want.update(zip(("test_loss", "test_acc"), _plain_metrics(reference, test)))
    want.update(train_nll=want["train_loss"], test_nll=want["test_loss"],
                train_error=1 - want["train_acc"], test_error=1 - want["test_acc"])
    for metric, value in want.items():
        got = np.asarray(getattr(res, metric))
        assert got.shape == ts.shape
        assert np.abs(got - got[0]).max() <= 1e-6, metric          # flat along t
        assert got[0] == pytest.approx(value, rel=1e-5, abs=1e-6), metric  # and the network's own value
    assert np.abs(res.segment_lengths).max() <= 1e-6 and res.arc_length[-1] <= 1e-5

"""training_weights (fit_curve's and fit_simplex's step): θ per parameter, weight decay inside its backward.

Checked against the plain autograd formula in float64 (loss <θ, g> + 0.5·wd·||θ||²
through ``flat_weights_at``), for one, several and all-free bends; and the
memory it reuses from step to step is never memory a live tensor still uses.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modeconn as mc


def _curve(fix_start, fix_end, num_bends):
    torch.manual_seed(0)
    a, b = (mc.create_model("convnet", (1, 8, 8), 10, width=4, bn=True).double() for _ in range(2))
    curve = mc.CurveModel(a, a, b, mc.Bezier(num_bends), fix_start=fix_start, fix_end=fix_end, init="random")
    return curve


@pytest.mark.parametrize("fix_start, fix_end, num_bends, wd", [(True, True, 3, 5e-4), (True, False, 4, 0.02),
                                                               (False, False, 4, 0.0)])
def test_training_weights_values_and_gradient(fix_start, fix_end, num_bends, wd):
    curve = _curve(fix_start, fix_end, num_bends)
    t = torch.tensor(0.37, dtype=torch.float64)
    g = {n: torch.randn(s, dtype=torch.float64) for n, s in zip(curve.layout.names, curve.layout.shapes)}
    used = curve.layout.names[1:]  # the first parameter gets no gradient from the loss: only its decay
    weights = curve.training_weights(t, wd)
    sum((weights[n] * g[n]).sum() for n in used).backward()
    fast = curve.free_bends.grad.clone()
    curve.free_bends.grad = None
    ref = curve.weights_at(t)
    (sum((ref[n] * g[n]).sum() for n in used) + 0.5 * wd * sum(v.pow(2).sum() for v in ref.values())).backward()
    for n in curve.layout.names:
        assert torch.allclose(weights[n], ref[n], rtol=1e-12, atol=1e-14), n
    assert torch.allclose(fast, curve.free_bends.grad, rtol=1e-10, atol=1e-14)
    assert fast.shape == (len(curve.free_idx), curve.num_parameters)


def test_training_weights_equal_the_autograd_formula_on_a_network_step():
    curve = _curve(True, True, 3)
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (5,))
    t = torch.tensor(0.6, dtype=torch.float64)
    out = curve.forward_weights(x, curve.training_weights(t, 5e-4))
    F.cross_entropy(out, y).backward()
    fast = curve.free_bends.grad.clone()
    curve.free_bends.grad = None
    theta = curve.flat_weights_at(t)
    ref = curve.forward_flat(x, theta)
    (F.cross_entropy(ref, y) + 0.5 * 5e-4 * theta.pow(2).sum()).backward()
    assert torch.allclose(out, ref, rtol=1e-12) and torch.allclose(fast, curve.free_bends.grad, rtol=1e-10)


def test_reused_memory_is_never_memory_in_use():
    curve = _curve(True, True, 3).float()
    opt = torch.optim.SGD([curve.free_bends], lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))

    def step(t):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(curve.forward_weights(x, curve.training_weights(torch.tensor(t), 5e-4)), y).backward()
        opt.step()
        return curve.free_bends.grad

    first = step(0.2).data_ptr()
    assert step(0.3).data_ptr() == first  # the dropped gradient's memory is used again
    held = step(0.4)
    kept = held.clone()
    step(0.5)
    assert curve.free_bends.grad.data_ptr() != held.data_ptr() and torch.equal(held, kept)
    # θ of a step whose tensors are alive is not overwritten by the next point
    w1 = curve.training_weights(torch.tensor(0.1))
    w1_copy = {n: v.clone() for n, v in w1.items()}
    w2 = curve.training_weights(torch.tensor(0.9))
    for n in w1:
        assert torch.equal(w1[n], w1_copy[n]) and not torch.equal(w1[n], w2[n])


def test_simplex_training_weights_match_the_autograd_formula():
    torch.manual_seed(0)
    modes = [nn.Linear(4, 3).double() for _ in range(3)]
    cx = mc.SimplexModel.connecting(modes[0], modes, free_vertices=1)
    c = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=torch.float64)[: cx.num_bends]
    c = c / c.sum()
    w = cx.training_weights(c, 0.01)
    flat = cx.flat_weights_at(c)
    assert all(torch.allclose(w[n], v) for n, v in cx.unflatten(flat).items())
    sum(v.sum() for v in w.values()).backward()
    fast = cx.free_bends.grad.clone()
    cx.free_bends.grad = None
    (flat.sum() + 0.5 * 0.01 * flat.pow(2).sum()).backward()
    assert torch.allclose(fast, cx.free_bends.grad)

"""Layer-wise barriers (Adilova et al. 2024), parameter groups and per-module curvature (Hessian blocks)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import modeconn as mc
from modeconn.data import TensorLoader
from modeconn.evaluation.model import evaluate

from conftest import CKPT, ROOT


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return TensorLoader(torch.randn(80, 4, generator=gen), torch.randint(0, 3, (80,), generator=gen), batch_size=40)


def test_parameter_groups():
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3)), nn.Linear(3, 1))
    assert list(mc.parameter_groups(net, "module")) == ["0.0", "0.2", "1"]
    assert mc.parameter_groups(net, "block") == {"0": ["0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias"],
                                                 "1": ["1.weight", "1.bias"]}
    assert len(mc.parameter_groups(net, "parameter")) == 6
    with pytest.raises(ValueError, match="two groups"):
        mc.parameter_groups(net, {"x": ["1.weight"], "y": ["1.weight"]})
    with pytest.raises(ValueError, match="not a trainable parameter"):
        mc.parameter_groups(net, {"x": ["nope"]})
    with pytest.raises(ValueError, match="unknown grouping"):
        mc.parameter_groups(net, "layer")


def test_identical_endpoints_have_no_layer_barrier(data):
    a = _mlp(1)
    res = mc.layerwise_barriers(a, _mlp(1), data, data, num_points=5)
    for cumulative in (False, True):
        for metric in ("test_loss", "train_error"):
            assert all(v == 0.0 for v in res.barriers(metric, cumulative=cumulative).values())


def test_all_groups_at_once_is_the_straight_line(data):
    a, b = _mlp(1), _mlp(2)
    res = mc.layerwise_barriers(a, b, data, data, "block", num_points=7)
    line = mc.evaluate_path(mc.linear_path(a, b), data, data, num_points=7)
    last = res.cumulative[list(res.groups)[-1]]
    assert np.allclose(last["test_loss"], line.test_loss, atol=1e-6)
    assert list(res.barriers(cumulative=True).values())[-1] == pytest.approx(line.barrier("test_loss"), abs=1e-6)


@pytest.mark.parametrize("base", ["a", "b"])
def test_one_group_path_is_the_hand_built_hybrid(data, base):
    a, b = _mlp(1), _mlp(2)
    res = mc.layerwise_barriers(a, b, data, data, "module", base=base, ts=[0.0, 0.25, 1.0], cumulative=False)
    for t_i, t in enumerate([0.0, 0.25, 1.0]):
        hybrid = _mlp(1 if base == "a" else 2)
        with torch.no_grad():
            hybrid[2].weight.copy_((1 - t) * a[2].weight + t * b[2].weight)
            hybrid[2].bias.copy_((1 - t) * a[2].bias + t * b[2].bias)
        assert res.single["2"]["test_loss"][t_i] == pytest.approx(evaluate(hybrid, data)["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="cumulative"):
        res.barriers(cumulative=True)


def test_restricted_hessian_is_the_block_of_the_dense_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    names = [n for n, _ in net.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(flat):
        params, i = {}, 0
        for n, p in net.named_parameters():
            params[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y)
    dense = torch.autograd.functional.hessian(loss, flat0)
    res = mc.module_curvature(net, [(x, y)], "module", tol=1e-10, trace_samples=400, dtype=torch.float64)
    lo = 0
    for r in res:
        block = dense[lo:lo + r.num_params, lo:lo + r.num_params]
        lo += r.num_params
        eig = torch.linalg.eigvalsh(block)
        assert r.lambda_max == pytest.approx(float(eig[-1]), abs=1e-7)
        assert r.lambda_min == pytest.approx(float(eig[0]), abs=1e-7)
        assert abs(r.trace - float(block.trace())) < 4 * r.trace_stderr + 1e-12
        v = torch.randn(r.num_params, dtype=torch.float64)
        hv = mc.geometry.hessian.hessian_vector_product(net, None, [(x, y)], v, param_names=r.params)
        assert torch.allclose(hv, block @ v, atol=1e-10)
    assert lo == len(flat0) and [r.group for r in res] == ["0", "2"] and names[0] in res[0].params


def _run(*args):
    return subprocess.run([sys.executable, "-m", "modeconn.eval_curve", *args, "--no-progress"], capture_output=True,
                          text=True, cwd=ROOT)


def test_eval_curve_per_layer_and_repair(tmp_path):
    out = tmp_path / "why"
    proc = _run("--a", str(CKPT / "digits_mlp_a.pt"), "--b", str(CKPT / "digits_mlp_b.pt"), "--num-points", "3",
                "--repair", "--per-layer", "--layer-points", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    layers, path = json.loads((out / "layers.json").read_text()), json.loads((out / "path.json").read_text())
    assert list(layers["groups"]) == ["layers.0", "layers.2", "layers.4"]
    # the last cumulative path is the plain straight line evaluated beside the repaired one
    assert np.allclose(layers["cumulative"]["layers.4"]["test_loss"], path["linear"]["test_loss"], atol=1e-6)
    assert path["name"] == "repair" and (out / "layers.png").stat().st_size > 0
    assert "layer-wise test-loss barriers" in proc.stdout
    curve_err = _run("--ckpt", str(out / "path.json"), "--repair")
    assert curve_err.returncode == 2 and "--a A.pt --b B.pt" in curve_err.stderr


def test_why_barrier_experiment_quick(tmp_path):
    """The experiment's smoke mode: every number written, consistent between the JSON and the markdown."""
    proc = subprocess.run([sys.executable, "experiments/why_barrier.py", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "why_barrier.json").read_text())
    assert sorted(res["runs"]) == ["convnet_1_2", "mlp_1_2"]
    for run in res["runs"].values():
        assert set(run["barriers"]) == {"unaligned", "aligned", "aligned+REPAIR"}
        # the last cumulative layer-wise path is the straight line itself
        for which in ("unaligned", "aligned"):
            last = list(run["layerwise"][which]["cumulative"].values())[-1]
            assert last == pytest.approx(run["barriers"][which]["test_loss"], abs=1e-5)
    md = (tmp_path / "why_barrier.md").read_text()
    assert f"{res['runs']['mlp_1_2']['barriers']['aligned']['test_loss']:.3f}" in md
    assert (tmp_path / "why_barrier.png").stat().st_size > 0

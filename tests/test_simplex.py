"""Simplexes and mode-connecting complexes: points, sampling, volume, training, evaluation, commands."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import modeconn as mc
from modeconn import eval_simplex, train_simplex
from modeconn.evaluation.model import evaluate
from modeconn.evaluation.simplex import complex_grid, mode_pairs
from modeconn.plots.simplex import plot_simplex

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 24


def _mlp(seed):
    torch.manual_seed(seed)
    return mc.create_model("mlp", (1, 8, 8), 10, width=WIDTH)


@pytest.fixture(scope="module")
def digit_modes():
    """Three digits MLPs trained from different seeds (tiny: a few seconds in all)."""
    ds = mc.get_dataset("digits")
    modes = []
    for seed in (1, 2, 3):
        net = _mlp(seed)
        mc.train_model(net, ds.train_loader(64, seed=seed), epochs=8, lr=0.05, seed=seed)
        modes.append(net.eval())
    return modes


@pytest.fixture(scope="module")
def mode_files(digit_modes, tmp_path_factory):
    d = tmp_path_factory.mktemp("modes")
    return [str(mc.save_model(d / f"m{k}.pt", net, "mlp", {"width": WIDTH}, (1, 8, 8), 10, dataset="digits", seed=k))
            for k, net in enumerate(digit_modes)]


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


# ------------------------------------------------------------------ points
def test_fixed_simplex_is_exactly_its_vertices():
    nets = [_bn_net(s) for s in range(3)]
    tri = mc.SimplexModel(nets[0], nets).eval()
    x = torch.randn(7, 4)
    for k, net in enumerate(nets):
        e = torch.zeros(3)
        e[k] = 1.0
        assert torch.equal(tri.flat_weights_at(e, simplex=0), tri.layout.flatten(net))
        vertex = tri.point(e, simplex=0)                # the vertex's own BN statistics come along
        assert torch.equal(vertex(x), net(x))
        assert torch.equal(vertex[1].running_mean, net[1].running_mean)
    assert tri.free_idx == [] and tri.fixed_idx == [0, 1, 2]


def test_point_is_linear_in_alpha_and_placed_on_its_simplex():
    nets = [nn.Linear(5, 3).double() for _ in range(5)]
    cplx = mc.SimplexModel.connecting(nets[0], nets[:3], free_vertices=2, init="random", seed=4)
    assert cplx.simplexes == [(0, 3, 4), (1, 3, 4), (2, 3, 4)]
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    v = cplx.bends_by_name()["weight"]
    w = cplx.weights_at(alpha, simplex=1)["weight"]
    assert torch.allclose(w, 0.2 * nets[1].weight + 0.5 * v[3] + 0.3 * v[4], atol=1e-12, rtol=0)
    c = cplx.coefficients(alpha, simplex=1)
    assert c.tolist() == [0.0, 0.2, 0.0, 0.5, 0.3]
    assert torch.allclose(cplx.flat_weights_at(c), cplx.flat_weights_at(alpha, simplex=1), atol=1e-12, rtol=0)
    # the free vertices start where asked: a fresh initialisation each, not at the modes
    assert not torch.equal(v[3], v[4])


def test_mean_init_puts_free_vertices_at_the_modes_mean():
    nets = [nn.Linear(3, 2) for _ in range(3)]
    cplx = mc.SimplexModel.connecting(nets[0], nets, free_vertices=1)
    mean = sum(n.weight.detach() for n in nets) / 3
    assert torch.allclose(cplx.bends_by_name()["weight"][3], mean, atol=1e-7)


# --------------------------------------------------------------- sampling
def test_dirichlet_one_is_uniform_on_the_simplex():
    g = torch.Generator().manual_seed(123)
    alpha = mc.uniform_simplex(3, g, num_samples=20000).numpy()
    # the marginal of one coordinate of a uniform point of the 2-simplex is Beta(1, 2)
    assert stats.kstest(alpha[:, 0], stats.beta(1, 2).cdf).pvalue > 0.01
    assert abs(alpha[:, 1].mean() - 1 / 3) < 0.01 and abs(alpha[:, 2].var() - 1 / 18) < 0.003
    # uniform: P(α_0 > 1/2) is the area share of the corner triangle, (1/2)^2
    assert abs((alpha[:, 0] > 0.5).mean() - 0.25) < 0.015
    again = mc.uniform_simplex(3, torch.Generator().manual_seed(123), num_samples=20000).numpy()
    assert np.array_equal(alpha, again)


def test_complex_samples_each_simplex_equally():
    nets = [nn.Linear(2, 2) for _ in range(3)]
    cplx = mc.SimplexModel.connecting(nets[0], nets, free_vertices=1)
    g = torch.Generator().manual_seed(0)
    draws = [cplx.sample(g) for _ in range(3000)]
    counts = np.bincount([i for i, _ in draws], minlength=3)
    assert stats.chisquare(counts).pvalue > 0.01
    for i, c in draws[:50]:   # support on the drawn simplex only, a point of the probability simplex
        assert set(torch.nonzero(c).flatten().tolist()) <= set(cplx.simplexes[i])
        assert abs(float(c.sum()) - 1) < 1e-6


# ----------------------------------------------------------------- volume
def test_log_volume_matches_hand_computed_volumes():
    unit = torch.zeros(4, 6, dtype=torch.float64)      # 0, e1, e2, e3 in R^6: volume 1/3! = 1/6
    unit[1, 0] = unit[2, 1] = unit[3, 2] = 1.0
    assert math.isclose(float(mc.core.simplex.simplex_log_volume(unit).exp()), 1 / 6, rel_tol=1e-12)
    nets = [nn.Linear(3, 2).double() for _ in range(3)]
    tri = mc.SimplexModel(nets[0], nets)
    p = [tri.layout.flatten(n) for n in nets]
    a, b, c = (float((p[i] - p[j]).norm()) for i, j in ((0, 1), (1, 2), (0, 2)))
    s = (a + b + c) / 2
    heron = math.sqrt(s * (s - a) * (s - b) * (s - c))
    assert math.isclose(float(tri.log_volume(0).exp()), heron, rel_tol=1e-9)


def test_volume_regulariser_enlarges_the_simplex():
    ds = mc.get_dataset("digits")
    nets = [_mlp(s) for s in (1, 2, 3)]

    def fitted(reg):   # a triangle with one free vertex: −λ log(area) pushes it away from the fixed edge
        tri = mc.SimplexModel(nets[0], nets, fixed=[0, 1])
        start = float(tri.log_volume(0).detach())
        hist = mc.fit_simplex(tri, ds.train_loader(128, seed=0), epochs=2, lr=0.05, volume_reg=reg)
        assert math.isclose(hist[-1]["log_volume"], float(tri.log_volume(0).detach()))
        return hist[-1]["log_volume"] - start

    assert fitted(1.0) > fitted(0.0) + 0.05


# ------------------------------------------------------------ evaluation
def test_grid_and_chains_of_a_complex():
    coords, members = complex_grid([(0, 3, 4), (1, 3, 4), (2, 3, 4)], 5, 4)
    assert [len(m) for m in members] == [15, 15, 15]        # C(4 + 2, 2) each
    assert len(coords) == 3 * 15 - 2 * 5                    # the shared edge v3-v4 (5 points) once
    assert np.allclose(coords.sum(1), 1.0)
    nets = [nn.Linear(2, 2) for _ in range(3)]
    cplx = mc.SimplexModel.connecting(nets[0], nets, free_vertices=2, init="random")
    assert mode_pairs(cplx) == {"0-1": [0, 3, 4, 1], "0-2": [0, 3, 4, 2], "1-2": [1, 3, 4, 2]}


def test_complex_beats_the_triangle_of_straight_lines(digit_modes, digits):
    cplx = mc.SimplexModel.connecting(digit_modes[0], digit_modes, free_vertices=1)
    mc.fit_simplex(cplx, digits.train_loader(64, seed=0), epochs=6, lr=0.05, seed=0)
    train, test = digits.eval_loader("train"), digits.eval_loader("test")
    res = mc.evaluate_simplex(cplx, train, test, resolution=8, num_path_points=9, with_linear=True)
    worst_line = max(float(p.linear.test_loss.max()) for p in res.paths.values())
    assert res.worst("test_loss")["value"] < worst_line
    for k, net in enumerate(digit_modes):   # the grid's vertices are the modes, evaluated independently
        assert math.isclose(res.vertex_values("test_loss")[k], evaluate(net, test)["loss"], rel_tol=1e-5)
        chain = res.paths[f"{k}-{(k + 1) % 3}" if k < 2 else "0-2"]
        assert set(np.round(chain.test_loss[[0, -1]], 5)) <= set(np.round(res.vertex_values("test_loss"), 5))
    assert res.barrier("test_loss", "max") == res.worst("test_loss")["value"] - res.vertex_values("test_loss").max()


def test_simplex_ensemble_members_are_the_sampled_points():
    nets = [_bn_net(s) for s in range(3)]
    tri = mc.SimplexModel(nets[0], nets)
    data = mc.TensorLoader(torch.randn(40, 4), torch.randint(0, 3, (40,)), batch_size=20)
    members = mc.simplex_ensemble(tri, 4, seed=7, bn_loader=data)
    g = torch.Generator().manual_seed(7)
    for m in members:
        _, c = tri.sample(g)
        assert torch.equal(tri.layout.flatten(m), tri.flat_weights_at(c))
        by_hand = mc.recompute_bn(tri.point(c), data)     # BN statistics recomputed for this sample
        assert torch.allclose(m[1].running_mean, by_hand[1].running_mean)
    res = mc.evaluate_ensemble(members, data)
    assert len(res.member_acc) == 4 and res.nll[-1] <= res.member_nll.mean()


# --------------------------------------------------------------- commands
def _train_args(mode_files, *extra):
    return ["--modes", *mode_files, "--free-vertices", "1", "--epochs", "3", "--lr", "0.05", "--volume-reg", "0.01",
            "--batch-size", "128", "--no-progress", "--device", "cpu", *extra]


def test_train_simplex_resume_is_identical_and_eval_writes_files(mode_files, tmp_path, interrupt_after_epoch):
    assert train_simplex.main(_train_args(mode_files, "--out", str(tmp_path / "full"))) == 0
    interrupt_after_epoch.arm(2)
    part = tmp_path / "part"
    assert train_simplex.main(_train_args(mode_files, "--out", str(part))) == 130
    interrupt_after_epoch.disarm()
    assert train_simplex.main(_train_args(mode_files, "--out", str(part), "--resume")) == 0
    full, _ = mc.load_simplex(tmp_path / "full" / "simplex.pt")
    resumed, meta = mc.load_simplex(part / "simplex.pt")
    assert torch.equal(full.bends, resumed.bends) and resumed.simplexes == [(0, 3), (1, 3), (2, 3)]
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3] and meta["config"]["volume_reg"] == 0.01

    out = tmp_path / "eval"
    assert eval_simplex.main(["--ckpt", str(part / "simplex.pt"), "--resolution", "4", "--num-path-points", "5",
                              "--ensemble-samples", "3", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    data = json.loads((out / "simplex.json").read_text())
    assert len(data["coords"]) == 3 * 5 - 2 and sorted(data["paths"]) == ["0-1", "0-2", "1-2"]
    assert data["ensemble"]["sampled_final"]["members"] == 3 and data["ensemble"]["modes_final"]["members"] == 3
    assert len((out / "simplex.csv").read_text().splitlines()) == 1 + 3 * 5
    assert (out / "simplex.png").stat().st_size > 1000


def test_picture_of_two_simplexes_face_by_face(tmp_path):
    nets = [nn.Linear(4, 3) for _ in range(3)]
    cplx = mc.SimplexModel.connecting(nets[0], nets, free_vertices=3, init="random")
    data = mc.TensorLoader(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=16)
    res = mc.evaluate_simplex(cplx, data, data, resolution=3, paths=False)
    assert plot_simplex(res, tmp_path / "s.png").stat().st_size > 1000


def test_bad_input_gives_clear_errors(mode_files, tmp_path, capsys):
    nets = [nn.Linear(3, 2) for _ in range(2)]
    with pytest.raises(ValueError, match="at least 2 modes"):
        mc.SimplexModel.connecting(nets[0], nets[:1])
    with pytest.raises(ValueError, match="free_vertices"):
        mc.SimplexModel.connecting(nets[0], nets, free_vertices=0)
    with pytest.raises(ValueError, match="architectures differ at parameter 'weight'"):
        mc.SimplexModel.connecting(nets[0], [nets[0], nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="sum to 1"):
        mc.SimplexModel(nets[0], nets).weights_at([0.5, 0.6], simplex=0)
    with pytest.raises(ValueError, match="every vertex is fixed"):
        mc.fit_simplex(mc.SimplexModel(nets[0], nets), [], epochs=1)
    with pytest.raises(ValueError, match="degenerate"):
        mc.fit_simplex(mc.SimplexModel.connecting(nets[0], nets, free_vertices=2), [], epochs=1, volume_reg=0.1)

    out = str(tmp_path / "bad")
    assert train_simplex.main(_train_args(mode_files[:1], "--out", out)) == 2
    assert "--modes needs at least 2" in capsys.readouterr().err
    narrow = mc.create_model("mlp", (1, 8, 8), 10, width=8)
    other = mc.save_model(tmp_path / "w.pt", narrow, "mlp", {"width": 8}, (1, 8, 8), 10, dataset="digits")
    assert train_simplex.main(_train_args([mode_files[0], str(other)], "--out", out)) == 2
    err = capsys.readouterr().err
    assert "differs from" in err and "arch_kwargs" in err
    args = _train_args(mode_files, "--out", out)
    args[args.index("--free-vertices") + 1] = "0"
    assert train_simplex.main(args) == 2
    assert "--free-vertices: need at least 1, got 0" in capsys.readouterr().err

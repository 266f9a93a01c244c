"""What users read from an ensemble: the plain-data result, members loaded from files, frozen members.

Written from mutmut's survivors in evaluation/ensembles.py (tests/MUTATION.md): the JSON that
``fge``/``eval_curve --ensemble`` write was never compared with the metrics it reports, members loaded
through a template were never checked to be independent copies, and a one-sample simplex ensemble
was never asked for.
"""
import torch
import torch.nn.functional as F
from torch import nn

import pytest

from modeconn.core.simplex import SimplexModel
from modeconn.data import TensorLoader
from modeconn.evaluation.ensembles import evaluate_ensemble, frozen, load_members, simplex_ensemble
from modeconn.runtime.checkpoints import save_model


def _nets(k=3, seed=0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(k)]


def test_to_dict_lists_every_prefix_and_member_with_its_own_metrics():
    torch.manual_seed(1)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    nets = _nets()
    d = evaluate_ensemble(nets, TensorLoader(x, y, 16), num_bins=7).to_dict()
    assert d["n"] == 40 and d["num_bins"] == 7
    assert set(d) == {"n", "num_bins", "ensemble", "members"}
    with torch.no_grad():
        probs = [F.softmax(m(x).double(), 1) for m in nets]
    assert [e["members"] for e in d["ensemble"]] == [1, 2, 3]
    assert [m["index"] for m in d["members"]] == [0, 1, 2]
    for k, entry in enumerate(d["ensemble"]):
        mean = torch.stack(probs[:k + 1]).mean(0)
        acc = float((mean.argmax(1) == y).double().mean())
        assert set(entry) == {"members", "acc", "nll", "ece", "error"}
        assert entry["acc"] == pytest.approx(acc, abs=1e-12)
        assert entry["error"] == pytest.approx(1 - acc, abs=1e-12)
        assert entry["nll"] == pytest.approx(float(-mean[torch.arange(40), y].log().mean()), rel=1e-9)
    for k, entry in enumerate(d["members"]):
        acc = float((probs[k].argmax(1) == y).double().mean())
        assert set(entry) == {"index", "acc", "nll", "ece", "error"}
        assert entry["acc"] == pytest.approx(acc, abs=1e-12)
        assert entry["error"] == pytest.approx(1 - acc, abs=1e-12)
        assert entry["nll"] == pytest.approx(float(-probs[k][torch.arange(40), y].log().mean()), rel=1e-9)
    # the ECE of each member is the member's, not the prefix's (they differ for k > 0)
    res = evaluate_ensemble(nets, TensorLoader(x, y, 16), num_bins=7)
    assert [m["ece"] for m in d["members"]] == pytest.approx(res.member_ece.tolist(), abs=0)
    assert [e["ece"] for e in d["ensemble"]] == pytest.approx(res.ece.tolist(), abs=0)


def test_members_loaded_through_a_template_are_independent_copies_in_eval_mode(tmp_path):
    source = _nets(1, seed=2)[0]
    path = tmp_path / "member.pt"
    torch.save(source.state_dict(), path)
    template = _nets(1, seed=3)[0].train()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    passed = nn.Linear(5, 3)
    net, same = load_members([path, passed], template=template)
    assert same is passed                                  # modules pass through untouched
    assert net is not template and not net.training
    for k, v in source.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    for k, v in template.state_dict().items():             # the template keeps its own weights
        assert torch.equal(v, before[k])
    with torch.no_grad():                                  # and shares no storage with the member
        net[0].weight.add_(1.0)
    assert torch.equal(template[0].weight, before["0.weight"])


def test_members_loaded_from_model_files_are_in_eval_mode(tmp_path):
    torch.manual_seed(4)
    from modeconn.models import create_model
    model = create_model("mlp", (1, 8, 8), 10, depth=1, width=8).train()
    path = save_model(tmp_path / "m.pt", model, "mlp", dict(depth=1, width=8), input_shape=(1, 8, 8),
                      num_classes=10)
    (net,) = load_members([path])
    assert not net.training
    for k, v in model.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)


def test_frozen_turns_gradients_off_and_drops_them():
    net = _nets(1)[0].train()
    net(torch.randn(2, 5)).sum().backward()
    out = frozen(net)
    assert out is net and not net.training
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_a_one_sample_simplex_ensemble_is_the_sampled_point():
    nets = _nets(3, seed=5)
    simplex = SimplexModel(nets[0], nets)
    (member,) = simplex_ensemble(simplex, 1, seed=7)
    gen = torch.Generator().manual_seed(7)
    alpha = simplex.sample(gen)[1]
    ref = simplex.point(alpha)
    for (k, v), (k2, w) in zip(member.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.allclose(v, w, atol=0)
    # the documented default seed is 0: the same draw as a generator seeded with 0
    (default,) = simplex_ensemble(simplex, 1)
    first = simplex.point(simplex.sample(torch.Generator().manual_seed(0))[1])
    for v, w in zip(default.state_dict().values(), first.state_dict().values()):
        assert torch.equal(v, w)
    assert not torch.equal(default.state_dict()["0.weight"], member.state_dict()["0.weight"])
    with pytest.raises(ValueError, match="num_samples"):
        simplex_ensemble(simplex, 0)

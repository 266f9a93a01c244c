"""SSAM (Mi et al. 2022): the masked ascent equals a hand computation; sparsity 0 is SAM; resume is exact."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import modeconn as mc
from modeconn.data import TensorLoader
from modeconn.runtime import Hooks
from modeconn.training.sam import SAM, top_share_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    return net, x, y


def test_sparsity_zero_is_sam_step_for_step():
    net, x, y = _tiny()
    sam_net, ssam_net = copy.deepcopy(net), copy.deepcopy(net)
    loader = TensorLoader(x, y, batch_size=4, shuffle=True)
    kw = dict(epochs=3, lr=0.1, weight_decay=1e-3, momentum=0.9, schedule="constant", sam=0.2)
    mc.train_model(sam_net, loader, **kw)
    for mask in ("fisher", "random"):
        other = copy.deepcopy(ssam_net)
        mc.train_model(other, loader, sam_sparsity=0.0, sam_mask=mask, **kw)
        for p, q in zip(sam_net.parameters(), other.parameters()):
            assert torch.allclose(p, q, atol=1e-14, rtol=0), mask


def test_fisher_masked_step_is_the_hand_computed_update():
    """First step: Fisher = g², the mask keeps the half of largest |g|; ε = ρ g⊙m/‖g⊙m‖; w ← w − lr ∇L(w+ε)."""
    net, x, y = _tiny()
    w = {k: v.detach().clone() for k, v in net.named_parameters()}

    def loss(params):
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    g = grad(loss)(w)
    flat = np.concatenate([g[k].abs().reshape(-1).numpy() for k in w])
    cut = np.sort(flat)[::-1][int(round(0.5 * flat.size)) - 1]  # the smallest kept |g| (no ties here)
    m = {k: (g[k].abs() >= cut).double() for k in w}
    assert abs(sum(float(v.sum()) for v in m.values()) - round(0.5 * flat.size)) < 0.5
    norm = torch.sqrt(sum(((g[k] * m[k]) ** 2).sum() for k in w))
    g2 = grad(loss)({k: w[k] + 0.3 * g[k] * m[k] / norm for k in w})
    expected = {k: w[k] - 0.1 * g2[k] for k in w}
    mc.train_model(net, TensorLoader(x, y, batch_size=8), epochs=1, lr=0.1, weight_decay=0.0, momentum=0.0,
                   schedule="constant", sam=0.3, sam_sparsity=0.5, sam_mask="fisher")
    for k, p in net.named_parameters():
        assert torch.allclose(p, expected[k], atol=1e-12), k


def test_masks_keep_the_asked_share_and_random_masks_follow_the_seed():
    scores = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([[5.0, 0.0], [4.0, -1.0]])]
    kept = top_share_mask(scores, 3 / 7)
    assert kept[0].tolist() == [True, False, False] and kept[1].tolist() == [[True, False], [True, False]]
    net, x, y = _tiny()
    opts = []
    for seed in (0, 0, 1):
        n = copy.deepcopy(net)
        opt = SAM(n.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.6, mask="random", mask_seed=seed, lr=0.1)
        F.cross_entropy(n(x), y).backward()
        opt.first_step()
        opts.append(opt)
        P = sum(p.numel() for p in n.parameters())
        assert abs(opt.mask_share() - round(0.4 * P) / P) < 1e-12
    same = [torch.equal(a, b) for a, b in zip(opts[0]._sparse["masks"], opts[1]._sparse["masks"])]
    other = [torch.equal(a, b) for a, b in zip(opts[0]._sparse["masks"], opts[2]._sparse["masks"])]
    assert all(same) and not all(other)


def test_ssam_run_resumes_exactly(digits):
    loader = digits.train_loader(256, seed=0)
    torch.manual_seed(0)
    start = mc.create_model("mlp", digits.input_shape, digits.num_classes, width=16, depth=1)
    kw = dict(epochs=2, lr=0.05, sam=0.05, sam_sparsity=0.5, sam_mask="fisher")
    whole, states = copy.deepcopy(start), []
    mc.train_model(whole, loader, hooks=Hooks(on_epoch_end=lambda r, s: states.append(s)), **kw)
    resumed = copy.deepcopy(start)
    mc.train_model(resumed, loader, resume=states[0], **kw)
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="sam"):
        mc.train_model(copy.deepcopy(start), loader, resume=states[0], **{**kw, "sam_mask": "random"})


def test_bad_ssam_arguments_are_named():
    net, _, _ = _tiny()
    with pytest.raises(ValueError, match="sparsity"):
        SAM(net.parameters(), torch.optim.SGD, rho=0.1, sparsity=1.0, mask="fisher", lr=0.1)
    with pytest.raises(ValueError, match="mask"):
        SAM(net.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1)
    with pytest.raises(ValueError, match="need sam"):
        mc.train_model(net, TensorLoader(torch.randn(4, 3).double(), torch.tensor([0, 1, 0, 1])), epochs=1,
                       sam_sparsity=0.5, sam_mask="fisher")


def test_train_and_train_curve_commands_take_ssam(tmp_path, capsys):
    from modeconn import train, train_curve

    out = tmp_path / "m"
    assert train.main(["--model", "mlp", "--model-kwargs", "width=16", "depth=1", "--epochs", "1", "--sam", "0.05",
                       "--sam-sparsity", "0.5", "--out", str(out), "--no-progress"]) == 0
    config = mc.load_checkpoint(out / "model.pt")["config"]
    assert config["sam_sparsity"] == 0.5 and config["sam_mask"] == "fisher"
    assert train.main(["--epochs", "1", "--sam-sparsity", "0.5", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "needs --sam" in capsys.readouterr().err
    assert train_curve.main(["--a", str(out / "model.pt"), "--b", str(out / "model.pt"), "--epochs", "1",
                             "--sam", "0.1", "--sam-sparsity", "0.5", "--sam-mask", "random",
                             "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert mc.load_checkpoint(tmp_path / "c" / "curve.pt")["config"]["sam_mask"] == "random"

"""MetricSums and token_cross_entropy against numpy (mutation run 10, evaluation/model.py): NLL, accuracy, error and
ECE per prediction set over several batches, bins kept apart, a confidence just past a bin edge, language-model logits with masked
(-100) and class-0 tokens, losses without classes, a scratch shared by sums of different widths, an empty pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeconn.evaluation.model import MetricSums, token_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _hand(logits, y, bins=0):
    """Means over every sample of [M, N, C] float64 logits and [N] labels, by numpy; ECE bins (b/B, (b+1)/B]."""
    z = np.asarray(logits, dtype=np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z - lse[..., None]
    n = len(y)
    nll = -logp[:, np.arange(n), y].mean(1)
    hit = (z.argmax(-1) == y[None]).astype(float)
    out = {"loss": nll, "acc": hit.mean(1), "error": 1 - hit.mean(1)}
    if bins:
        conf = np.exp(logp.max(-1))
        ece = []
        for m in range(len(z)):
            total = 0.0
            for b in range(bins):
                inside = (conf[m] > b / bins) & (conf[m] <= (b + 1) / bins) if b else conf[m] <= 1 / bins
                total += abs(hit[m][inside].sum() - conf[m][inside].sum())
            ece.append(total / n)
        out["ece"] = np.array(ece)
    return out


def _close(got, want):
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-12, atol=1e-13, err_msg=k)


@pytest.mark.parametrize("bins", [0, 5, 7])
def test_sums_of_logits_over_batches_are_the_numpy_means(bins):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 4, generator=g) * 3  # M = 2 sets, 50 samples, 4 classes
    y = torch.randint(0, 4, (50,), generator=g)
    sums = MetricSums(num_bins=bins)
    for lo, hi in ((0, 17), (17, 40), (40, 50)):
        sums.add_logits(logits[:, lo:hi], y[lo:hi])
    _close(sums.means(), _hand(logits.double().numpy(), y.numpy(), bins))
    assert sums.n == 50


def test_language_model_logits_count_every_kept_token():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 6, generator=g) * 2  # M = 2, B = 3 sequences, T = 5 tokens, V = 6
    y = torch.randint(0, 6, (3, 5), generator=g)
    y[0, :2] = 0  # class 0 is a token like any other
    y[1, 3] = y[2, 0] = -100  # masked: no target
    sums = MetricSums()
    sums.add_logits(logits, y)
    keep = (y >= 0).reshape(-1).numpy()
    flat = logits.double().reshape(2, 15, 6).numpy()[:, keep]
    _close(sums.means(), _hand(flat, y.reshape(-1).numpy()[keep]))
    assert sums.n == 13
    # add() with log-probabilities gives the same
    direct = MetricSums()
    direct.add(F.log_softmax(logits.double(), -1), y)
    _close(direct.means(), _hand(flat, y.reshape(-1).numpy()[keep]))


def test_token_cross_entropy_is_the_mean_over_tokens():
    g = torch.Generator().manual_seed(2)
    out, y = torch.randn(3, 4, 7, generator=g), torch.randint(0, 7, (3, 4), generator=g)
    logp = F.log_softmax(out.double(), -1)
    want = -logp.gather(-1, y[..., None]).mean()
    assert float(token_cross_entropy(out, y)) == pytest.approx(float(want), rel=1e-6)
    flat_out, flat_y = out.reshape(12, 7), y.reshape(12)
    assert float(token_cross_entropy(flat_out, flat_y)) == pytest.approx(float(want), rel=1e-6)


def test_losses_without_classes_are_averaged_over_samples():
    sums = MetricSums()
    sums.add_loss(torch.tensor([3.0, 6.0]), 4)
    sums.add_loss(torch.tensor([[1.0], [2.0]]), 2)
    np.testing.assert_allclose(sums.means()["loss"], [4.0 / 6, 8.0 / 6], rtol=1e-15)
    assert sums.n == 6


def test_one_scratch_serves_sums_of_different_widths():
    scratch = {}
    g = torch.Generator().manual_seed(3)
    for c in (3, 5, 3):
        logits, y = torch.randn(2, 8, c, generator=g), torch.randint(0, c, (8,), generator=g)
        sums = MetricSums(scratch=scratch)
        sums.add_logits(logits, y)
        _close(sums.means(), _hand(logits.double().numpy(), y.numpy()))


def test_a_pass_without_samples_is_refused_and_one_sample_is_enough():
    with pytest.raises(ValueError, match="no samples"):
        MetricSums().means()
    one = MetricSums()
    one.add_logits(torch.tensor([[[0.0, 1.0]]]), torch.tensor([1]))
    m = one.means()
    assert m["acc"][0] == 1.0 and m["error"][0] == 0.0


def test_ece_keeps_each_bin_apart():
    # ten classes; top-class probability p (the other nine share 1 - p) in each of 5 bins, hits alternating,
    # so merging any two neighbouring bins, or moving an edge, changes the sum of |hits - confidence|
    ps, hits = [0.15, 0.3, 0.5, 0.7, 0.9, 0.35, 0.75], [1, 0, 1, 0, 1, 0, 0]
    logits = torch.zeros(1, len(ps), 10, dtype=torch.float64)
    for i, p in enumerate(ps):
        logits[0, i, 0] = math.log(p / ((1 - p) / 9))
    y = torch.tensor([0 if h else 1 for h in hits])
    sums = MetricSums(num_bins=5)
    sums.add_logits(logits, y)
    gaps = [1 - 0.15, -0.3 - 0.35, 1 - 0.5, -0.7 - 0.75, 1 - 0.9]  # bins (0,.2], (.2,.4], ..., (.8,1]
    assert float(sums.means()["ece"][0]) == pytest.approx(sum(abs(gp) for gp in gaps) / len(ps), rel=1e-12)
    _close(sums.means(), _hand(logits.numpy(), y.numpy(), 5))


def test_a_confidence_just_past_an_edge_shares_the_next_bin():
    # 0.6 + 1e-8 is above the float64 edge 0.6 and below the float32 one: it must share (0.6, 0.8] with a miss
    p = 0.6 + 1e-8
    logits = torch.tensor([[[math.log(p / (1 - p)), 0.0], [math.log(0.7 / 0.3), 0.0]]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    sums = MetricSums(num_bins=5)
    sums.add_logits(logits, y)
    assert float(sums.means()["ece"][0]) == pytest.approx(abs(1 - p - 0.7) / 2, rel=1e-9)


def test_without_bins_there_is_no_ece():
    sums = MetricSums()
    sums.add_logits(torch.randn(1, 4, 3), torch.tensor([0, 1, 2, 0]))
    assert set(sums.means()) == {"loss", "acc", "error"}


def test_evaluate_takes_a_plain_function():
    from modeconn.data import TensorLoader
    from modeconn.evaluation.model import evaluate

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2)).eval()
    data = TensorLoader(torch.randn(10, 3), torch.randint(0, 2, (10,)), batch_size=4)
    assert evaluate(lambda x: net(x), data) == evaluate(net, data)

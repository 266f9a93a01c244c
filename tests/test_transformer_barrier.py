"""Two independently trained transformers: weight matching through attention lowers their line barrier.

Measured for the closing note of the transformers issue (CLI, 30 epochs): gpt on majority 1.316 -> 0.457
(weight matching); vit on digits 3.196 -> 3.330, i.e. no reduction (README, "Transformers").
"""
import pytest
import torch

import modeconn as mc
from modeconn.evaluation.model import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt(ds, seed):
    torch.manual_seed(seed)
    net = mc.create_model("gpt", ds.input_shape, ds.num_classes, vocab=ds.vocab_size)
    mc.train_model(net, ds.train_loader(64, seed=seed), epochs=8, lr=0.05, seed=seed)
    return net


def test_weight_matching_more_than_halves_the_gpt_line_barrier():
    ds = mc.get_dataset("majority", seed=1)
    a, b = _gpt(ds, 1), _gpt(ds, 2)
    train, test = ds.eval_loader("train"), ds.eval_loader("test")
    for net in (a, b):
        assert evaluate(net, test)["acc"] > 0.95          # both endpoints solve the task
    aligned, _, report = mc.align_models(a, b, method="weight", seed=0, example_input=ds.x_train[:2])
    spec = mc.infer_permutation_spec(a, ds.x_train[:2])
    assert {g.split(".")[-1] for g in spec.groups} >= {"heads", "qk", "v"}   # attention was permuted too
    before = mc.evaluate_path(mc.linear_path(a, b), train, test, num_points=11).barrier("test_loss")
    after = mc.evaluate_path(mc.linear_path(a, aligned), train, test, num_points=11).barrier("test_loss")
    assert before > 0.3, before
    assert after <= 0.5 * before, (before, after)

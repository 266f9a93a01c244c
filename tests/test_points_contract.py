"""evaluate_points' point-by-point path (convolutions on CPUs): bf16 autocast when asked, and the scratch
memory a caller keeps between calls (what a grid reuses for all its chunks)."""
import torch
from torch import nn

from modeconn.core.curve_model import linear_path
from modeconn.data import TensorLoader
from modeconn.evaluation.points import evaluate_points
from modeconn.runtime import Runtime


def _make():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _conv_line():
    torch.manual_seed(0)
    line = linear_path(_make(), _make())
    data = TensorLoader(torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,)), batch_size=16)
    return line, line.flat_weights_at(torch.tensor([0.0, 0.3, 1.0])).detach(), data


def _by_hand(line, flats, data):
    """Mean cross-entropy of each point: the template loaded with the point's weights, float32, plain loop."""
    losses, net = [], _make().eval()
    for flat in flats:
        torch.nn.utils.vector_to_parameters(flat, net.parameters())   # parameters in named order
        with torch.no_grad():
            total = sum(float(nn.functional.cross_entropy(net(x), y, reduction="sum")) for x, y in data)
        losses.append(total / 32)
    return torch.tensor(losses, dtype=torch.float64)


def test_amp_runs_the_point_loop_in_bf16():
    line, flats, data = _conv_line()
    exact = torch.as_tensor(evaluate_points(line, flats, data, None)["train_loss"])
    amp = torch.as_tensor(evaluate_points(line, flats, data, None, runtime=Runtime(amp=True))["train_loss"])
    torch.testing.assert_close(exact, _by_hand(line, flats, data), rtol=1e-5, atol=1e-6)
    assert not torch.equal(amp, exact)                          # bf16 forwards: not the float32 numbers ...
    torch.testing.assert_close(amp, exact, rtol=3e-2, atol=3e-2)   # ... but close to them


def test_a_kept_scratch_is_filled_once_and_reused_by_the_next_call():
    line, flats, data = _conv_line()
    scratch = {}
    first = evaluate_points(line, flats, data, None, scratch=scratch)
    assert any(k.startswith("logits64") for k in scratch) and any(k.startswith("block") for k in scratch)
    kept = {k: v.data_ptr() for k, v in scratch.items()}
    again = evaluate_points(line, flats, data, None, scratch=scratch)
    assert {k: v.data_ptr() for k, v in scratch.items()} == kept    # the same tensors, no new ones
    assert (first["train_loss"] == again["train_loss"]).all()


def test_blocks_of_logits_put_the_samples_innermost():
    """[B, C] logits go into a [g, B, C] block whose memory is [g, C, B]: the metric's reductions over the
    classes then run along contiguous samples. Other outputs keep their own layout."""
    from modeconn.evaluation.points import _block
    scratch = {}
    block = _block(scratch, torch.zeros(5, 3), 4)
    assert block.shape == (4, 5, 3) and block.stride() == (15, 1, 5)
    assert _block(scratch, torch.zeros(5, 3), 2).data_ptr() == block.data_ptr()   # kept and reused
    seq = _block(scratch, torch.zeros(2, 5, 3), 4)                                 # [B, T, V] logits
    assert seq.shape == (4, 2, 5, 3) and seq.is_contiguous()

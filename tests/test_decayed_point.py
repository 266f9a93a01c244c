"""The training point θ(t) of a curve step (modeconn.core.decayed_point) against hand formulas in float64,
and the contract of the memory it reuses (Scratch)."""
import copy
import pickle
import warnings

import pytest
import torch

import modeconn.core.decayed_point as dp
from modeconn.core.decayed_point import DecayedWeights, Scratch

SHAPES = [(3, 2), (3,), (2, 2, 2)]
P = 6 + 3 + 8


def _bends(F, Kf, seed=0):
    g = torch.Generator().manual_seed(seed)
    free = torch.randn(F, P, generator=g, dtype=torch.float64, requires_grad=True)
    fixed = torch.randn(Kf, P, generator=g, dtype=torch.float64)
    c = torch.rand(F + Kf, generator=g, dtype=torch.float64)
    return free, fixed, c[:F], c[F:]


@pytest.mark.parametrize("F,wd", [(1, 0.0), (1, 0.3), (2, 0.0), (2, 0.3)])
def test_decayed_weights_are_the_bend_combination_and_their_gradient_adds_the_decay(F, wd):
    free, fixed, cf, cx = _bends(F, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # e.g. an out= tensor of the wrong shape being resized
        outs = DecayedWeights.apply(free, fixed, cf, cx, SHAPES, wd, Scratch())
    theta = (cf[:, None] * free).sum(0) + (cx[:, None] * fixed).sum(0)     # by hand
    assert [tuple(o.shape) for o in outs] == SHAPES
    torch.testing.assert_close(torch.cat([o.reshape(-1) for o in outs]), theta.detach(), rtol=0, atol=1e-12)
    up = [torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    sum(((o * u).sum() for o, u in zip(outs, up))).backward()
    dtheta = torch.cat([u.reshape(-1) for u in up]) + wd * theta.detach()
    torch.testing.assert_close(free.grad, cf[:, None] * dtheta[None, :], rtol=0, atol=1e-12)
    # the parameters are separate tensors: growing one in place does not reach another
    assert all(o.storage_offset() == sum(map(lambda s: torch.Size(s).numel(), SHAPES[:i])) for i, o in enumerate(outs))


def test_scratch_reuses_a_free_buffer_and_never_one_still_in_use():
    like, s = torch.zeros(1), Scratch()
    a = s.empty("k", (2, 3), like)
    ptr = a.data_ptr()
    again = s.empty("k", (2, 3), like)                  # `a` still alive: new memory
    assert again.data_ptr() != ptr and again.shape == (2, 3)
    del a, again
    b = s.empty("k", (3, 2), like)                      # the kept buffer, exactly as large, from its start
    assert b.shape == (3, 2) and b.is_contiguous() and b.storage_offset() == 0
    b.fill_(1.0)
    ptr = b.data_ptr()
    del b
    c = s.empty("k", (2,), torch.zeros(1, dtype=torch.float64))   # another dtype in the same bytes
    assert c.dtype == torch.float64 and c.data_ptr() == ptr
    del c
    big = s.empty("k", (40,), like)                     # more than it holds: a new, large enough buffer
    assert big.untyped_storage().nbytes() >= 160
    big.fill_(2.0)
    assert float(big.sum()) == 80.0
    other = s.empty("other key", (2, 3), like)          # keys never share memory
    assert other.data_ptr() != big.data_ptr()


def test_scratch_copies_start_empty_and_work():
    s = Scratch()
    held = s.empty("k", (4,), torch.zeros(1))
    for twin in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        t = twin.empty("k", (4,), torch.zeros(1))
        assert t.shape == (4,) and t.data_ptr() != held.data_ptr()


def test_scratch_off_the_cpu_and_without_reference_counts_makes_fresh_memory(monkeypatch):
    s = Scratch()
    meta = s.empty("k", (2, 5), torch.empty(1, device="meta"))   # stands in for a GPU
    assert meta.shape == (2, 5) and meta.device.type == "meta"
    monkeypatch.delattr(torch._C, "_storage_Use_Count", raising=False)   # an older or other torch
    assert dp._in_use(torch.zeros(1).untyped_storage())
    a = s.empty("cpu", (3,), torch.zeros(1))
    ptr = a.data_ptr()
    del a
    assert s.empty("cpu", (3,), torch.zeros(1)).data_ptr() != ptr   # cannot tell if free: not reused

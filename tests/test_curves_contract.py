"""The curve families' contract beyond the formulas: t handling, errors, identity, devices.

Written for the mutants of modeconn/core/curves.py that the formula tests let
through (tests/MUTATION.md).
"""
import pytest
import torch

import modeconn as mc

FAMILIES = [mc.Bezier, mc.PolyChain]


@pytest.mark.parametrize("family", FAMILIES)
def test_integer_t_is_taken_as_float(family):
    c = family(4).coefficients(torch.tensor([0, 1]))
    assert c.dtype == torch.float32
    assert torch.equal(c, torch.eye(4)[[0, 3]])


@pytest.mark.parametrize("family", FAMILIES)
def test_t_must_be_a_scalar_or_a_vector(family):
    with pytest.raises(ValueError, match="scalar or a 1-D tensor.*\\(2, 2\\)"):
        family(3).coefficients(torch.full((2, 2), 0.5))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_error_names_the_first_t_outside_the_interval(family):
    """Endpoints are inside [0, 1]: the value reported is the first one really outside."""
    for ts, bad in (([0.0, 0.5, 1.0, 1.5], "1.5"), ([1.0, 0.0, -0.25], "-0.25")):
        with pytest.raises(ValueError, match=f"t = {bad} lies outside"):
            family(3).coefficients(torch.tensor(ts))


def test_check_false_skips_the_range_check():
    """check=False (the training step's fast path) evaluates the polynomials as they are, even outside [0, 1]."""
    t = 1.5
    want = [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3]
    got = mc.Bezier(4).coefficients(torch.tensor(t, dtype=torch.float64), check=False)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(mc.PolyChain(3).coefficients(1.5, check=False), torch.zeros(3))
    with pytest.raises(ValueError, match="outside"):
        mc.Bezier(4).coefficients(t)  # check=True by default


@pytest.mark.parametrize("bad", [3.0, True, "3"])
def test_num_bends_must_be_an_integer(bad):
    for family in FAMILIES:
        with pytest.raises(ValueError, match="num_bends must be an integer"):
            family(bad)


def test_repr_equality_and_hash():
    assert repr(mc.Bezier(3)) == "Bezier(3)" and repr(mc.PolyChain(5)) == "PolyChain(5)"
    assert mc.Bezier(3) == mc.Bezier(3) and hash(mc.Bezier(3)) == hash(mc.Bezier(3))
    assert mc.Bezier(3) != mc.PolyChain(3)  # same number of bends, another family
    assert mc.Bezier(3) != mc.Bezier(4)
    assert mc.Bezier(2) != mc.PolyChain(2)  # the same line, but not the same family
    assert len({mc.Bezier(3), mc.Bezier(3), mc.PolyChain(3), mc.Bezier(4)}) == 3
    assert mc.make_curve("PolyChain", 4) == mc.PolyChain(4) and mc.make_curve("bezier", 3) == mc.Bezier(3)


@pytest.mark.parametrize("family", FAMILIES)
def test_coefficients_are_computed_on_the_device_of_t(family):
    """No host tensors mixed in (on a GPU that would fail or copy); the meta device shows it on any machine."""
    t = torch.tensor([0.25, 1.0], device="meta")
    c = family(4).coefficients(t)
    assert c.device.type == "meta" and c.shape == (2, 4) and c.dtype == torch.float32

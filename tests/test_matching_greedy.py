"""Weight matching's greedy start (aligned from the input, group after group), checked against brute force
over all permutations, exact recovery of permuted copies, and its fallback to B as given."""
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from modeconn.alignment import apply_permutation, infer_permutation_spec, weight_matching
from modeconn.alignment.greedy import greedy_start
from modeconn.alignment.matching import _WeightMatcher
from modeconn.models import create_model
from modeconn.runtime.checkpoints import load_model

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"


def _objective(a, b, spec, perm):
    """sum_w <A_w, P(B_w)> in float64 over the parameters the spec permutes, from the permuted copy."""
    sa, sb = a.state_dict(), apply_permutation(b.state_dict(), spec, perm)
    covered = set(spec.covered())
    return math.fsum(float((sa[n].double() * sb[n].double()).sum()) for n, _ in a.named_parameters() if n in covered)


def _mlp(seed, h1=4, h2=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2)).double()


def test_greedy_start_reaches_the_global_optimum_where_descent_from_the_identity_stops_short():
    a, b = _mlp(0), _mlp(1)
    spec = infer_permutation_spec(a, torch.randn(1, 3, dtype=torch.float64))
    g1, g2 = spec.groups
    # brute force: every pair of permutations of the two hidden layers (4! x 4! = 576)
    best = max(_objective(a, b, spec, {g1: torch.tensor(p), g2: torch.tensor(q)})
               for p in itertools.permutations(range(4)) for q in itertools.permutations(range(4)))
    for seed in range(4):  # whatever the visiting order, descent from B as given stops in a local optimum
        perm, info = weight_matching(a, b, spec, seed=seed, init="identity")
        assert _objective(a, b, spec, perm) == pytest.approx(info.objectives[-1], rel=1e-12)
        assert info.objectives[-1] < best - 0.5
    perm, info = weight_matching(a, b, spec)  # the default: greedy start (and B as given), then descent
    assert info.start == "greedy"
    assert _objective(a, b, spec, perm) == pytest.approx(best, rel=1e-12)
    assert info.objectives[-1] == pytest.approx(best, rel=1e-12)
    assert info.initial_objective <= info.start_objective <= info.objectives[-1]


def _digits_cnn():
    model, _ = load_model(CKPT / "digits_cnn_a.pt")
    return model.double().eval(), torch.randn(1, 1, 8, 8, dtype=torch.float64)


def _preresnet():
    torch.manual_seed(0)
    model = create_model("preresnet", (3, 16, 16), 10, depth=8).double().eval()
    return model, torch.randn(1, 3, 16, 16, dtype=torch.float64)


@pytest.mark.parametrize("build", [_digits_cnn, _preresnet])
def test_greedy_start_alone_recovers_a_permuted_copy_exactly(build):
    """BN, flatten into the classifier (digits CNN), residual stages shared by many layers (preresnet):
    the start itself is A's order, its objective sum_w |A_w|^2, before any descent sweep (the default
    then ties with descent from B as given, which also finds it here, and returns that)."""
    a, x = build()
    spec = infer_permutation_spec(a, x)
    shuffle = spec.random_permutation(seed=5)
    b = apply_permutation(a, spec, shuffle)
    matcher = _WeightMatcher(a, b, spec)
    greedy_start(matcher, spec)
    assert all(torch.equal(matcher.perms[g], torch.argsort(shuffle[g])) for g in spec.groups)
    covered = set(spec.covered())
    sa = a.state_dict()
    norm2 = math.fsum(float((sa[n].double() ** 2).sum()) for n, _ in a.named_parameters() if n in covered)
    assert matcher.current == pytest.approx(norm2, rel=1e-12)
    assert matcher.initial < norm2 - 1.0  # the shuffle did move B away from A
    perm, info = weight_matching(a, b, spec)
    assert all(torch.equal(perm[g], torch.argsort(shuffle[g])) for g in spec.groups)


def test_descent_from_b_as_given_wins_where_the_greedy_start_ends_lower():
    """B = A with only its first layer's rows shuffled and a heavy second layer: aligning the first layer
    (what the greedy start does first) mis-aligns the heavy layer's columns, so B as given is better; the
    default runs both descents and returns the higher, here exactly init="identity"'s result."""
    a = _mlp(0, 6, 6)
    with torch.no_grad():
        a[2].weight.mul_(10.0)
    spec = infer_permutation_spec(a, torch.randn(1, 3, dtype=torch.float64))
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    sigma = torch.tensor([1, 2, 3, 4, 5, 0])
    sd["0.weight"], sd["0.bias"] = sd["0.weight"][sigma], sd["0.bias"][sigma]
    b = _mlp(1, 6, 6)
    b.load_state_dict(sd)
    matcher = _WeightMatcher(a, b, spec)
    greedy_start(matcher, spec)
    identity = _objective(a, b, spec, spec.identity())
    assert _objective(a, b, spec, matcher.perms) == pytest.approx(matcher.current, rel=1e-12)
    assert matcher.current < identity - 1.0
    perm, info = weight_matching(a, b, spec)
    ref, ref_info = weight_matching(a, b, spec, init="identity")
    assert info.start == "identity" and info.start_objective == pytest.approx(identity, rel=1e-12)
    assert all(torch.equal(perm[g], ref[g]) for g in spec.groups)
    assert info.objectives == ref_info.objectives and info.objectives[-1] >= identity


class _Attention(nn.Module):
    """Tokens -> Linear -> self-attention (2 heads) -> mean -> head: heads and their dims share q's rows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_groups_that_are_never_ready_are_matched_by_sorted_weights_and_still_recovered_exactly():
    torch.manual_seed(0)
    a = _Attention().double().eval()
    x = torch.randn(1, 5, 4, dtype=torch.float64)
    spec = infer_permutation_spec(a, x)
    shuffle = spec.random_permutation(seed=3)
    b = apply_permutation(a, spec, shuffle)
    matcher = _WeightMatcher(a, b, spec)
    blind = greedy_start(matcher, spec)
    assert blind and set(blind) < set(spec.groups)  # the heads or their dims: neither is ready first
    assert all(torch.equal(matcher.perms[g], torch.argsort(shuffle[g])) for g in spec.groups)
    sa = a.state_dict()
    norm2 = math.fsum(float((sa[n] ** 2).sum()) for n, _ in a.named_parameters() if n in set(spec.covered()))
    assert matcher.current == pytest.approx(norm2, rel=1e-12)
    perm, info = weight_matching(a, b, spec)
    assert all(torch.equal(perm[g], torch.argsort(shuffle[g])) for g in spec.groups)


def test_a_group_without_parameters_is_passed_over_and_the_later_groups_are_still_solved():
    """A group that permutes no parameter (here: only a buffer, visited first) has nothing to match;
    the groups after it are solved as usual, so a permuted copy is still recovered exactly."""
    from modeconn.alignment.spec import PermutationGroup, PermutationSpec
    a = _mlp(0)
    spec = infer_permutation_spec(a, torch.randn(1, 3, dtype=torch.float64))
    a[0].register_buffer("counts", torch.arange(3.0, dtype=torch.float64))
    with_empty = PermutationSpec({"nothing": PermutationGroup(3, [("0.counts", 0)]), **spec.groups})
    shuffle = spec.random_permutation(seed=2)
    b = apply_permutation(a, spec, shuffle)
    matcher = _WeightMatcher(a, b, with_empty)
    assert matcher.refs_of["nothing"] == []
    greedy_start(matcher, with_empty)
    assert torch.equal(matcher.perms["nothing"], torch.arange(3))
    assert all(torch.equal(matcher.perms[g], torch.argsort(shuffle[g])) for g in spec.groups)


def test_every_ready_axis_counts_a_bias_tells_apart_units_with_equal_weights():
    """Two hidden units with equal incoming weights differ only in their biases (the group's second ready
    axis): the start must sum the bias's costs too to undo the shuffle of a permuted copy."""
    a = _mlp(0)
    with torch.no_grad():
        a[0].weight[1] = a[0].weight[0]
        a[0].bias[0], a[0].bias[1] = 2.0, -2.0
    spec = infer_permutation_spec(a, torch.randn(1, 3, dtype=torch.float64))
    first = next(iter(spec.groups))
    assert [r.name for r in spec.groups[first].axes][:2] == ["0.weight", "0.bias"]
    sigma = {g: torch.arange(4) for g in spec.groups}
    sigma[first] = torch.tensor([1, 0, 2, 3])           # swap the two look-alike units
    b = apply_permutation(a, spec, sigma)
    matcher = _WeightMatcher(a, b, spec)
    greedy_start(matcher, spec)
    assert torch.equal(matcher.perms[first], torch.tensor([1, 0, 2, 3]))
    assert matcher.current == pytest.approx(_objective(a, a, spec, spec.identity()), rel=1e-12)

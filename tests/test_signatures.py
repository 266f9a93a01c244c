"""The signature match of one group (alignment.signatures) against brute force, and a group none of whose
tensors is given."""
import itertools
import math

import torch

from modeconn.alignment.signatures import group_signature_permutation
from modeconn.alignment.spec import PermutationGroup, PermutationSpec

SPEC = PermutationSpec({"g": PermutationGroup(3, [("w", 0)])})


def test_units_are_matched_by_the_least_summed_squared_distance_of_their_signatures():
    # rows already sorted, so the signatures are the rows; here the least summed *squared* distance and,
    # e.g., the least summed cubed distance pick different matches
    a = [[4.0, 4.0], [3.0, 4.0], [2.0, 5.0]]
    b = [[0.0, 1.0], [2.0, 5.0], [1.0, 2.0]]

    def best(power):
        return min(itertools.permutations(range(3)),
                   key=lambda s: sum(math.dist(a[i], b[s[i]]) ** power for i in range(3)))

    assert best(2) != best(3)
    found = group_signature_permutation({"w": torch.tensor(a)}, {"w": torch.tensor(b)}, SPEC, "g")
    assert found.dtype == torch.long and found.tolist() == list(best(2))
    # a row's order does not matter (sorted), only its entries
    shuffled = torch.tensor(b)[:, [1, 0]]
    assert group_signature_permutation({"w": torch.tensor(a)}, {"w": shuffled}, SPEC, "g").tolist() == list(best(2))


def test_a_group_whose_tensors_are_not_given_keeps_its_order():
    found = group_signature_permutation({"other": torch.ones(2)}, {"other": torch.ones(2)}, SPEC, "g")
    assert found.dtype == torch.long and found.tolist() == [0, 1, 2]

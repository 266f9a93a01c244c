"""Front ``matching``: modeconn's weight matching against rebasin's ``PermutationCoordinateDescent``.

Same work on both sides, from (A, B, one example input) to a permuted copy of B:
modeconn infers the spec (torch.fx), runs :func:`weight_matching` with its defaults
and applies the permutation; rebasin traces the models (torchview), runs its
coordinate descent (``rebasin()``, default 100 iterations) on its own copy of B.

One objective for both, computed here from each permuted B and A, not taken from
either tool: ``sum_w <A_w, P(B_w)>`` in float64 over the parameters modeconn's
spec permutes (the head's bias, never permuted, is left out on both sides).
Each permuted B is also run on a batch against B (eval mode): a permutation that
is a symmetry leaves the outputs unchanged up to rounding; the note gives the
largest output change relative to the largest output.

Pairs: two random VGG11 (zoo ``vgg11``, 3x32x32, seeds 0 and 1; ``--quick``: width
x0.125), the shipped trained digits CNNs (``checkpoints/digits_cnn_{a,b}.pt``) and MLPs
(``digits_mlp_{a,b}.pt``). Where rebasin's permuted B does not compute B's function
(the CNN: it reorders the classifier's flattened inputs one by one, not in the
blocks of a channel, and BN statistics apart from their weights), its objective is
shown but no ratio is taken from it: no permutation reaches it.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks._peers import Row, interleaved, missing, peer_module
from modeconn.alignment import apply_permutation, infer_permutation_spec, weight_matching
from modeconn.data import get_dataset
from modeconn.models import create_model
from modeconn.runtime.checkpoints import load_model

FRONT = "matching"
PEER = "rebasin"
CKPT = Path(__file__).resolve().parents[1] / "checkpoints"


def _vgg11_pair(quick: bool):
    """Two randomly initialised VGG11 (seeds 0 and 1) and a batch of random 3x32x32 inputs."""
    kw = {"width_multiplier": 0.125} if quick else {}
    torch.manual_seed(0)
    a = create_model("vgg11", (3, 32, 32), 10, **kw)
    torch.manual_seed(1)
    b = create_model("vgg11", (3, 32, 32), 10, **kw)
    torch.manual_seed(2)
    return "VGG11 weight matching, two random inits", a, b, torch.randn(32, 3, 32, 32)


def _digits_cnn_pair(quick: bool):
    """The shipped trained digits CNN pair and 256 digits test images."""
    a, _ = load_model(CKPT / "digits_cnn_a.pt")
    b, _ = load_model(CKPT / "digits_cnn_b.pt")
    return "digits CNN weight matching, trained pair", a, b, get_dataset("digits").x_test[:256]


def _digits_mlp_pair(quick: bool):
    """The shipped trained digits MLP pair (no flatten of a conv map) and 256 digits test images."""
    a, _ = load_model(CKPT / "digits_mlp_a.pt")
    b, _ = load_model(CKPT / "digits_mlp_b.pt")
    return "digits MLP weight matching, trained pair", a, b, get_dataset("digits").x_test[:256]


def terms(a: torch.nn.Module, pb: torch.nn.Module, names: List[str]) -> Dict[str, float]:
    """``<A_w, P(B_w)>`` per parameter ``w`` in ``names``, in float64, from the permuted copy ``pb``."""
    sa, sb = a.state_dict(), pb.state_dict()
    return {n: float((sa[n].double() * sb[n].double()).sum()) for n in names}


def objective(a: torch.nn.Module, pb: torch.nn.Module, names: List[str]) -> float:
    """``sum_w <A_w, P(B_w)>`` over ``names``, in float64, from the permuted copy ``pb``."""
    return math.fsum(terms(a, pb, names).values())


def largest_gap(a, ours, peer, names: List[str]) -> str:
    """The parameter whose term differs most between the two permuted B's, with both terms."""
    to, tp = terms(a, ours, names), terms(a, peer, names)
    n = max(names, key=lambda k: abs(tp[k] - to[k]))
    return f"largest per-parameter difference: {n} ours {to[n]:.4g}, rebasin {tp[n]:.4g}"


def function_change(b: torch.nn.Module, pb: torch.nn.Module, x: torch.Tensor) -> float:
    """``max |pb(x) - b(x)| / max |b(x)|`` in eval mode: ~1e-7 for a symmetry, O(1) for a broken one."""
    b.eval()
    pb.eval()
    with torch.no_grad():
        y, yp = b(x), pb(x)
    return float((yp - y).abs().max() / y.abs().max())


def _contestants(rebasin, a, b, x) -> Tuple[Dict[str, Callable[[], None]], Dict[str, torch.nn.Module]]:
    """The two timed callables (each leaves its permuted B in ``out``) and that ``out`` dict."""
    out: Dict[str, torch.nn.Module] = {}

    def ours():
        spec = infer_permutation_spec(a, x[:1])
        perm, _ = weight_matching(a, b, spec)
        out["ours"] = apply_permutation(b, spec, perm)

    def peer():
        torch.manual_seed(0)  # rebasin visits its permutations in torch.randperm order
        pb = copy.deepcopy(b)  # rebasin permutes B in place
        rebasin.PermutationCoordinateDescent(a, pb, x[:1]).rebasin()
        out["peer"] = pb

    return {"ours": ours, "peer": peer}, out


def _pair_rows(rebasin, work: str, a, b, x, reps: int) -> List[Row]:
    """Time row and objective row of one pair, with the function check and the old default in the notes."""
    a.eval()
    b.eval()
    fns, out = _contestants(rebasin, a, b, x)
    times = interleaved(fns, reps, warmup=1)
    spec = infer_permutation_spec(a, x[:1])
    covered = set(spec.covered())
    names = [n for n, _ in a.named_parameters() if n in covered]
    obj = {k: objective(a, out[k], names) for k in out}
    change = {k: function_change(b, out[k], x) for k in out}
    old, _ = weight_matching(a, b, spec, init="identity")
    old_obj = objective(a, apply_permutation(b, spec, old), names)
    funcs = (f"max output change of permuted B vs B on {len(x)} inputs (relative): ours {change['ours']:.1e}, "
             f"rebasin {change['peer']:.1e}" + (" (rebasin's B is NOT B's function)" if change["peer"] > 1e-4 else ""))
    return [
        Row(FRONT, f"{work}: time", times["ours"], times["peer"], PEER,
            note="spec/graph + matching + permuted copy of B; " + funcs),
        Row(FRONT, f"{work}: objective", obj["ours"], obj["peer"], PEER, unit="", higher_is_better=True,
            peer_invalid=(f"rebasin's B changes B's outputs by {change['peer']:.2f} of their largest value, "
                          f"so its objective is not one of a permutation" if change["peer"] > 1e-4 else ""),
            note=(f"sum <A_w, P(B_w)> over the {len(names)} parameters modeconn permutes, float64; "
                  f"B as given {objective(a, b, names):.4g}; ours from init='identity' (old default) "
                  f"{old_obj:.4g}; {largest_gap(a, out['ours'], out['peer'], names)}; " + funcs)),
    ]


def rows(reps: int, quick: bool) -> List[Row]:
    """Time and objective rows for the VGG11 pair and the trained digits CNN pair."""
    rebasin = peer_module(PEER)
    pairs = (_vgg11_pair, _digits_cnn_pair, _digits_mlp_pair)
    if rebasin is None:
        return [missing(FRONT, make(quick)[0], PEER) for make in pairs]
    out: List[Row] = []
    for make in pairs:
        work, a, b, x = make(quick)
        out.extend(_pair_rows(rebasin, work, a, b, x, reps))
    return out

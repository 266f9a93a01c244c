"""Evaluate a simplex or a complex of networks: a barycentric grid, its worst point, mode-to-mode paths.

Every simplex gets the grid ``α = n / R`` (all ``n ∈ N^{k}`` with Σ n = R,
:func:`~modeconn.core.simplex.barycentric_grid`); points shared by several
simplexes (the shared free vertices and faces of a mode-connecting complex)
are evaluated once. The points go through the batched engine of paths
(:func:`~modeconn.evaluation.path.evaluate_path`'s chunks, BN statistics
recomputed per point, shared among torchrun ranks). Between every two
reference vertices (the fixed ones, i.e. the modes) the polygonal chain
``mode_a → shared vertices → mode_b`` (every segment an edge of the complex)
is a :func:`~modeconn.core.curve_model.chain_path` evaluated like any path,
optionally beside the straight line between the two modes.

The barrier over the complex is ``max over the grid of M − reference``
with the reference the mean (``"mean"``) or the largest (``"max"``) of M at
the reference vertices, as :mod:`modeconn.evaluation.barriers` defines them
for paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from modeconn.core.curve_model import chain_path
from modeconn.core.simplex import SimplexModel, barycentric_grid
from modeconn.evaluation.barriers import check_barrier_metric
from modeconn.evaluation.bn import batchnorm_modules
from modeconn.evaluation.path import PathResult, _evaluate_chunks, evaluate_path
from modeconn.runtime import Hooks, Runtime

__all__ = ["SimplexResult", "evaluate_simplex", "complex_grid", "mode_pairs"]

COMPLEX_REFERENCES = ("mean", "max")


@dataclass
class SimplexResult:
    """Metrics on the barycentric grid of every simplex, and along the mode-to-mode paths.

    ``coords [n, K]`` are the grid points' barycentric coordinates over all K
    vertices (each point once); ``members[i]`` indexes the points of simplex
    i in :func:`~modeconn.core.simplex.barycentric_grid` order. Metric arrays
    are indexed like ``coords``; ``*_loss`` is the mean cross-entropy.
    ``paths["a-b"]`` is the chain from vertex a to vertex b (its ``linear``
    the straight line when evaluated).
    """

    simplexes: List[Tuple[int, ...]]
    reference_vertices: List[int]
    resolution: int
    coords: np.ndarray
    members: List[np.ndarray]
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    bn_recomputed: bool = False
    paths: Dict[str, PathResult] = field(default_factory=dict)

    def values(self, metric: str) -> np.ndarray:
        """``train_/test_`` + ``loss``, ``nll`` (the same), ``acc`` or ``error``, over the grid."""
        split, _, kind = metric.partition("_")
        if split not in ("train", "test") or kind not in ("loss", "nll", "acc", "error"):
            raise ValueError(f"unknown metric {metric!r}; use train_/test_ + loss, nll, acc or error")
        if kind == "error":
            return 1.0 - getattr(self, f"{split}_acc")
        return getattr(self, f"{split}_{'loss' if kind == 'nll' else kind}")

    def vertex_values(self, metric: str) -> np.ndarray:
        """The metric at each reference vertex (the grid point α = e_vertex)."""
        v = self.values(metric)
        return np.array([v[int(np.flatnonzero(self.coords[:, k] == 1.0)[0])] for k in self.reference_vertices])

    def worst(self, metric: str = "test_loss") -> dict:
        """The grid point where a loss or error ``metric`` is largest: value, coordinates, simplex, α."""
        v = self.values(check_barrier_metric(metric))
        j = int(np.argmax(v))
        i = next(s for s, m in enumerate(self.members) if j in m)
        return {"metric": metric, "value": float(v[j]), "coords": self.coords[j].tolist(), "simplex": i,
                "alpha": self.coords[j, list(self.simplexes[i])].tolist()}

    def barrier(self, metric: str = "test_loss", reference: str = "mean") -> float:
        """Worst value over the complex minus the mean (``"mean"``) or max (``"max"``) at the reference vertices."""
        if reference not in COMPLEX_REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; choose one of {COMPLEX_REFERENCES}")
        at = self.vertex_values(check_barrier_metric(metric))
        return self.worst(metric)["value"] - float(at.mean() if reference == "mean" else at.max())

    def path_barriers(self, metric: str = "test_loss") -> Dict[str, dict]:
        """Per mode pair: the interp barrier of the chain through the shared vertices (and of the line)."""
        out = {}
        for key, res in self.paths.items():
            out[key] = {"path": res.barrier(metric), "max_on_path": float(res.values(metric).max())}
            if res.linear is not None:
                out[key]["linear"] = res.linear.barrier(metric)
                out[key]["max_on_linear"] = float(res.linear.values(metric).max())
        return out

    def summary(self) -> dict:
        """Worst points, complex barriers and path barriers of test/train loss and error."""
        out = {}
        for m in ("train_loss", "train_error", "test_loss", "test_error"):
            out[m] = {"worst": self.worst(m), "vertices": self.vertex_values(m).tolist(),
                      "barrier": {r: self.barrier(m, r) for r in COMPLEX_REFERENCES}}
            if self.paths:
                out[m]["paths"] = self.path_barriers(m)
        return out

    def to_dict(self) -> dict:
        """Plain data: the grid, every metric array, the summary, and each path's own dictionary."""
        d = {"simplexes": [list(s) for s in self.simplexes], "reference_vertices": self.reference_vertices,
             "resolution": self.resolution, "bn_recomputed": self.bn_recomputed,
             "coords": self.coords.tolist(), "members": [m.tolist() for m in self.members]}
        for m in ("train_loss", "train_acc", "train_error", "test_loss", "test_acc", "test_error"):
            d[m] = self.values(m).tolist()
        d["summary"] = self.summary()
        d["paths"] = {k: p.to_dict() for k, p in self.paths.items()}
        return d


def complex_grid(simplexes: List[Tuple[int, ...]], num_vertices: int, resolution: int
                 ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """(unique grid points as coordinates ``[n, K]``, each simplex's indices into them).

    Example:
        >>> coords, members = complex_grid([(0, 2), (1, 2)], 3, 2)   # two segments sharing vertex 2
        >>> coords.tolist(), [m.tolist() for m in members]
        ([[0.0, 0.0, 1.0], [0.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], [[4, 3, 0], [2, 1, 0]])
    """
    counts = []
    for s in simplexes:
        grid = barycentric_grid(len(s), resolution)
        rows = np.zeros((len(grid), num_vertices), dtype=np.int64)
        rows[:, list(s)] = grid
        counts.append(rows)
    unique, inverse = np.unique(np.concatenate(counts), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    bounds = np.cumsum([0] + [len(c) for c in counts])
    return unique / resolution, [inverse[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def mode_pairs(model: SimplexModel) -> Dict[str, List[int]]:
    """``"a-b"`` -> the vertex chain from reference vertex a to b through the vertices their simplexes share.

    Reference vertices are the fixed ones (all vertices when none is fixed).
    Two vertices of one simplex are joined by their edge; a pair whose
    simplexes share no vertex is left out.
    """
    refs = model.fixed_idx or list(range(model.num_bends))
    out = {}
    for a, b in combinations(refs, 2):
        if any(a in s and b in s for s in model.simplexes):
            out[f"{a}-{b}"] = [a, b]
            continue
        sa = next((s for s in model.simplexes if a in s), ())
        sb = next((s for s in model.simplexes if b in s), ())
        shared = [v for v in sa if v in sb]
        if shared:
            out[f"{a}-{b}"] = [a, *shared, b]
    return out


@torch.no_grad()
def evaluate_simplex(model: SimplexModel, train_loader: Iterable, test_loader: Iterable, resolution: int = 10,
                     bn_loader: Optional[Iterable] = None, points_per_pass: int = 8, recompute_bn: bool = True,
                     paths: bool = True, num_path_points: int = 21, with_linear: bool = False,
                     runtime: Optional[Runtime] = None, hooks: Optional[Hooks] = None) -> SimplexResult:
    """Loss and accuracy on the barycentric grid of every simplex, and along the mode-to-mode paths.

    Args:
        model: a :class:`~modeconn.core.simplex.SimplexModel`.
        train_loader, test_loader: evaluation data in fixed order, without augmentation.
        resolution: R of the grid ``α = n / R`` (R + 1 points per edge).
        bn_loader, points_per_pass, recompute_bn, runtime: as :func:`~modeconn.evaluation.path.evaluate_path`.
        paths: also evaluate the chain between every two reference vertices
            (:func:`mode_pairs`) at ``num_path_points`` evenly spaced t;
            ``with_linear`` adds the straight line between them.
        hooks: ``progress(n)`` with the number of points finished.

    Example:
        >>> from modeconn.data import TensorLoader
        >>> _ = torch.manual_seed(0)
        >>> nets = [torch.nn.Linear(4, 3) for _ in range(3)]
        >>> data = TensorLoader(torch.randn(32, 4), torch.randint(0, 3, (32,)), batch_size=16)
        >>> res = evaluate_simplex(SimplexModel(nets[0], nets), data, data, resolution=4, num_path_points=5)
        >>> len(res.coords), sorted(res.paths)      # C(4 + 2, 2) grid points; the triangle's edges
        (15, ['0-1', '0-2', '1-2'])
        >>> bool(res.worst("test_loss")["value"] >= res.vertex_values("test_loss").max())
        True
    """
    if int(resolution) < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    bn_loader = train_loader if bn_loader is None else bn_loader
    use_bn = recompute_bn and bool(batchnorm_modules(model.net))
    coords, members = complex_grid(model.simplexes, model.num_bends, int(resolution))
    arr, _ = _evaluate_chunks(model, coords, (train_loader, test_loader, bn_loader), use_bn, points_per_pass,
                              runtime, hooks)
    result = SimplexResult(model.simplexes, model.fixed_idx or list(range(model.num_bends)), int(resolution),
                           coords, members, arr["train_loss"], arr["train_acc"], arr["test_loss"],
                           arr["test_acc"], use_bn)
    if paths:
        for key, chain in mode_pairs(model).items():
            path = chain_path([model.vertex_model(k) for k in chain], model.vertex_model(chain[0]))
            result.paths[key] = evaluate_path(path.to(model.fixed_bends.device), train_loader, test_loader,
                                              num_path_points, bn_loader=bn_loader,
                                              points_per_pass=points_per_pass, recompute_bn=recompute_bn,
                                              with_linear=with_linear, name=f"chain {key}", runtime=runtime,
                                              hooks=hooks)
    return result

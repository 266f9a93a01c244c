"""Loss and accuracy over 1-D lines and 2-D grids of a :class:`~.directions.Plane`.

Every point ``θ = origin + a·d1 (+ b·d2)`` is evaluated by the shared engine
:func:`modeconn.evaluation.path.evaluate_points`: several points per pass over
the data (``torch.func.vmap`` over stacked weights) and, for BatchNorm networks,
the statistics of every point recomputed in the same single pass (exactly what
``torch.optim.swa_utils.update_bn`` gives per point). Points evaluated one
after another share the layers that read the raw input: a point being
``origin + a·d1 + b·d2``, such a layer's output is the same combination of
three products, computed once per batch for the whole grid
(:mod:`modeconn.evaluation.input_span`). ``recompute_bn=False``
keeps the evaluator's current buffers at every point instead (what Li et
al.'s reference does; it distorts BN networks away from the origin).

Orientation. A 2-D result's arrays are indexed ``[i_y, i_x]``: entry
``arrays[m][j, i]`` belongs to the point ``(xs[i], ys[j])``, shape
``(len(ys), len(xs))`` — the layout of ``np.meshgrid(xs, ys)`` and of
``matplotlib``'s ``contourf(xs, ys, Z)``. A 1-D result's arrays have shape
``(len(xs),)``.

Rows and resuming. The grid is evaluated row by row: in 2-D a row is one
``y`` (all ``xs``), in 1-D a row is a block of ``points_per_pass``
consecutive ``xs``. After each row ``on_row(row_index, result)`` receives the
partial :class:`GridResult` (finished entries filled, the rest NaN,
``result.rows_done`` rows done). Passing such a partial result back as
``resume=`` continues with the next row; the finished rows are not
recomputed, and the final arrays equal those of an uninterrupted run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from modeconn.core.curve_model import CurveModel
from modeconn.evaluation.bn import has_batchnorm
from modeconn.evaluation.input_span import Span
from modeconn.evaluation.points import evaluate_points
from modeconn.evaluation.stacked import vectorize_by_default
from modeconn.geometry.directions import Plane, plane_through
from modeconn.runtime import Hooks, Runtime
from modeconn.runtime import distributed as _dist

RowCallback = Callable[[int, "GridResult"], None]
PointMetrics = Callable[[torch.Tensor], Mapping[str, np.ndarray]]

# the weights of the points one pass of a 2-D grid row holds when they are evaluated one after another
ROW_PASS_BYTES = 1 << 27

__all__ = ["GridResult", "CurvePlane", "axis", "evaluator_for", "evaluate_grid", "curve_plane",
           "curve_plane_geometry", "plane_checksum"]


# -------------------------------------------------------------------- result
@dataclass
class GridResult:
    """Metrics over a line or grid (see the module docstring for orientation).

    ``arrays`` maps a metric name (``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc``, and any extra point metrics) to a float64
    array of shape :attr:`shape`; entries of unfinished rows are NaN.
    ``checksum`` identifies the plane the grid was computed on.
    """

    xs: np.ndarray
    ys: Optional[np.ndarray]
    arrays: Dict[str, np.ndarray]
    rows_done: int
    num_rows: int
    bn_recomputed: bool
    points_per_pass: int
    checksum: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def dims(self) -> int:
        """1 for a line, 2 for a grid."""
        return 1 if self.ys is None else 2

    @property
    def shape(self) -> Tuple[int, ...]:
        """``(len(xs),)`` or ``(len(ys), len(xs))``: the shape of every array."""
        return (len(self.xs),) if self.ys is None else (len(self.ys), len(self.xs))

    @property
    def complete(self) -> bool:
        """True when every row is done."""
        return self.rows_done >= self.num_rows

    def coords(self) -> np.ndarray:
        """Coordinates of every entry: ``[nx, 1]`` (1-D) or ``[ny, nx, 2]`` with ``(x, y)`` (2-D)."""
        if self.ys is None:
            return self.xs[:, None].copy()
        X, Y = np.meshgrid(self.xs, self.ys)
        return np.stack([X, Y], -1)

    def error(self, split: str) -> np.ndarray:
        """``1 - accuracy`` of ``split`` ('train' or 'test')."""
        return 1.0 - self.arrays[f"{split}_acc"]

    def summary(self) -> Dict[str, Any]:
        """Min / max of every metric and where the minimum sits (finished entries only)."""
        out = {}
        coords = self.coords().reshape(-1, self.dims)
        for k, v in self.arrays.items():
            flat = v.reshape(-1)
            ok = np.isfinite(flat)
            if not ok.any():
                continue
            i = int(np.nanargmin(np.where(ok, flat, np.nan)))
            out[k] = {"min": float(np.nanmin(flat[ok])), "max": float(np.nanmax(flat[ok])),
                      "argmin": coords[i].tolist()}
        return out

    def to_arrays(self, prefix: str = "") -> Dict[str, np.ndarray]:
        """Everything as numpy arrays, for ``np.savez`` (read back with :meth:`from_arrays`)."""
        d = {f"{prefix}xs": self.xs, f"{prefix}rows_done": np.array(self.rows_done),
             f"{prefix}num_rows": np.array(self.num_rows), f"{prefix}bn_recomputed": np.array(self.bn_recomputed),
             f"{prefix}points_per_pass": np.array(self.points_per_pass), f"{prefix}checksum": self.checksum,
             f"{prefix}metrics": np.array(sorted(self.arrays))}
        if self.ys is not None:
            d[f"{prefix}ys"] = self.ys
        for k, v in self.arrays.items():
            d[f"{prefix}{k}"] = v
        return d

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray], prefix: str = "") -> "GridResult":
        """Rebuild a (possibly partial) result from :meth:`to_arrays` output or a loaded ``.npz``."""
        try:
            names = [str(m) for m in np.asarray(d[f"{prefix}metrics"]).tolist()]
            ys = np.asarray(d[f"{prefix}ys"], float) if f"{prefix}ys" in d else None
            return cls(xs=np.asarray(d[f"{prefix}xs"], float), ys=ys,
                       arrays={m: np.array(d[f"{prefix}{m}"], dtype=float) for m in names},
                       rows_done=int(d[f"{prefix}rows_done"]), num_rows=int(d[f"{prefix}num_rows"]),
                       bn_recomputed=bool(d[f"{prefix}bn_recomputed"]),
                       points_per_pass=int(d[f"{prefix}points_per_pass"]),
                       checksum=np.asarray(d[f"{prefix}checksum"], float))
        except KeyError as e:
            raise ValueError(f"not a saved grid result: missing array {e.args[0]!r}") from None


# ------------------------------------------------------------------- helpers
def axis(lo: float, hi: float, steps: int) -> np.ndarray:
    """``steps`` evenly spaced coordinates from ``lo`` to ``hi`` (both included)."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range must be finite, got {lo}:{hi}")
    if steps > 1 and not lo < hi:
        raise ValueError(f"range must have lo < hi, got {lo}:{hi}")
    return np.linspace(float(lo), float(hi), int(steps))


def evaluator_for(net: Union[nn.Module, CurveModel]) -> CurveModel:
    """The CurveModel through which flat points of ``net``'s architecture are evaluated.

    A CurveModel is used as it is (its layout and live buffers); a plain
    module becomes :meth:`CurveModel.constant` of it, carrying the module's
    layout and buffers (see there why a single network is a path).
    """
    if isinstance(net, CurveModel):
        return net
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected an nn.Module or a CurveModel, got {type(net).__name__}")
    return CurveModel.constant(net)


def plane_checksum(plane: Plane) -> np.ndarray:
    """A few float64 numbers identifying a plane (to refuse resuming on another one)."""
    vals = []
    for v in (plane.origin, plane.d1, plane.d2):
        if v is None:
            continue
        v = v.detach().double()
        idx = torch.arange(v.numel(), device=v.device, dtype=torch.float64)
        vals += [float(v.sum()), float(v.norm()), float((v * torch.cos(idx)).sum())]
    return np.asarray(vals, float)


def _rows(nx: int, ny: Optional[int], k: int) -> List[np.ndarray]:
    """Flat (row-major) point indices of each row."""
    if ny is None:
        return [np.arange(lo, min(lo + k, nx)) for lo in range(0, nx, k)]
    return [np.arange(j * nx, (j + 1) * nx) for j in range(ny)]


def _chunks(idx: np.ndarray, k: int) -> List[np.ndarray]:
    """Split a row into the fewest chunks of at most k points, of balanced size."""
    n = math.ceil(len(idx) / k)
    return [c for c in np.array_split(idx, n) if len(c)]


def _coordinates(values, name: str) -> np.ndarray:
    """``values`` as a non-empty 1-D float array of finite numbers (the error names ``name``)."""
    a = np.asarray(values, dtype=float)
    if a.ndim != 1 or len(a) < 1 or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a non-empty 1-D array of finite values, got shape {a.shape}")
    return a


def _grid_arguments(plane: Plane, xs, ys, train_loader, test_loader, points_per_pass
                    ) -> Tuple[np.ndarray, Optional[np.ndarray], int]:
    """Checked ``(xs, ys, points_per_pass)`` of :func:`evaluate_grid`."""
    if train_loader is None and test_loader is None:
        raise ValueError("evaluate_grid needs a train_loader, a test_loader or both")
    if int(points_per_pass) != points_per_pass or points_per_pass < 1:
        raise ValueError(f"points_per_pass must be an integer >= 1, got {points_per_pass!r}")
    if (ys is None) != (plane.dims == 1):
        raise ValueError(f"a {plane.dims}-D plane needs " + ("ys (coordinates along d2)" if plane.dims == 2
                                                            else "no ys (it has no second direction)"))
    return _coordinates(xs, "xs"), (None if ys is None else _coordinates(ys, "ys")), int(points_per_pass)


def _evaluator_on(net: Union[nn.Module, CurveModel], plane: Plane, runtime: Runtime) -> CurveModel:
    """:func:`evaluator_for` ``net``, checked against the plane's dimension and the runtime's device."""
    evaluator = evaluator_for(net)
    if plane.origin.numel() != evaluator.num_parameters:
        raise ValueError(f"the plane lives in a space of {plane.origin.numel()} parameters, the network has "
                         f"{evaluator.num_parameters}")
    device = evaluator.fixed_bends.device
    want = None if runtime.device is None else torch.device(runtime.device)
    if want is not None and (want.type != device.type or want.index not in (None, device.index)):
        raise ValueError(f"runtime.device is {runtime.device} but the network is on {device}: "
                         "the grid is evaluated where the network is; move it first")
    return evaluator


def _use_bn(evaluator: CurveModel, recompute_bn: bool, bn_loader, train_loader) -> bool:
    """Whether BN statistics are recomputed per point (the net has BN and it was asked); checks there is data."""
    has_bn = has_batchnorm(evaluator.net)
    if recompute_bn and bn_loader is None and train_loader is None and has_bn:
        raise ValueError("recomputing BN statistics needs a bn_loader or a train_loader")
    return bool(recompute_bn and has_bn)


def _start(resume: Optional[GridResult], xs, ys, use_bn: bool, k: int, checksum: np.ndarray,
           rows: List[np.ndarray], hooks: Hooks) -> GridResult:
    """The result to fill: empty, or a copy of ``resume`` once it is checked to be this grid."""
    if resume is None:
        return GridResult(xs, ys, {}, 0, len(rows), use_bn, k, checksum)
    _check_resume(resume, xs, ys, use_bn, k, checksum, len(rows))
    hooks.advance(int(sum(len(r) for r in rows[:resume.rows_done])))
    return GridResult(xs, ys, {k_: v.copy() for k_, v in resume.arrays.items()}, resume.rows_done,
                      len(rows), use_bn, k, checksum)


def _row_values(row: np.ndarray, k: int, values_at: Callable[[np.ndarray], Dict[str, np.ndarray]],
                sharded: bool) -> List[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """``(point indices, values)`` of every chunk of a row; sharded: each rank its chunks, then gathered."""
    chunks = _chunks(row, k)
    mine = range(*_dist.shard(len(chunks))) if sharded else range(len(chunks))
    done = [(chunks[i], values_at(chunks[i])) for i in mine]
    if sharded:  # every rank gets the whole row: resume state and results are the same everywhere
        done = [item for part in _dist.all_gather_object(done) for item in part]
    return done


def _batch_size(loader) -> Optional[int]:
    """Samples in ``loader``'s batches when it says (``batch_size``, or a list's first batch), else None."""
    size = getattr(loader, "batch_size", None)
    if size is None and isinstance(loader, (list, tuple)) and loader:
        size = len(loader[0][0])
    return None if size is None else int(size)


def _row_pass(evaluator: CurveModel, nx: int, points_per_pass: int, loader, runtime: Runtime) -> int:
    """Points per pass over the data in a 2-D grid's rows of ``nx`` points.

    ``points_per_pass`` where the points are vmapped (their activations
    stack up). Where they run one after another (CPUs: convolutions, dense
    work above ``VMAP_MAX_WORK``) a point costs only its weights, so a whole
    row shares each pass, up to :data:`ROW_PASS_BYTES` of weights: fewer
    passes over the data, and the row's first-layer products made once
    (:mod:`~modeconn.evaluation.input_span`). With ranks, each gets a share.
    """
    size = _batch_size(loader)
    device = evaluator.fixed_bends.device
    if runtime.compile or size is None or vectorize_by_default(evaluator.net, device, evaluator.num_parameters * size):
        return points_per_pass
    k = max(points_per_pass, min(nx, ROW_PASS_BYTES // (evaluator.num_parameters * evaluator.fixed_bends.element_size())))
    return min(k, math.ceil(nx / _dist.get_world_size())) if runtime.sharded() else k


def _plane_span(plane: Plane, coords: np.ndarray) -> Span:
    """The points at ``coords [K, dims]`` as combinations ``(1, a, b)`` of ``(origin, d1, d2)``."""
    vectors = [plane.origin, plane.d1] + ([plane.d2] if plane.dims == 2 else [])
    return Span(torch.from_numpy(np.concatenate([np.ones((len(coords), 1)), coords], 1)), vectors)


def _store(result: GridResult, done: List[Tuple[np.ndarray, Dict[str, np.ndarray]]]) -> None:
    """Write chunk values into the result's arrays (created NaN-filled on first sight of a metric)."""
    for chunk, vals in done:
        for name, v in vals.items():
            if name not in result.arrays:
                result.arrays[name] = np.full(result.shape, np.nan)
            result.arrays[name].reshape(-1)[chunk] = np.asarray(v, float)


# ---------------------------------------------------------------------- grid
@torch.no_grad()
def evaluate_grid(net: Union[nn.Module, CurveModel], plane: Plane, xs: Sequence[float],
                  ys: Optional[Sequence[float]] = None, train_loader: Optional[Iterable] = None,
                  test_loader: Optional[Iterable] = None, bn_loader: Optional[Iterable] = None,
                  recompute_bn: bool = True, points_per_pass: int = 8,
                  on_row: Optional[RowCallback] = None, resume: Optional[GridResult] = None,
                  point_metrics: Optional[PointMetrics] = None, *, runtime: Optional[Runtime] = None,
                  hooks: Optional[Hooks] = None) -> GridResult:
    """Metrics at ``θ = origin + x·d1 (+ y·d2)`` for every ``x`` in ``xs`` (and ``y`` in ``ys``).

    ``net`` gives the architecture (a module or a CurveModel); ``ys`` is given
    exactly when ``plane`` is 2-D. Points share passes over the data
    (``points_per_pass``; a whole row of a 2-D grid where the points run
    one after another, see :func:`_row_pass`), BN statistics are recomputed per point over
    ``bn_loader`` (default ``train_loader``) unless ``recompute_bn`` is False;
    a split whose loader is None is left out. ``on_row(i, partial)`` follows
    every finished row and ``resume`` keeps a partial result's rows;
    ``point_metrics(flats) -> {name: [K]}`` adds values (e.g. curvature).
    ``runtime.distributed`` shares each row among ranks; ``hooks.advance(n)``
    counts points. Returns a :class:`GridResult`, 2-D arrays indexed ``[i_y, i_x]``.

    Example:
        >>> from modeconn.geometry.directions import flatten_parameters, random_plane
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> plane = random_plane(flatten_parameters(net), net, dims=2, seed=0)
        >>> grid = evaluate_grid(net, plane, xs=[-1.0, 0.0, 1.0], ys=[0.0, 0.5], train_loader=data)
        >>> at_origin = nn.functional.cross_entropy(net(data[0][0]), data[0][1]).item()
        >>> grid.arrays["train_loss"].shape, bool(abs(grid.arrays["train_loss"][0, 1] - at_origin) < 1e-5)
        ((2, 3), True)
    """
    xs, ys, points_per_pass = _grid_arguments(plane, xs, ys, train_loader, test_loader, points_per_pass)
    runtime, hooks = runtime or Runtime(), hooks or Hooks()
    evaluator = _evaluator_on(net, plane, runtime)
    use_bn = _use_bn(evaluator, recompute_bn, bn_loader, train_loader)
    coords = xs[:, None] if ys is None else np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    rows = _rows(len(xs), None if ys is None else len(ys), points_per_pass)
    result = _start(resume, xs, ys, use_bn, points_per_pass, plane_checksum(plane), rows, hooks)
    per_pass = points_per_pass if ys is None else _row_pass(
        evaluator, len(xs), points_per_pass, test_loader if train_loader is None else train_loader, runtime)
    # one points buffer for every pass; scratch: the metric passes' blocks, made once per grid
    buffer, scratch = evaluator.fixed_bends.new_empty(min(per_pass, len(coords)), evaluator.num_parameters), {}
    def values_at(idx: np.ndarray) -> Dict[str, np.ndarray]:
        """Metrics (and point metrics) of the grid points ``idx``, in one pass per loader."""
        flats = plane.points(coords[idx], out=buffer[:len(idx)])   # one buffer, no [K, P] block per pass
        vals = dict(evaluate_points(evaluator, flats, train_loader, test_loader, bn_loader, use_bn,
                                    runtime=runtime, scratch=scratch, span=_plane_span(plane, coords[idx])))
        if point_metrics is not None:
            vals.update({k: np.asarray(v, float) for k, v in point_metrics(flats).items()})
        hooks.advance(len(idx))
        return vals

    for r in range(result.rows_done, len(rows)):
        _store(result, _row_values(rows[r], per_pass, values_at, runtime.sharded()))
        result.rows_done = r + 1
        if on_row is not None:
            on_row(r, result)
    return result


def _check_resume(res: GridResult, xs, ys, use_bn, k, checksum, num_rows) -> None:
    """Raise, listing every difference, unless ``res`` is a partial result of this very grid."""
    problems = []
    if not np.array_equal(res.xs, xs):
        problems.append("xs differ")
    if (res.ys is None) != (ys is None) or (ys is not None and not np.array_equal(res.ys, ys)):
        problems.append("ys differ")
    if res.bn_recomputed != use_bn:
        problems.append(f"recompute_bn was {res.bn_recomputed}, now {use_bn}")
    if res.points_per_pass != k and ys is None:
        problems.append(f"points_per_pass was {res.points_per_pass}, now {k} (it sets the rows of a 1-D grid)")
    if res.num_rows != num_rows:
        problems.append(f"{res.num_rows} rows before, {num_rows} now")
    if len(res.checksum) and not np.allclose(res.checksum, checksum, rtol=1e-9, atol=0):
        problems.append("the plane (origin or directions) differs")
    if problems:
        raise ValueError("cannot resume: the saved grid is not this grid: " + "; ".join(problems))


# ---------------------------------------------------------------- curve plane
@dataclass
class CurvePlane:
    """The plane through a curve's start, middle bend and end, and the grid on it.

    ``plane``: orthonormal axes (float64), origin at the start.
    ``anchors``: coordinates ``[3, 2]`` of start, bend ``anchor_bend``, end.
    ``bend_coords``/``bend_residuals``: every bend's coordinates and its
    distance from the plane; ``ts``, ``curve_coords``, ``curve_residuals``:
    the same for points of the curve (zero residuals for a 3-bend Bezier or
    PolyChain, which lie in the plane). ``grid`` is None when only the
    geometry was computed.
    """

    plane: Plane
    anchors: np.ndarray
    anchor_bend: int
    bend_coords: np.ndarray
    bend_residuals: np.ndarray
    ts: np.ndarray
    curve_coords: np.ndarray
    curve_residuals: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    grid: Optional[GridResult] = None

    def geometry(self) -> Dict[str, Any]:
        """Plain-data description (for JSON)."""
        return {"anchor_bend": self.anchor_bend, "start": self.anchors[0].tolist(),
                "bend": self.anchors[1].tolist(), "end": self.anchors[2].tolist(),
                "bend_coords": self.bend_coords.tolist(), "bend_residuals": self.bend_residuals.tolist(),
                "ts": self.ts.tolist(), "curve_coords": self.curve_coords.tolist(),
                "curve_residuals": self.curve_residuals.tolist(), "max_curve_residual":
                    float(np.max(self.curve_residuals)) if len(self.curve_residuals) else 0.0,
                "x_range": [float(self.xs[0]), float(self.xs[-1])],
                "y_range": [float(self.ys[0]), float(self.ys[-1])],
                "grid_shape": [len(self.ys), len(self.xs)]}


def _grid_size(grid) -> Tuple[int, int]:
    """``(nx, ny)`` from ``n`` or ``(nx, ny)``, each at least 2."""
    if isinstance(grid, (int, np.integer)):
        nx = ny = int(grid)
    else:
        nx, ny = (int(g) for g in grid)
    if nx < 2 or ny < 2:
        raise ValueError(f"the grid needs at least 2 points per axis, got {nx} x {ny}")
    return nx, ny


@torch.no_grad()
def curve_plane_geometry(curve: CurveModel, grid: Union[int, Tuple[int, int]] = 21, margin: float = 0.2,
                         num_points: int = 61, bend: Optional[int] = None) -> CurvePlane:
    """The plane of a curve and the grid rectangle on it, without evaluating anything.

    The plane passes through the start (origin, (0, 0)), the end
    ((|end − start|, 0)) and bend ``bend`` (default: the middle one,
    ``num_bends // 2``). The rectangle is the bounding box of the bends and
    of ``num_points`` curve points, widened on each side by ``margin`` times
    its width (x) and height (y). ``grid`` is the number of points per axis,
    ``n`` or ``(nx, ny)``.
    """
    K = curve.num_bends
    if K < 3:
        raise ValueError(f"a curve plane needs a curve with a middle bend (>= 3 bends), this one has {K}; "
                         "for a straight line use a 1-D slice (python -m modeconn.landscape --ckpt2)")
    bend = K // 2 if bend is None else int(bend)
    if not 0 < bend < K - 1:
        raise ValueError(f"bend must be a middle bend, 1..{K - 2}, got {bend}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if int(num_points) != num_points or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    nx, ny = _grid_size(grid)
    bends = curve.bends.detach()
    plane, c3 = plane_through(bends[0], bends[-1], bends[bend])
    anchors = c3[[0, 2, 1]]                      # start, bend, end
    ts = np.linspace(0.0, 1.0, int(num_points))
    points = curve.flat_weights_at(torch.tensor(ts, dtype=bends.dtype, device=bends.device)).detach()
    bend_coords, curve_coords = plane.project(bends), plane.project(points)
    allc = np.concatenate([bend_coords, curve_coords])
    lo, hi = allc.min(0), allc.max(0)
    ext = hi - lo
    xs = np.linspace(lo[0] - margin * ext[0], hi[0] + margin * ext[0], nx)
    ys = np.linspace(lo[1] - margin * ext[1], hi[1] + margin * ext[1], ny)
    return CurvePlane(plane=plane, anchors=anchors, anchor_bend=bend, bend_coords=bend_coords,
                      bend_residuals=plane.residual(bends), ts=ts, curve_coords=curve_coords,
                      curve_residuals=plane.residual(points), xs=xs, ys=ys)


def curve_plane(curve: CurveModel, train_loader: Optional[Iterable], test_loader: Optional[Iterable],
                grid: Union[int, Tuple[int, int]] = 21, margin: float = 0.2, num_points: int = 61,
                bend: Optional[int] = None, bn_loader: Optional[Iterable] = None, recompute_bn: bool = True,
                points_per_pass: int = 8, on_row: Optional[RowCallback] = None,
                resume: Optional[GridResult] = None, point_metrics: Optional[PointMetrics] = None, *,
                runtime: Optional[Runtime] = None, hooks: Optional[Hooks] = None) -> CurvePlane:
    """Loss and accuracy over the plane of a curve (Garipov et al. 2018, Fig. 1).

    Geometry as :func:`curve_plane_geometry`; the grid is evaluated by
    :func:`evaluate_grid` with the curve as the architecture (same
    arguments: BN statistics per point by default, ``on_row`` / ``resume``
    to continue an interrupted run, ``runtime`` / ``hooks``).
    ``result.grid.arrays[m][j, i]`` is at ``(result.xs[i], result.ys[j])``.
    """
    cp = curve_plane_geometry(curve, grid, margin, num_points, bend)
    cp.grid = evaluate_grid(curve, cp.plane, cp.xs, cp.ys, train_loader, test_loader, bn_loader, recompute_bn,
                            points_per_pass, on_row, resume, point_metrics, runtime=runtime, hooks=hooks)
    return cp

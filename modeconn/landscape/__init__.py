"""Loss landscapes: random and model-difference directions, planes, 1-D / 2-D grids.

Library (no printing, no argument parsing)::

    from modeconn.landscape import random_plane, evaluate_grid, flatten_parameters
    plane = random_plane(flatten_parameters(model), model, dims=2, norm="filter", seed=0)
    grid = evaluate_grid(model, plane, xs=np.linspace(-1, 1, 21), ys=np.linspace(-1, 1, 21),
                         train_loader=ds.eval_loader("train"), test_loader=ds.eval_loader("test"))
    grid.arrays["train_loss"][j, i]      # at (xs[i], ys[j])

    cp = curve_plane(curve, train_loader, test_loader, grid=21, margin=0.2)
    cp.grid.arrays, cp.anchors, cp.curve_coords

Commands: ``python -m modeconn.landscape`` (slices around a model) and
``python -m modeconn.plane`` (the plane of a fitted curve).
"""
from .directions import (NORMS, Layout, Plane, flatten_parameters, layout_of, model_direction,  # noqa: F401
                         normalize_direction, orthogonalize, plane_through, random_direction, random_plane)
from .grid import (CurvePlane, GridResult, axis, curve_plane, curve_plane_geometry, evaluate_grid,  # noqa: F401
                   evaluator_for, plane_checksum)
from .curvature import curvature_metrics, module_at  # noqa: F401

__all__ = ["NORMS", "Layout", "Plane", "flatten_parameters", "layout_of", "model_direction",
           "normalize_direction", "orthogonalize", "plane_through", "random_direction", "random_plane",
           "CurvePlane", "GridResult", "axis", "curve_plane", "curve_plane_geometry", "evaluate_grid",
           "evaluator_for", "plane_checksum", "curvature_metrics", "module_at"]


def main(argv=None) -> int:
    """The command ``python -m modeconn.landscape`` (= ``modeconn landscape``); see :mod:`.cli`."""
    from .cli import main as _main

    return _main(argv)
